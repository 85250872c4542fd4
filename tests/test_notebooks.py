"""The notebooks under notebooks/ run top to bottom in a real Jupyter kernel (nbclient, ipykernel of this
Python) and show pictures; what a cell checks is an `assert` in the notebook, so a broken behaviour is an
error output here."""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_in_a_kernel_and_shows_pictures(path):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    # The native kernel of the running Python (ipykernel), started in the repository root so that
    # torch_arbiter is imported from this checkout.
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    errors = [o for o in outputs if o.output_type == "error"]
    assert not errors, [f"{e.ename}: {e.evalue}" for e in errors]
    assert any("image/png" in o.get("data", {}) for o in outputs)
    if path.name == "quickstart.ipynb":
        assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2  # the digits grid and the fidelity plot
        assert sum("text/html" in o.get("data", {}) for o in outputs) >= 3  # ManagedModel, HoloTensor, Arbiter


def test_there_is_a_notebook_and_it_is_committed_without_outputs():
    assert NOTEBOOKS
    for path in NOTEBOOKS:
        cells = json.loads(path.read_text())["cells"]
        assert all(not cell.get("outputs") for cell in cells if cell["cell_type"] == "code")
