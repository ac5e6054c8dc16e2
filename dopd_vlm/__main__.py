"""``python -m dopd_vlm`` runs the ``dopd-vlm`` command line (see dopd_vlm.cli)."""

import sys

from dopd_vlm.cli import main

sys.exit(main())
