"""Does a comparison's answer hold across the interference range?

Co-run interference is the most uncertain input until it is measured on the user's GPU, so a sweep can
run every policy at several points of the interference dial (``costs.interference_scale``, e.g.
``simcolo -m +sweep=compare costs.interference_scale=optimistic,default,pessimistic``). This module ranks
the policies on the main metrics at each point and says whether the ranking is the same at every one.

Runs are grouped by *context*: the overrides that differ between runs other than ``policy=...`` and
``costs.interference_scale=...`` (a sweep over models or rates is ranked per model and rate). Within a
context and a metric, policies are ranked best first; a value within :data:`TIE_REL` of the best value of
its group ties with it (``a = b > c``), so that results that differ by less than the simulation's
resolution of a policy question (two policies that both meet every SLO, goodputs 0.2 % apart) do not
count as a change of the answer.
"""
from __future__ import annotations

import math

import pandas as pd

#: (summary key, higher is better) of the metrics whose ranking is checked: SLO attainment, goodput, the
#: latency tails interference moves first, and training work in a job-neutral unit (FLOP/s; a LoRA token
#: is cheaper than a full-parameter token).
RANKING_KEYS: tuple[tuple[str, bool], ...] = (("slo_attainment", True), ("goodput_rps", True),
                                              ("ttft_p99_s", False), ("tpot_p99_s", False),
                                              ("train_flops_per_s", True))
#: relative difference below which two values rank as a tie (1 %)
TIE_REL = 0.01
SCALE_KEY = "cost_interference_scale"
_SCALE_OVERRIDE = "costs.interference_scale="


def _scale_name(scale: float) -> str:
    from simcolo.config.groups import INTERFERENCE_SCALES

    name = next((k for k, v in INTERFERENCE_SCALES.items() if v == scale), None)
    return f"{scale:g} ({name})" if name else f"{scale:g}"


def _contexts(overrides: pd.Series) -> pd.Series:
    """Each run's overrides that not every run shares, without the policy and the interference scale."""
    lists = [str(o).split() for o in overrides]
    common = set.intersection(*(set(x) for x in lists)) if lists else set()
    return pd.Series([" ".join(o for o in x if o not in common and not o.startswith(_SCALE_OVERRIDE)
                               and not o.startswith("policy=")) or "-" for x in lists], index=overrides.index)


def _ranking(values: dict[str, float], higher_better: bool) -> str:
    """``a > b = c`` (best first; ties within :data:`TIE_REL`); runs without a value are left out."""
    items = sorted(((v, p) for p, v in values.items() if not math.isnan(v)), key=lambda t: (-t[0] if higher_better
                                                                                          else t[0], t[1]))
    out, lead = "", None      # lead: the first (best) value of the current group of ties
    for v, p in items:
        if lead is None:
            out, lead = p, v
        elif abs(v - lead) <= TIE_REL * max(abs(v), abs(lead), 1e-300):
            out += " = " + p
        else:
            out, lead = out + " > " + p, v
    return out


def _canonical(ranking: str) -> tuple:
    """A ranking as ordered groups of tied names (order inside a tie does not matter)."""
    return tuple(frozenset(g.split(" = ")) for g in ranking.split(" > ")) if ranking else ()


def ranking_across_interference(df: pd.DataFrame) -> pd.DataFrame | None:
    """One row per (context, metric): the ranking at each interference scale and whether it ``holds``
    (the same at every scale). None when the runs do not span two scales or name no policy.

    Columns: ``context``, ``metric``, one column per scale (named like ``0.5 (optimistic)``), ``holds``.
    ``df`` is :func:`simcolo.metrics.comparison.load_runs`'s table (runs without the scale key count as 1).
    """
    if "policy" not in df.columns:
        return None
    scales = df[SCALE_KEY].fillna(1.0).astype(float) if SCALE_KEY in df.columns else pd.Series(1.0, index=df.index)
    if scales.nunique() < 2:
        return None
    order = sorted(scales.unique())
    contexts = _contexts(df["overrides"]) if "overrides" in df.columns else pd.Series("-", index=df.index)
    rows = []
    for ctx in dict.fromkeys(contexts):
        in_ctx = contexts == ctx
        for key, higher in RANKING_KEYS:
            if key not in df.columns or df.loc[in_ctx, key].isna().all():
                continue
            per_scale = {}
            for s in order:
                sel = df[in_ctx & (scales == s)]
                per_scale[_scale_name(s)] = _ranking(dict(zip(sel["policy"].astype(str), sel[key].astype(float))),
                                                     higher)
            holds = len({_canonical(r) for r in per_scale.values()}) == 1
            rows.append({"context": ctx, "metric": key, **per_scale, "holds": holds})
    return pd.DataFrame(rows) if rows else None


def verdict(ranking: pd.DataFrame) -> str:
    """One sentence: the range and whether the ranking held on every metric (else where it changed)."""
    scale_cols = [c for c in ranking.columns if c not in ("context", "metric", "holds")]
    span = f"interference_scale {scale_cols[0]} to {scale_cols[-1]}"
    broken = ranking[~ranking["holds"]]
    metrics = ", ".join(dict.fromkeys(ranking["metric"]))
    if broken.empty:
        return f"The ranking of the policies on {metrics} holds across {span}."
    where = "; ".join(f"{r.metric}" + (f" ({r.context})" if r.context != "-" else "") for r in broken.itertuples())
    return (f"The ranking of the policies changes across {span} on {len(broken)} of {len(ranking)} "
            f"(context, metric) pairs: {where}. Measure the interference on your GPU (calibrate/) before "
            f"trusting that part of the answer.")


def ranking_markdown(ranking: pd.DataFrame) -> str:
    cols = list(ranking.columns)
    lines = ["## Ranking across the interference range", "", verdict(ranking), "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in ranking.itertuples(index=False):
        cells = [("yes" if v else "**no**") if c == "holds" else str(v).replace("|", "\\|") for c, v in zip(cols, r)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
