"""The notebooks run top to bottom in a fresh kernel of this environment, and are committed
without outputs."""

import json
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks_to_run():
    assert [p.name for p in NOTEBOOKS][:4] == [
        "01_workspaces.ipynb", "02_workspace_modes.ipynb", "03_data_and_evaluation.ipynb", "04_data_parallel.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path):
    book = nbformat.read(path, as_version=4)
    dirty = [i for i, cell in enumerate(book.cells)
             if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs; clear them before committing"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, monkeypatch):
    # a kernel spec for this very interpreter (the project's .venv), found before any other
    spec = tmp_path / "jupyter" / "kernels" / "jaxws-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "jaxws test", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    work = tmp_path / "work"  # whatever a notebook writes stays in a temp dir
    work.mkdir()
    book = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(book, timeout=300, kernel_name="jaxws-test",
                            resources={"metadata": {"path": str(work)}}).execute()
    errors = [out for cell in book.cells if cell.cell_type == "code" for out in cell.outputs
              if out.output_type == "error"]
    assert not errors  # execute() raises CellExecutionError first; this guards allow_errors
