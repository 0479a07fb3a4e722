"""Notebooks are executed (in-process simulations and real sweeps on real trace slices), so they never rot;
the copies in the repository carry their rendered outputs (`python notebooks/render.py`), kept small."""
import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from simcolo.paths import PROJECT_ROOT

NOTEBOOKS = ("colocation_comparison.ipynb", "serving_runs.ipynb")


def _execute(name: str, cwd: Path | None = None) -> list:
    """Run notebooks/<name> top to bottom, the kernel in ``cwd`` (default: the notebooks folder, as
    Jupyter does); returns every code cell output (none may be an error)."""
    path = PROJECT_ROOT / "notebooks" / name
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(cwd or path.parent)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    return outputs


def _text(outputs) -> str:
    return "".join(o.get("text", "") for o in outputs if o.output_type == "stream")


def _images(outputs) -> int:
    return sum("image/png" in o.get("data", {}) for o in outputs)


def test_serving_runs_notebook_executes(monkeypatch):
    monkeypatch.delenv("SIMCOLO_RUNS", raising=False)
    monkeypatch.delenv("SIMCOLO_MULTIRUN_DIR", raising=False)
    outputs = _execute("serving_runs.ipynb")
    assert "2 runs" in _text(outputs)
    assert _images(outputs) == 1


def test_colocation_comparison_notebook_executes(tmp_path, monkeypatch):
    """Unset SIMCOLO_MULTIRUN_DIR: the notebook runs its own small sweep (into a temp dir under tmp_path)."""
    monkeypatch.delenv("SIMCOLO_MULTIRUN_DIR", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    outputs = _execute("colocation_comparison.ipynb")
    text = _text(outputs)
    assert "4 runs: isolated, lemix, harli, tidal" in text
    table = next(o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {}))
    assert "slo_attainment" in table and "train_tokens_per_s" in table and "harli" in table
    assert _images(outputs) == 4   # Pareto, latency CDFs, utilisation, training progress
    assert list(tmp_path.glob("simcolo-sweep-*/2/summary.json"))        # the sweep it ran is real
    assert "report.html: self-contained" in text                         # and its report beside it


def test_colocation_notebook_reads_a_sweep_named_relative_to_where_it_runs(tmp_path, monkeypatch):
    """SIMCOLO_MULTIRUN_DIR=multirun/s, relative: found under the kernel's working directory. A serving-only
    sweep: the notebook says there is no Pareto or training plot instead of drawing empty ones."""
    sweep = tmp_path / "multirun" / "s"
    script = Path(sys.executable).with_name("simcolo")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "simcolo"]
    proc = subprocess.run([*cmd, "-m", "policy=round_robin,least_outstanding", "workload.max_requests=100",
                           "metrics.plots=false", "metrics.quiet=true", f"hydra.sweep.dir={sweep}"],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    monkeypatch.setenv("SIMCOLO_MULTIRUN_DIR", "multirun/s")
    monkeypatch.setenv("PWD", str(PROJECT_ROOT))        # as a shell in the checkout: not where the sweep is
    outputs = _execute("colocation_comparison.ipynb", cwd=tmp_path)
    text = _text(outputs)
    assert f"sweep: {sweep}\n" in text and "2 runs: round_robin, least_outstanding" in text
    assert "no run trains: no SLO attainment vs training throughput (Pareto) plot" in text
    assert "no run trains: no training progress plot" in text
    assert _images(outputs) == 2   # latency CDFs, utilisation


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_saved_notebooks_carry_small_rendered_outputs(name):
    """What GitHub shows: every code cell run in order with its output, no error, no timing metadata,
    small images (python notebooks/render.py writes them)."""
    path = PROJECT_ROOT / "notebooks" / name
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert [c["execution_count"] for c in code] == list(range(1, len(code) + 1))
    assert all(c["outputs"] for c in code), [c["source"][:1] for c in code if not c["outputs"]]
    outputs = [o for c in code for o in c["outputs"]]
    assert not [o for o in outputs if o["output_type"] == "error"]
    assert not [c for c in code if "execution" in c.get("metadata", {})]
    images = [o["data"]["image/png"] for o in outputs if "image/png" in o.get("data", {})]
    assert images and all(len(b) < 80_000 for b in images)
    assert path.stat().st_size < 250_000
