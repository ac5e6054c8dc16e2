"""The README stays true: every config key is documented with its default; commands exist."""

import dataclasses
import re
from pathlib import Path

from dopd_vlm.config import RunConfig

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def test_every_config_key_is_in_the_configuration_reference():
    def keys(node, prefix):
        for field in dataclasses.fields(node):
            value = getattr(node, field.name)
            if dataclasses.is_dataclass(value):  # a nested section, e.g. rollout.vllm
                yield from keys(value, f"{prefix}{field.name}.")
            else:
                yield f"{prefix}{field.name}"

    for key in keys(RunConfig(), ""):
        assert f"`{key}`" in README, f"{key} missing from README"


def test_readme_commands_and_files_exist():
    assert "make demo" in README and "make test" in README
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in ci
    for path in re.findall(r"\]\(([^)#]+)\)", README):
        if not path.startswith("http"):
            assert (REPO / path).exists(), path
    for path in re.findall(r"(configs/[\w.]+|ds_configs/[\w.]+)", README):
        assert (REPO / path).exists(), path
