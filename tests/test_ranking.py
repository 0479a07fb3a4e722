"""The comparison report's answer across the interference range: the ranking of the policies at each
point of ``costs.interference_scale``, and whether it holds."""
import json

import yaml

from simcolo.metrics.comparison import RANKING_FILE, load_runs, write_report
from simcolo.metrics.ranking import ranking_across_interference, verdict


def _sweep(root, results):
    """Job directories as `simcolo -m policy=... costs.interference_scale=...` writes them: summary.json
    and .hydra/overrides.yaml. ``results``: (policy, scale name, scale, slo_attainment, train_flops_per_s)."""
    for n, (policy, name, scale, slo, flops) in enumerate(results):
        d = root / str(n)
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"policy={policy}",
                                                                      f"costs.interference_scale={name}"]))
        (d / "summary.json").write_text(json.dumps({"policy": policy, "cost_interference_scale": scale,
                                                    "slo_attainment": slo, "goodput_rps": 10 * slo,
                                                    "tpot_p99_s": 0.01 / slo, "train_flops_per_s": flops}))
    return root


def test_a_ranking_that_holds(tmp_path):
    runs = _sweep(tmp_path, [
        ("isolated", "optimistic", 0.5, 0.99, 1e14), ("harli", "optimistic", 0.5, 0.98, 3e14),
        ("isolated", "default", 1.0, 0.99, 1e14), ("harli", "default", 1.0, 0.95, 2e14),
        ("isolated", "pessimistic", 2.0, 0.99, 1e14), ("harli", "pessimistic", 2.0, 0.90, 1.5e14)])
    r = ranking_across_interference(load_runs(runs))
    assert list(r.columns) == ["context", "metric", "0.5 (optimistic)", "1 (default)", "2 (pessimistic)", "holds"]
    slo = r[r.metric == "slo_attainment"].iloc[0]
    assert slo["0.5 (optimistic)"] == "isolated > harli" and bool(slo["holds"])
    assert r["holds"].all()
    tpot = r[r.metric == "tpot_p99_s"].iloc[0]
    assert tpot["2 (pessimistic)"] == "isolated > harli"          # lower is better
    assert verdict(r) == ("The ranking of the policies on slo_attainment, goodput_rps, tpot_p99_s, train_flops_per_s "
                          "holds across interference_scale 0.5 (optimistic) to 2 (pessimistic).")


def test_a_ranking_that_changes_is_named_and_reported(tmp_path):
    runs = _sweep(tmp_path, [
        ("lemix", "optimistic", 0.5, 0.97, 2e14), ("harli", "optimistic", 0.5, 0.93, 3e14),
        ("lemix", "pessimistic", 2.0, 0.80, 1e14), ("harli", "pessimistic", 2.0, 0.90, 2e14)])
    r = ranking_across_interference(load_runs(runs))
    slo = r[r.metric == "slo_attainment"].iloc[0]
    assert (slo["0.5 (optimistic)"], slo["2 (pessimistic)"], bool(slo["holds"])) == \
        ("lemix > harli", "harli > lemix", False)
    assert bool(r[r.metric == "train_flops_per_s"].iloc[0]["holds"])
    assert verdict(r).startswith("The ranking of the policies changes across interference_scale 0.5 (optimistic) "
                                 "to 2 (pessimistic) on 3 of 4 (context, metric) pairs: slo_attainment; goodput_rps; "
                                 "tpot_p99_s")
    paths = write_report(runs, plots=False)
    assert runs / RANKING_FILE in paths
    md = (runs / "comparison.md").read_text()
    assert "## Ranking across the interference range" in md and "| **no** |" in md
    html = (runs / "report.html").read_text()
    assert 'id="ranking"' in html and "lemix &gt; harli" in html and "<b>no</b>" in html


def test_ties_are_not_changes_and_one_scale_has_no_ranking(tmp_path):
    runs = _sweep(tmp_path / "a", [
        ("a", "optimistic", 0.5, 1.0, 1e14), ("b", "optimistic", 0.5, 1.0, 1e14),
        ("a", "default", 1.0, 1.0, 1e14), ("b", "default", 1.0, 1.0, 1e14)])
    r = ranking_across_interference(load_runs(runs))
    assert r["holds"].all() and r.iloc[0]["0.5 (optimistic)"] in ("a = b", "b = a")
    one = _sweep(tmp_path / "b", [("a", "default", 1.0, 1.0, 1e14), ("b", "default", 1.0, 0.9, 1e14)])
    assert ranking_across_interference(load_runs(one)) is None
    write_report(one, plots=False)
    assert not (one / RANKING_FILE).exists()


def test_each_context_of_a_larger_sweep_is_ranked_on_its_own(tmp_path):
    """A sweep over rates too: the ranking is checked per rate (the overrides that differ), and the
    overrides every run shares are not part of the context."""
    for n, (policy, rate, name, scale, slo) in enumerate([
            ("a", 1, "optimistic", 0.5, 0.99), ("b", 1, "optimistic", 0.5, 0.90),
            ("a", 1, "pessimistic", 2.0, 0.98), ("b", 1, "pessimistic", 2.0, 0.80),
            ("a", 4, "optimistic", 0.5, 0.70), ("b", 4, "optimistic", 0.5, 0.80),
            ("a", 4, "pessimistic", 2.0, 0.60), ("b", 4, "pessimistic", 2.0, 0.50)]):
        d = tmp_path / str(n)
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(
            [f"policy={policy}", f"workload.rate_scale={rate}", f"costs.interference_scale={name}", "+sweep=compare"]))
        (d / "summary.json").write_text(json.dumps({"policy": policy, "cost_interference_scale": scale,
                                                    "slo_attainment": slo}))
    r = ranking_across_interference(load_runs(tmp_path))
    assert list(r["context"]) == ["workload.rate_scale=1", "workload.rate_scale=4"]
    assert list(r["holds"]) == [True, False]
    assert verdict(r).endswith("on 1 of 2 (context, metric) pairs: slo_attainment (workload.rate_scale=4). Measure "
                               "the interference on your GPU (calibrate/) before trusting that part of the answer.")
