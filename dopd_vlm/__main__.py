"""``python -m dopd_vlm`` runs the ``dopd-vlm`` command line (see dopd_vlm.cli)."""

from dopd_vlm.cli import entry_point

entry_point()
