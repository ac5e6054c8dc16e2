"""The notebooks in notebooks/ run top to bottom in a fresh kernel, and are stored without outputs.

Each notebook is executed with nbclient in a kernel of *this* interpreter (a kernelspec written
to a temporary folder, so whatever kernels the machine has installed do not matter and a fresh
`make test` needs no manual step). The notebooks run with their default parameters (the routing
explorer: the arithmetic testbed's shipped pair; run_analysis.ipynb: tiny random models, and it
trains two 4-step runs, DOPD and vanilla OPD), except WORKDIR,
which a cell injected after the parameters cell (papermill's convention) points at pytest's
tmp_path so nothing is left behind.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
KERNEL_NAME = "dopd-vlm-tests"
CELL_TIMEOUT_S = 300

# The tiny models are far too small to gain from several threads; on a shared CPU, extra
# OpenMP threads only contend (measured: a 4-sample evaluation 0.1 s with one thread, 8 s with
# two on a loaded 2-core machine).
KERNEL_ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def kernel_specs(tmp_path_factory) -> KernelSpecManager:
    kernels = tmp_path_factory.mktemp("kernels")
    spec_dir = kernels / KERNEL_NAME
    spec_dir.mkdir()
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "dopd_vlm tests",
        "language": "python",
        "env": KERNEL_ENV,
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return KernelSpecManager(kernel_dirs=[str(kernels)])


def test_the_documented_notebooks_exist():
    assert {path.name for path in NOTEBOOKS} >= {"routing_explorer.ipynb", "run_analysis.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path):
    """Outputs of random tiny models say nothing and bloat diffs: keep them out of git."""
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, (
                f"{path.name} cell {index} has outputs; clear them before committing "
                "(Jupyter: Edit > Clear All Outputs)"
            )


def _cell_index(notebook, text: str) -> int:
    return next(i for i, cell in enumerate(notebook.cells) if text in cell.source)


def _inject_parameters(notebook, source: str) -> None:
    """Insert `source` as a code cell right after the cell tagged "parameters"."""
    index = next(i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", []))
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    notebook.cells.insert(index + 1, cell)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, kernel_specs, tmp_path):
    notebook = nbformat.read(path, as_version=4)
    _inject_parameters(notebook, f"WORKDIR = {str(tmp_path)!r}")
    manager = KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=kernel_specs)
    client = NotebookClient(
        notebook,
        km=manager,
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(path.parent)}},  # cwd: notebooks/, as in Jupyter
    )
    client.execute()  # raises CellExecutionError, with the cell's traceback, on any error
    errors = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "error"
    ]
    assert not errors
    images = sum(
        "image/png" in output.get("data", {})
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    )
    assert images >= (1 if path.stem == "routing_explorer" else 2), f"{path.name} drew {images} figures"
    if path.stem == "routing_explorer":  # the default pair is trained: its teacher disagrees on real tokens
        shares = next(output["data"]["text/html"] for output in notebook.cells[_cell_index(notebook, "display(shares")].outputs
                      if "text/html" in output.get("data", {}))
        ht_tokens = re.search(r">HT</th>\s*<td[^>]*>(\d+)</td>", shares)
        assert ht_tokens and int(ht_tokens.group(1)) > 0, shares
    if path.stem == "run_analysis":  # it trained its own runs: check what it plotted
        from dopd_vlm.lab.explore import find_runs

        runs = {run.name: run for run in find_runs(tmp_path / "runs")}
        assert set(runs) == {"dopd", "vanilla_opd"}
        assert runs["dopd"].series("loss")[0] == [1, 2, 3, 4]
        assert runs["dopd"].series("share/HT")[0] and not runs["vanilla_opd"].series("share/HT")[0]
        assert "teacher_privileged/test" in runs["vanilla_opd"].baseline
