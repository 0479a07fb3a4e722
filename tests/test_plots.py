"""The plots read right: a run's throughput plot names both axes' curves, its training plot shows what
training.parquet holds, the Pareto plot's SLO axis stops at 1, its run numbers never overlap and both axes
say which way is better, and the calibration report's log axes carry tick values. Per-run plots come from
real simulations; the Pareto geometry from frames built to crowd the points."""
import itertools

import matplotlib
import numpy as np
import pandas as pd
import pytest
from conftest import run_sim

from calibrate.report import figure as calibration_figure
from calibrate.report import log_ticks, seconds_label
from simcolo.metrics.comparison_plots import pareto, short_labels
from simcolo.metrics.plots import throughput_figure, training_figure

matplotlib.use("Agg")
import matplotlib.pyplot as plt


@pytest.fixture(scope="module")
def lemix_run(tmp_path_factory):
    """LeMix's co-located pipelines on 8 H100s, the first 100 requests of the conv trace, plots on."""
    out = tmp_path_factory.mktemp("lemix")
    result = run_sim("policy=lemix", "cluster=h100x8", "workload.max_requests=100", out_dir=out, plots=True)
    return out, result


def test_a_run_that_trains_gets_a_training_plot_from_its_records(lemix_run):
    out, result = lemix_run
    assert sorted(p.name for p in (out / "plots").iterdir()) == [
        "gpu_timeline.png", "latency_cdf.png", "queue_length.png", "throughput.png", "training.png"]
    assert (out / "plots" / "training.png").stat().st_size > 5000
    training = pd.read_parquet(out / "training.parquet")
    assert len(training) == result.summary["optimizer_steps"] > 0
    fig = training_figure(plt, training, "(lemix)", end_s=result.summary["duration_s"])
    try:
        ax_t, ax_v = fig.axes
        tokens = ax_t.lines[0].get_ydata()
        # cumulative tokens end at everything trained, reached at the last step's end and held to the run's end
        assert tokens[-1] == training["tokens"].sum() and np.all(np.diff(tokens) >= 0)
        assert ax_t.lines[0].get_xdata()[-1] == result.summary["duration_s"]
        # one version line per trainer, ending at the trainer's last version
        assert len(ax_v.lines) == training["trainer"].nunique()
        for line, (_, rows) in zip(ax_v.lines, training.groupby("trainer")):
            assert line.get_ydata()[-1] == rows["version"].max()
        assert ax_t.get_xlabel() == ax_v.get_xlabel() == "simulated time (s)"
    finally:
        plt.close(fig)


def test_serving_only_runs_have_no_training_plot(tmp_path):
    run_sim("workload.max_requests=50", out_dir=tmp_path, plots=True)
    assert not (tmp_path / "plots" / "training.png").exists() and (tmp_path / "plots" / "throughput.png").exists()


def test_throughput_plot_has_one_legend_for_both_axes_and_units(lemix_run):
    out, _ = lemix_run
    done = pd.read_parquet(out / "requests.parquet").query("status == 'finished'")
    fig = throughput_figure(plt, done, "(lemix)")
    try:
        left, right = fig.axes
        legend = left.get_legend()
        assert [t.get_text() for t in legend.get_texts()] == ["finished requests/s (left axis)",
                                                              "output tokens/s (right axis)"]
        assert right.get_legend() is None
        assert left.get_ylabel() == "finished requests/s (req/s)" and right.get_ylabel() == "output tokens/s (tok/s)"
        assert left.get_xlabel().startswith("simulated time (s)")
        # the rates integrate back to the finished requests and output tokens
        width = float(np.diff(left.lines[0].get_xdata()[:2])[0])
        assert left.lines[0].get_ydata().sum() * width == pytest.approx(len(done))
        assert right.lines[0].get_ydata().sum() * width == pytest.approx(done["output_tokens"].sum())
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------------------- Pareto
SIX = ["policy=isolated workload.rate_scale=1", "policy=lemix workload.rate_scale=1", "policy=harli workload.rate_scale=1",
       "policy=isolated workload.rate_scale=4", "policy=lemix workload.rate_scale=4", "policy=harli workload.rate_scale=4"]


def _six(slo, train):
    return pd.DataFrame({"label": SIX, "slo_attainment": slo, "train_tokens_per_s": train,
                         "training_kind": ["full", "full", "lora"] * 2})


def _boxes(fig):
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    texts = [t for t in ax.texts]
    return ax, [t.get_window_extent(renderer) for t in texts], [t.get_text() for t in texts], renderer


@pytest.mark.parametrize("slo, train", [
    ([1.0, 1.0, 1.0, 0.97, 0.975, 0.97], [31_000, 64_000, 102_000, 31_000, 63_000, 101_500]),   # spread out
    ([1.0] * 6, [1000, 1000, 1010, 1020, 5000, 5005]),          # all attain; runs nearly on top of each other
    ([0.40, 0.41, 0.40, 0.405, 0.9, 0.9], [0, 10, 5, 2, 7, 7]),  # a crowded corner and two runs on one point
])
def test_pareto_run_numbers_never_overlap_and_stay_inside(slo, train):
    fig = pareto(_six(slo, train))
    ax, boxes, texts, _ = _boxes(fig)
    frame = ax.get_window_extent()
    for a, b in itertools.combinations(boxes, 2):
        assert not a.overlaps(b), (a, b)
    for box in boxes:
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
    # every run is numbered exactly once (runs on one point share a label, "5,6")
    numbers = sorted(int(n) for t in texts for n in t.split(","))
    assert numbers == [1, 2, 3, 4, 5, 6]
    # the legend names each number by its short label
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[:6] == [f"{i}  {s} ({t:,} tok/s)" for i, (s, t) in enumerate(zip(short_labels(_six(slo, train)), train), 1)]
    assert legend[0] == f"1  isolated rate_scale=1 ({train[0]:,} tok/s)" and legend[-1] == "Pareto front"


@pytest.mark.parametrize("slo", [[1.0] * 6, [0.97, 0.98, 0.99, 1.0, 0.995, 0.96], [0.2, 0.3, 0.25, 0.5, 0.45, 0.3]])
def test_pareto_slo_axis_stays_within_what_is_possible(slo):
    fig = pareto(_six(slo, [1, 2, 3, 4, 5, 6]))
    ax = fig.axes[0]
    lo, hi = ax.get_xlim()
    assert 0.0 - 0.05 * (hi - lo) <= lo and hi <= 1.0 + 0.05 * (hi - lo)   # [0, 1] with a little margin
    assert lo <= min(slo) and max(slo) <= hi
    assert all(0.0 <= t <= 1.0 for t in ax.get_xticks())                  # no tick past 1
    assert "better →" in ax.get_xlabel() and "better →" in ax.get_ylabel()
    assert ax.get_ylim()[0] == 0.0


def test_pareto_compares_jobs_on_flops_with_each_jobs_tokens_beside():
    """A LoRA token costs less than a full-parameter one: the axis is model FLOP/s, the legend keeps tokens/s."""
    df = _six([1.0] * 6, [31_719, 64_853, 102_253, 31_000, 63_000, 101_000]).assign(
        train_job=["full", "full", "lora"] * 2, train_flops_per_s=[1.43e15, 2.92e15, 3.08e15, 1.4e15, 2.9e15, 3.0e15])
    fig = pareto(df)
    ax = fig.axes[0]
    assert "PFLOP/s" in ax.get_ylabel() and ax.get_ylim()[1] == pytest.approx(3.08e15 * 1.15)
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[1] == "2  lemix rate_scale=1 (full, 64,853 tok/s)"
    assert legend[2] == "3  harli rate_scale=1 (lora, 102,253 tok/s)"
    # the front is on FLOP/s: at SLO 1.0 every run is beaten by harli's 3.08e15, the only point ringed
    ringed = [c for c in ax.collections if c.get_facecolors().size == 0]
    assert [tuple(p) for p in ringed[0].get_offsets()] == [(1.0, 3.08e15)]
    plt.close(fig)


def test_pareto_of_a_sweep_where_nothing_trains_is_not_drawn():
    df = _six([1.0] * 6, [np.nan] * 6).assign(training_kind="none")
    assert pareto(df) is None


# ------------------------------------------------------------------------ calibration report plots
@pytest.mark.parametrize("lo, hi", [(0.8e-3, 1.25e-3), (1.1e-3 * 0.8, 1.5e-3 * 1.25), (2e-5, 0.5), (1e-6, 100.0)])
def test_calibration_report_axes_have_tick_values(lo, hi):
    ticks = log_ticks(lo, hi)
    assert 3 <= len(ticks) <= 8 and ticks == sorted(ticks) and lo <= ticks[0] and ticks[-1] <= hi
    rng = np.random.default_rng(0)
    measured = np.exp(rng.uniform(np.log(lo / 0.8), np.log(hi / 1.25), 40))
    df = pd.DataFrame({"measured_s": measured, "predicted_s": measured * rng.uniform(0.97, 1.03, 40)})
    df["rel_err"] = (df["predicted_s"] - df["measured_s"]).abs() / df["measured_s"]
    fig = calibration_figure("decode", df)
    fig.canvas.draw()
    ax = fig.axes[0]
    for axis in (ax.xaxis, ax.yaxis):
        labels = [t.get_text() for t in axis.get_ticklabels() if t.get_visible()]
        lo_view, hi_view = axis.get_view_interval()
        shown = [t for t in axis.get_ticklocs() if lo_view <= t <= hi_view]
        assert len(shown) >= 3 and len(labels) == len(axis.get_ticklocs())
        assert all(label.endswith((" s", " ms", " µs")) for label in labels), labels


def test_seconds_labels():
    assert [seconds_label(v) for v in (2.0, 1.5e-3, 1.5e-4, 2e-6)] == ["2 s", "1.5 ms", "150 µs", "2 µs"]
