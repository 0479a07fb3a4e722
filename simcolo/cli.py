"""The ``simcolo`` command: a Hydra app around :func:`simcolo.simulate.simulate`.

``simcolo`` runs the main job; ``simcolo key=value ...`` overrides the config; ``simcolo -m ...`` sweeps.
"""
from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from simcolo.errors import SimcoloError
from simcolo.paths import CONF_DIR

_ROWS = (("TTFT", "ttft"), ("TPOT", "tpot"), ("ITL", "itl"), ("E2E latency", "e2el"))


def _applies(s: dict, key: str) -> bool:
    v = s.get(key)
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def format_summary(s: dict) -> str:
    """The console summary of a run: only the rows that apply to it (their meanings: the README's
    "Reading the console summary")."""
    lines = [f"{'metric':<14}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}   (seconds)"]
    for label, key in _ROWS:
        cells = "".join(f"{s[f'{key}_{q}_s']:>10.4f}" for q in ("mean", "p50", "p90", "p99"))
        lines.append(f"{label:<14}{cells}")
    lines += [
        f"requests: {s['num_requests']}  finished: {s['num_finished']}  preemptions: {s['num_preemptions']}",
        f"SLO attainment (TTFT<={s['slo_ttft_s']}s and TPOT<={s['slo_tpot_s']}s): {s['slo_attainment']:.4f}"
        f"   goodput: {s['goodput_rps']:.3f} req/s",
        f"throughput: {s['request_throughput_rps']:.3f} req/s, {s['output_token_throughput_tps']:.1f} output tok/s,"
        f" {s['total_token_throughput_tps']:.1f} total tok/s",
    ]
    busy = f"serving instances busy: {s['gpu_busy_frac_mean']:.3f} (share of the run an instance runs an iteration)"
    if _applies(s, "gpu_utilization_mean") and s.get("training_kind", "none") != "none":
        busy += (f"   GPU utilisation: {s['gpu_utilization_mean']:.3f} (share of the run a GPU runs anything, "
                 f"serving or training)")
    lines.append(busy)
    if s.get("training_kind", "none") != "none":
        train = (f"training ({s['training_kind']}, {s['layout']}): {s['train_tokens_per_s']:.0f} tok/s, "
                 f"{s['train_samples_per_s']:.2f} samples/s, {s['optimizer_steps']} optimizer steps")
        if _applies(s, "bubble_rate"):
            train += f", bubble rate {s['bubble_rate']:.3f}"
        lines.append(train)
        model = f"inference loss (mean): {s['inference_loss_mean']:.4f}"
        if s.get("layout") == "pipelines" and _applies(s, "lemix_throughput_tasks_per_s"):
            model += f"   LeMix throughput: {s['lemix_throughput_tasks_per_s']:.3f} tasks/s"
        lines.append(model)
    return "\n".join(lines)


def report_run(program: str, summary: dict, max_context_len: int, quiet: bool, last_line: str) -> None:
    """What a run says when it ends, to the console and to the run's log (``conf/hydra/job_logging``): the
    over-length notice (stderr), then the summary and ``last_line`` (stdout; with ``quiet``, the log only)."""
    from simcolo.workload.overlength import notice

    line = notice(summary, max_context_len)
    if line is not None:
        logging.getLogger("simcolo.stderr").warning(f"{program}: {line}")
    out = logging.getLogger("simcolo.file" if quiet else "simcolo")
    out.info(format_summary(summary))
    out.info(last_line)


def report_error(program: str, exc: Exception) -> None:
    """One line on stderr (and in the run's log)."""
    logging.getLogger("simcolo.stderr").error(f"{program}: error: {exc}")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _app(cfg: DictConfig) -> float:
    from simcolo.simulate import simulate

    logging.captureWarnings(True)   # Python warnings (off-grid cost queries, ...) in the run's log too
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        result = simulate(cfg, out_dir, progress=sys.stderr.isatty() and not cfg.metrics.quiet)
    except SimcoloError as exc:
        report_error("simcolo", exc)
        sys.exit(2)
    report_run("simcolo", result.summary, cfg.model.max_context_len, cfg.metrics.quiet, f"outputs: {out_dir}")
    return result.summary["slo_attainment"]


def main() -> None:
    _app()


if __name__ == "__main__":
    main()
