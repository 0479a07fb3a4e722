"""Notebooks are executed (in-process simulations on real trace slices), so they never rot."""
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from simcolo.paths import PROJECT_ROOT


def _execute(name: str) -> list:
    """Run notebooks/<name> top to bottom; returns every code cell output (none may be an error)."""
    path = PROJECT_ROOT / "notebooks" / name
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(Path(path).parent)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    return outputs


def test_serving_runs_notebook_executes():
    outputs = _execute("serving_runs.ipynb")
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "2 runs" in text
    assert any("image/png" in o.get("data", {}) for o in outputs)


def test_colocation_comparison_notebook_executes(tmp_path, monkeypatch):
    """Unset SIMCOLO_MULTIRUN_DIR: the notebook runs its own small sweep (into a temp dir under tmp_path)."""
    monkeypatch.delenv("SIMCOLO_MULTIRUN_DIR", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    outputs = _execute("colocation_comparison.ipynb")
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "3 runs: isolated, lemix, harli" in text
    table = next(o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {}))
    assert "slo_attainment" in table and "train_tokens_per_s" in table and "harli" in table
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 3   # Pareto, latency CDFs, utilisation
    assert list(tmp_path.glob("simcolo-sweep-*/2/summary.json"))        # the sweep it ran is real
