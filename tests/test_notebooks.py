"""Notebooks are executed (in-process simulations on real trace slices), so they never rot."""
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from simcolo.paths import PROJECT_ROOT


def test_serving_runs_notebook_executes():
    path = PROJECT_ROOT / "notebooks" / "serving_runs.ipynb"
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(Path(path).parent)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "2 runs" in text
    assert any("image/png" in o.get("data", {}) for o in outputs)
