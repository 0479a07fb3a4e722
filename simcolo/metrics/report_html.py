"""``report.html``: one self-contained page per sweep, written beside ``comparison.csv``.

It holds the side-by-side table (the best value of each metric with a known direction in bold), the
comparison plots as embedded PNGs (or a line saying why one was skipped), the cost tables each run used
(every ``cost_*`` key of its ``summary.json`` and its ``costs`` config), and per run, collapsed: its
overrides, its resolved config (``.hydra/config.yaml``), every summary key and its own plots
(``plots/*.png``, embedded). Everything is inline -- images as base64 ``data:`` URIs, the style in one
``<style>`` element, no script -- so the file opens from disk in any browser, can be mailed or attached to
a ticket, and needs no server.

:func:`render` builds the text; :func:`write_html` writes it atomically (``simcolo.metrics.comparison``
calls it at the end of every sweep).
"""
from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from simcolo.metrics.io import atomic_path

#: the direction in which a metric is better (metrics not named here have none: shown without a mark)
HIGHER_IS_BETTER = ("slo_attainment", "goodput_rps", "request_throughput_rps", "output_token_throughput_tps",
                    "train_tokens_per_s", "train_samples_per_s", "optimizer_steps", "lemix_throughput_tasks_per_s",
                    "slo_attainment_1x", "slo_attainment_5x", "slo_attainment_10x")
LOWER_IS_BETTER_PREFIXES = ("ttft_", "tpot_", "itl_", "e2el_")
LOWER_IS_BETTER = ("inference_loss_mean", "bubble_rate", "num_preemptions")


def direction(metric: str) -> int:
    """+1 where higher is better, -1 where lower is, 0 where neither (utilisation, counts, settings)."""
    if metric in HIGHER_IS_BETTER:
        return 1
    if metric in LOWER_IS_BETTER or metric.startswith(LOWER_IS_BETTER_PREFIXES):
        return -1
    return 0


@dataclass
class Plot:
    """One comparison plot of the report: its PNG, or the reason it is not there."""
    title: str
    how_to_read: str
    png: bytes | None = None
    skipped: str | None = None


_STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 24px auto; max-width: 1200px;
       padding: 0 16px; color: #1d1d1f; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 18px; margin-top: 32px; border-bottom: 1px solid #ddd; }
h3 { font-size: 15px; margin: 20px 0 6px; }
code, pre { font: 12px/1.4 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
pre { background: #f6f8fa; padding: 8px 10px; overflow-x: auto; border-radius: 4px; }
table { border-collapse: collapse; margin: 8px 0; }
th, td { border: 1px solid #d0d7de; padding: 3px 8px; vertical-align: top; }
th { background: #f6f8fa; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.nowrap { white-space: nowrap; }
td.best { font-weight: 700; background: #eaf5ea; }
.dir { color: #57606a; white-space: nowrap; }
.meta, .note { color: #57606a; }
.skipped { background: #fff8c5; border: 1px solid #d4a72c; padding: 6px 10px; border-radius: 4px; }
figure { margin: 12px 0 24px; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #57606a; font-size: 13px; margin-top: 4px; }
details { margin: 4px 0; } summary { cursor: pointer; color: #0969da; }
nav a { margin-right: 14px; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _best(values: Sequence[Any], sign: int) -> set[int]:
    """Indices of the best values of a row (ties included); none where the row has no direction, fewer
    than two values or all values equal."""
    nums = []
    for i, v in enumerate(values):
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if not math.isnan(f):
            nums.append((i, f))
    if sign == 0 or len(nums) < 2 or len({f for _, f in nums}) == 1:
        return set()
    target = max(f for _, f in nums) if sign > 0 else min(f for _, f in nums)
    return {i for i, f in nums if f == target}


def _comparison_table(table: pd.DataFrame, numbers: Sequence[int], fmt) -> str:
    head = "".join(f"<th>#{n} {_e(c)}</th>" for n, c in zip(numbers, table.columns))
    rows = []
    for metric, values in zip(table.index, table.itertuples(index=False)):
        sign = direction(str(metric))
        best = _best(values, sign)
        mark = {1: "higher ↑", -1: "lower ↓", 0: ""}[sign]
        cells = "".join(f'<td class="num{" best" if i in best else ""}">{_e(fmt(metric, v))}</td>'
                        for i, v in enumerate(values))
        rows.append(f'<tr><th><code>{_e(metric)}</code></th><td class="dir">{mark}</td>{cells}</tr>')
    return (f'<table class="cmp"><thead><tr><th>metric</th><th>better</th>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


def _run_config(run_dir: Path) -> tuple[list[str], str | None, str | None]:
    """(overrides, resolved config as YAML, config read error) of a job directory."""
    hydra_dir = run_dir / ".hydra"
    overrides: list[str] = []
    path = hydra_dir / "overrides.yaml"
    if path.is_file():
        loaded = yaml.safe_load(path.read_text()) or []
        overrides = [str(o) for o in loaded] if isinstance(loaded, list) else [str(loaded)]
    path = hydra_dir / "config.yaml"
    if not path.is_file():
        return overrides, None, f"{path} is missing"
    from omegaconf import OmegaConf

    try:
        cfg = OmegaConf.load(path)
        try:
            return overrides, OmegaConf.to_yaml(cfg, resolve=True), None
        except Exception:  # noqa: BLE001 - an interpolation that needs Hydra's runtime (${hydra:...}): shown unresolved
            return overrides, OmegaConf.to_yaml(cfg), "interpolations left unresolved"
    except Exception as exc:  # noqa: BLE001 - any unreadable config is named, never fatal for the report
        return overrides, path.read_text(), f"not parsed ({exc})"


def _costs_config(config_yaml: str | None) -> dict[str, Any]:
    if not config_yaml:
        return {}
    try:
        costs = (yaml.safe_load(config_yaml) or {}).get("costs") or {}
    except yaml.YAMLError:
        return {}
    return costs if isinstance(costs, dict) else {}


def _provenance_table(df: pd.DataFrame, configs: Sequence[str | None], numbers: Sequence[int], fmt) -> str:
    cost_keys = sorted({k for k in df.columns if k.startswith("cost_")}
                       - {"cost_source", "cost_interference", "cost_off_grid_queries"})
    keys = [k for k in ("cost_source", "cost_interference", "cost_off_grid_queries") if k in df.columns] + cost_keys
    head = "<th>run</th><th>gpu</th><th>model</th>" + "".join(f"<th><code>{_e(k)}</code></th>" for k in keys) + \
        "<th>costs config</th>"
    rows = []
    for n, (_, row), cfg in zip(numbers, df.iterrows(), configs):
        costs = _costs_config(cfg)
        cells = []
        for k in keys:
            v = row.get(k)
            warn = k == "cost_off_grid_queries" and not _is_missing(v) and float(v) > 0
            text = "-" if _is_missing(v) else fmt(k, v)
            cells.append(f"<td>{_e(text)}{' (extrapolated off the table grid)' if warn else ''}</td>")
        if costs:
            where = costs.get("path") or (f"shipped tables under {costs['tables_root']}" if costs.get("tables_root")
                                          else "shipped tables (simcolo/costs/tables/<gpu>__<model>__tp<N>)")
            conf = f"path: {where}; interference: {costs.get('interference', '-')}"
        else:
            conf = "-"
        gpu, model = ("-" if _is_missing(row.get(k)) else row.get(k) for k in ("gpu", "model"))
        rows.append(f"<tr><td>#{n} {_e(row['label'])}</td><td class=\"nowrap\">{_e(gpu)}</td>"
                    f"<td class=\"nowrap\">{_e(model)}</td>{''.join(cells)}<td>{_e(conf)}</td></tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _summary_table(summary: dict, fmt) -> str:
    rows = "".join(f"<tr><th><code>{_e(k)}</code></th><td class=\"num\">{_e(fmt(k, v))}</td></tr>"
                   for k, v in sorted(summary.items()))
    return f"<table>{rows}</table>"


def _run_section(n: int, row: pd.Series, overrides: list[str], config: str | None, config_note: str | None,
                 fmt) -> str:
    run_dir = Path(str(row["run_dir"]))
    parts = [f'<section id="run-{n}"><h3>#{n} {_e(row["label"])}</h3>',
             f'<p class="meta">job {_e(row["job"])} · <code>{_e(run_dir)}</code></p>',
             "<details><summary>overrides ({})</summary><pre>{}</pre></details>".format(
                 len(overrides), _e("\n".join(overrides) or "(none: the defaults)"))]
    note = f" — {config_note}" if config_note else ""
    parts.append(f"<details><summary>resolved config{_e(note)}</summary><pre>{_e(config or '(missing)')}</pre></details>")
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text())
        except json.JSONDecodeError:
            summary = None
        if isinstance(summary, dict):
            parts.append(f"<details><summary>summary.json ({len(summary)} keys)</summary>"
                         f"{_summary_table(summary, fmt)}</details>")
    pngs = sorted((run_dir / "plots").glob("*.png")) if (run_dir / "plots").is_dir() else []
    if pngs:
        label = str(row["label"])
        imgs = "".join(f"<figure>{_img(p.read_bytes(), label + ': ' + p.stem)}"
                       f"<figcaption>{_e(p.name)}</figcaption></figure>" for p in pngs)
        parts.append(f"<details><summary>plots of this run ({len(pngs)}: "
                     f"{_e(', '.join(p.stem for p in pngs))})</summary>{imgs}</details>")
    else:
        parts.append('<p class="note">no per-run plots (the run had <code>metrics.plots=false</code>)</p>')
    parts.append("</section>")
    return "".join(parts)


def _ranking_section(ranking: pd.DataFrame) -> str:
    from simcolo.metrics.ranking import verdict

    cols = list(ranking.columns)
    head = "".join(f"<th>{_e(c)}</th>" for c in cols)
    rows = []
    for r in ranking.itertuples(index=False):
        cells = [("yes" if v else "<b>no</b>") if c == "holds" else _e(str(v)) for c, v in zip(cols, r)]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return ('<h2 id="ranking">Ranking across the interference range</h2>'
            f'<p class="note">{_e(verdict(ranking))} Policies best first at each <code>costs.interference_scale</code>; '
            "values within 1 % tie (=).</p>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>")


def render(df: pd.DataFrame, table: pd.DataFrame, plots: Sequence[Plot] | None, fmt,
           files: Sequence[str] = (), ranking: pd.DataFrame | None = None) -> str:
    """The report's HTML. ``df``: :func:`~simcolo.metrics.comparison.load_runs`; ``table``: its
    side-by-side view; ``plots``: the comparison plots (``None``: plots were turned off); ``fmt``: the
    cell formatter, ``fmt(metric, value) -> str``; ``files``: the other report files in the sweep directory (named,
    not linked); ``ranking``: :func:`simcolo.metrics.ranking.ranking_across_interference` (None: the runs do not
    span several interference scales)."""
    root = df.attrs.get("multirun_dir", "")
    numbers = list(range(1, len(df) + 1))
    incomplete = df.attrs.get("incomplete") or []
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>simcolo sweep: {_e(root)}</title><style>{_STYLE}</style></head><body>",
           f"<h1>simcolo sweep: {len(df)} run{'s' if len(df) != 1 else ''}</h1>",
           f'<p class="meta">sweep directory <code>{_e(root)}</code>'
           + (f" · beside this file: {_e(', '.join(files))}" if files else "") + "</p>"]
    if incomplete:
        out.append(f'<p class="skipped">{len(incomplete)} job director{"ies" if len(incomplete) != 1 else "y"} '
                   f"without summary.json (failed or still running) left out: "
                   f"{_e(', '.join(incomplete))}</p>")
    out.append('<nav><a href="#table">table</a><a href="#plots">plots</a><a href="#costs">cost tables</a>'
               '<a href="#runs">runs</a></nav>')

    out.append('<h2 id="table">Side by side</h2>')
    out.append('<p class="note">Runs are numbered as in the plots. <b>Bold</b>: the best value of a metric '
               'that has a direction (“better” column); a dash: the run has no such value (training '
               'metrics of a serving-only run).</p>')
    out.append(_comparison_table(table, numbers, fmt))
    if ranking is not None:
        out.append(_ranking_section(ranking))

    out.append('<h2 id="plots">Plots</h2>')
    if plots is None:
        out.append('<p class="skipped">Plots were turned off for this report '
                   "(<code>hydra.callbacks.compare.plots=false</code> or <code>--no-plots</code>).</p>")
    else:
        for p in plots:
            if p.png is None:
                out.append(f'<h3>{_e(p.title)}</h3><p class="skipped">{_e(p.skipped or "not drawn")}</p>')
            else:
                out.append(f"<h3>{_e(p.title)}</h3><figure>{_img(p.png, p.title)}"
                           f"<figcaption>{_e(p.how_to_read)}</figcaption></figure>")

    configs = []
    sections = []
    for n, (_, row) in zip(numbers, df.iterrows()):
        overrides, config, note = _run_config(Path(str(row["run_dir"])))
        configs.append(config)
        sections.append(_run_section(n, row, overrides, config, note, fmt))
    out.append('<h2 id="costs">Cost tables</h2>')
    out.append('<p class="note">What each run\'s iteration costs came from: <code>cost_source</code> is the '
               "tables' source (<code>roofline</code>: generated from the roofline model; <code>measured</code>: "
               "a calibration), <code>cost_interference</code> how co-running work slows each side, "
               "<code>cost_off_grid_queries</code> how many lookups fell off the tables' grid (extrapolated); "
               "the last column is the run's <code>costs</code> config.</p>")
    out.append(_provenance_table(df, configs, numbers, fmt))
    out.append('<h2 id="runs">Runs</h2>')
    out.extend(sections)
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_html(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path
