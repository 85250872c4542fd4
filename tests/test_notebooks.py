"""The notebooks under notebooks/ run top to bottom (their code cells, in one namespace)."""

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, capsys):
    cells = json.loads(path.read_text())["cells"]
    namespace: dict = {"__name__": "__notebook__"}
    for index, cell in enumerate(cells):
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), f"{path.name}[{index}]", "exec"), namespace)
    if path.name == "quickstart.ipynb":
        out = capsys.readouterr().out
        lowered = float(out.split("with a CRITICAL neighbour:")[1].split()[0])
        restored = float(out.split("after it leaves:")[1].split()[0])
        assert lowered < 1.0 and restored == 1.0


def test_there_is_a_notebook():
    assert NOTEBOOKS
