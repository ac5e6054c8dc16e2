"""The README stays true: every config key is documented with its default; commands exist."""

import ast
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


def package_imports() -> dict[str, set[str]]:
    """Each module of the package (dotted name) -> the package's modules it imports: every import
    statement counts, at the top, under TYPE_CHECKING or inside a function (a guard hides a cycle
    from Python, not from a reader). `from pkg import name` imports `pkg` and, if it is one, the
    module `pkg.name`; importing the package root `dopd_vlm` itself is not an edge."""
    modules = {}
    for path in (REPO / "dopd_vlm").rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        graph[name] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's package upwards
                    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                    base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
                targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            else:
                continue
            for target in targets:
                while target and target not in modules:  # a name imported from a module: that module
                    target = target.rpartition(".")[0]
                if target and target not in (name, "dopd_vlm"):
                    graph[name].add(target)
    return graph


def test_no_import_cycles_counting_every_import():
    graph = package_imports()

    def path_back(start: str) -> list[str] | None:
        """A chain of imports from `start` back to itself, if there is one."""
        stack, seen = [(start, [start])], set()
        while stack:
            module, chain = stack.pop()
            for dep in sorted(graph[module]):
                if dep == start:
                    return chain + [start]
                if dep not in seen:
                    seen.add(dep)
                    stack.append((dep, chain + [dep]))
        return None

    cycles = [chain for chain in map(path_back, sorted(graph)) if chain]
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(chain) for chain in cycles)


def architecture_rows() -> list[list[str]]:
    """docs/architecture.md, "Who owns what": the modules of each row, top to bottom."""
    doc = (REPO / "docs" / "architecture.md").read_text()
    section = doc.split("## Who owns what", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    return [[name.removesuffix(".py").rstrip("/") for name in re.findall(r"`([\w/]+(?:\.py)?)`", row.split("|")[2])]
            for row in rows[2:]]


def test_architecture_table_order_is_the_import_order():
    # docs/architecture.md, "Who owns what": a module imports only modules of its row or below it,
    # every import counted (guarded and function-local too), no module exempt
    rank = {module: i for i, modules in enumerate(architecture_rows()) for module in modules}

    def table_name(module: str) -> str:  # dopd_vlm.step -> step; the data package's modules -> data
        return module.split(".")[1]

    graph = {module: deps for module, deps in package_imports().items() if module != "dopd_vlm"}
    names = {table_name(module) for module in graph}
    assert names == set(rank), f"not in the table: {names - set(rank)}; not in the package: {set(rank) - names}"
    for module, deps in graph.items():
        for dep in deps:
            assert rank[table_name(dep)] >= rank[table_name(module)], (
                f"{module} imports {dep}, which the architecture table lists above it")


def called_names(node: ast.AST) -> set[str]:
    """Names of what `node` calls: `f(...)` -> f, `a.b.f(...)` -> f."""
    calls = set()
    for call in ast.walk(node):
        if isinstance(call, ast.Call):
            func = call.func
            calls.add(func.id if isinstance(func, ast.Name) else getattr(func, "attr", ""))
    return calls


def test_the_one_page_step_in_architecture_calls_what_dopd_step_calls():
    # docs/architecture.md, "The step on one page", is a reader's map of step.dopd_step: every
    # function or class of the package the step calls is on it, and it names none the step does not
    defined = {node.name for path in (REPO / "dopd_vlm").rglob("*.py") for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    step = ast.parse((REPO / "dopd_vlm" / "step.py").read_text())
    dopd_step = next(node for node in step.body if isinstance(node, ast.FunctionDef) and node.name == "dopd_step")
    doc = (REPO / "docs" / "architecture.md").read_text().split("## The step on one page", 1)[1]
    block = doc.split("```python\n", 1)[1].split("```", 1)[0]
    on_the_page = {name.rpartition(".")[2] for name in re.findall(r"([A-Za-z_][\w.]*)\(", block)}
    assert "dopd_step" in on_the_page
    called = called_names(dopd_step) & defined
    assert called - on_the_page == set(), "called by step.dopd_step, missing from the page"
    assert (on_the_page & defined) - called - {"dopd_step"} == set(), "on the page, not called by step.dopd_step"
