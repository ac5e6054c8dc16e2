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


def _top_level_imports(path: Path) -> set[str]:
    """The dopd_vlm modules a file imports at import time (not under TYPE_CHECKING, not in functions)."""
    import ast

    deps = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dopd_vlm."):
            deps.add(node.module.split(".")[1])
        elif isinstance(node, ast.ImportFrom) and node.module == "dopd_vlm":  # submodules, not re-exported names
            package = REPO / "dopd_vlm"
            deps.update(a.name for a in node.names if (package / f"{a.name}.py").is_file() or (package / a.name).is_dir())
        elif isinstance(node, ast.Import):
            deps.update(a.name.split(".")[1] for a in node.names if a.name.startswith("dopd_vlm."))
    return deps


def test_architecture_table_order_is_the_import_order():
    # docs/architecture.md, "Who owns what": a module imports only modules listed below it (and config)
    doc = (REPO / "docs" / "architecture.md").read_text()
    section = doc.split("## Who owns what", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    order = []
    for row in rows[2:]:
        cells = row.split("|")
        order.append([name.removesuffix(".py").rstrip("/") for name in re.findall(r"`([\w/]+(?:\.py)?)`", cells[2])])
    rank = {module: i for i, modules in enumerate(order) for module in modules}
    package = REPO / "dopd_vlm"
    imports: dict[str, set[str]] = {}  # module (or the data package) -> the modules it imports
    for path in package.rglob("*.py"):
        name = path.stem if path.parent == package else path.parent.name
        if not name.startswith("_"):
            imports.setdefault(name, set()).update(_top_level_imports(path))
    missing = set(imports) - set(rank)
    assert not missing, f"modules missing from the architecture table: {missing}"
    for name, deps in imports.items():
        for dep in deps - {name, "config"}:
            if not dep.startswith("_"):
                assert rank[dep] >= rank[name], f"{name} imports {dep}, which the architecture table lists above it"
