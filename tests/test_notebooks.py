"""The Colab notebooks run top to bottom at smoke size, so that they cannot rot.

Each notebook runs in a fresh Jupyter kernel (nbclient) in a temporary folder, with
ACIS_JAX_NOTEBOOK_SMOKE=1 (tiny sizes, set in each notebook's settings cell) and
ACIS_JAX_SKIP_INSTALL=1 (the package is installed already); a cell that raises fails the test.
"""

import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")  # the kernel the notebooks run in

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "colab").glob("*.ipynb"))
CELL_TIMEOUT_S = 600

def _param(path: pathlib.Path):
  if path.name != "03_evaluate.ipynb":
    return pytest.param(path, id=path.stem)
  # Its config reads slices of the sample CT, fetched from PyPI on first use.
  return pytest.param(path, id=path.stem, marks=pytest.mark.network)


def test_every_notebook_is_here():
  assert [p.name for p in NOTEBOOKS] == [
      "01_pseudomasks.ipynb", "02_train_and_synthesize.ipynb", "03_evaluate.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_clean(path):
  """No stored outputs, the python3 kernel, and the install cell before any other code."""
  notebook = nbformat.read(path, as_version=4)
  nbformat.validate(notebook)
  assert notebook.metadata.kernelspec.name == "python3"
  code_cells = [c for c in notebook.cells if c.cell_type == "code"]
  assert all(not c.outputs and c.execution_count is None for c in code_cells)
  assert "REPO_URL" in code_cells[0].source and "pip" in code_cells[0].source
  assert any('os.environ.get("ACIS_JAX_NOTEBOOK_SMOKE") == "1"' in c.source for c in code_cells)


@pytest.mark.parametrize("path", [_param(p) for p in NOTEBOOKS])
def test_notebook_runs_at_smoke_size(path, tmp_path, monkeypatch):
  monkeypatch.setenv("ACIS_JAX_NOTEBOOK_SMOKE", "1")
  monkeypatch.setenv("ACIS_JAX_SKIP_INSTALL", "1")
  monkeypatch.setenv("ACIS_JAX_REPO", str(REPO))  # the notebook runs outside the checkout
  # One CPU device, as on a one-GPU runtime (conftest fakes eight for the sharding tests).
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  notebook = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()  # raises CellExecutionError, with the cell and its traceback, on an error
