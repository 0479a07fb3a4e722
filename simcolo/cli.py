"""The ``simcolo`` command: a Hydra app around :func:`simcolo.simulate.simulate`.

``simcolo`` runs the main job; ``simcolo key=value ...`` overrides the config; ``simcolo -m ...`` sweeps.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from simcolo.errors import SimcoloError
from simcolo.paths import CONF_DIR

_ROWS = (("TTFT", "ttft"), ("TPOT", "tpot"), ("ITL", "itl"), ("E2E latency", "e2el"))


def format_summary(s: dict) -> str:
    lines = [f"{'metric':<14}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}   (seconds)"]
    for label, key in _ROWS:
        cells = "".join(f"{s[f'{key}_{q}_s']:>10.4f}" for q in ("mean", "p50", "p90", "p99"))
        lines.append(f"{label:<14}{cells}")
    lines += [
        f"requests: {s['num_requests']}  finished: {s['num_finished']}  preemptions: {s['num_preemptions']}",
        f"SLO attainment (TTFT<={s['slo_ttft_s']}s and TPOT<={s['slo_tpot_s']}s): {s['slo_attainment']:.4f}"
        f"   goodput: {s['goodput_rps']:.3f} req/s",
        f"throughput: {s['request_throughput_rps']:.3f} req/s, {s['output_token_throughput_tps']:.1f} output tok/s,"
        f" {s['total_token_throughput_tps']:.1f} total tok/s   GPU busy: {s['gpu_busy_frac_mean']:.3f}",
    ]
    if s.get("training_kind", "none") != "none":
        s = {"bubble_rate": math.nan, "lemix_throughput_tasks_per_s": math.nan, "gpu_utilization_mean": math.nan,
             **s}   # a replay does not measure these
        lines += [
            f"training ({s['training_kind']}, {s['layout']}): {s['train_tokens_per_s']:.0f} tok/s, "
            f"{s['train_samples_per_s']:.2f} samples/s, {s['optimizer_steps']} optimizer steps, "
            f"bubble rate {s['bubble_rate']:.3f}",
            f"inference loss (mean): {s['inference_loss_mean']:.4f}   GPU utilisation: "
            f"{s['gpu_utilization_mean']:.3f}   LeMix throughput: {s['lemix_throughput_tasks_per_s']:.3f} tasks/s",
        ]
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _app(cfg: DictConfig) -> float:
    from simcolo.simulate import simulate

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        result = simulate(cfg, out_dir, progress=sys.stderr.isatty() and not cfg.metrics.quiet)
    except SimcoloError as exc:
        print(f"simcolo: error: {exc}", file=sys.stderr)
        sys.exit(2)
    report_overlength(result.summary, cfg.model.max_context_len, "simcolo")
    if not cfg.metrics.quiet:
        print(format_summary(result.summary))
        print(f"outputs: {out_dir}")
    return result.summary["slo_attainment"]


def report_overlength(summary: dict, max_context_len: int, program: str) -> None:
    """One line on stderr when the run refused or clipped requests longer than the model's context."""
    from simcolo.workload.overlength import notice

    line = notice(summary, max_context_len)
    if line is not None:
        print(f"{program}: {line}", file=sys.stderr)


def main() -> None:
    _app()


if __name__ == "__main__":
    main()
