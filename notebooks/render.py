"""Execute the notebooks and save them with their outputs: ``.venv/bin/python notebooks/render.py``.

``colocation_comparison.ipynb`` runs against a small real sweep made here first (``simcolo -m
+sweep=compare workload.max_requests=300`` into a temporary ``multirun/demo``), given to it as the
*relative* path ``SIMCOLO_MULTIRUN_DIR=multirun/demo`` from the kernel's working directory (the temporary
directory): the saved output shows the relative lookup at work. ``serving_runs.ipynb`` runs its own
in-process simulations. Outputs are kept small (60-dpi figures, formatted tables); timing metadata is
dropped so a re-render changes only what the simulation changed (nothing, for the same code: results
are deterministic).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent


def execute(name: str, cwd: Path, env: dict[str, str | None]) -> nbformat.NotebookNode:
    """Run ``notebooks/<name>`` top to bottom with the kernel in ``cwd`` and ``env`` set (``None``:
    unset) in its environment; raise on any error output."""
    saved = {k: os.environ.get(k) for k in env}
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    try:
        nb = nbformat.read(HERE / name, as_version=4)
        NotebookClient(nb, timeout=600, kernel_name="python3", record_timing=False,
                       resources={"metadata": {"path": str(cwd)}}).execute()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        for out in cell.get("outputs", []):
            if out.output_type == "error":
                raise RuntimeError(f"{name}: {out.ename}: {out.evalue}")
    return nb


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="simcolo-render-") as tmp:
        sweep = Path(tmp) / "multirun" / "demo"
        proc = subprocess.run([sys.executable, "-m", "simcolo", "-m", "+sweep=compare", "workload.max_requests=300",
                               "metrics.plots=false", "metrics.quiet=true", f"hydra.sweep.dir={sweep}"],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            return 1
        jobs = {"colocation_comparison.ipynb": (Path(tmp), {"SIMCOLO_MULTIRUN_DIR": "multirun/demo"}),
                "serving_runs.ipynb": (HERE, {"SIMCOLO_RUNS": None, "SIMCOLO_MULTIRUN_DIR": None})}
        for name, (cwd, env) in jobs.items():
            nb = execute(name, cwd, env)
            nbformat.write(nb, HERE / name)
            print(f"{name}: {(HERE / name).stat().st_size:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
