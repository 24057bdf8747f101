"""The experiment tooling on the committed results: the report builds (its paired comparisons, Holm family and
claim verdicts), and run.py lists and skips finished runs. The statistics themselves: test_stats.py."""
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(ROOT, "experiments")


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get(
        "PYTHONPATH")]))}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_report_builds_from_the_committed_results(tmp_path):
    out = tmp_path / "RESULTS.md"
    done = _run(os.path.join(EXPERIMENTS, "report.py"), "--output", str(out))
    assert done.returncode == 0, done.stderr
    text = out.read_text()
    # docs/RESULTS.md is this file, byte for byte: regenerate it (python experiments/report.py) after adding runs.
    with open(os.path.join(ROOT, "docs", "RESULTS.md"), encoding="utf-8") as handle:
        assert text == handle.read()
    for heading in ("## Claims of the paper, one by one", "## 1. Algorithms on a 10-agent ring",
                    "## 2. Topologies (8 agents)", "## 5. Factor split and optimizer state"):
        assert heading in text
    # Every topology row has its spectral gap, run or not.
    rows = [line for line in text.splitlines() if line.startswith("| iid | ") or line.startswith("| dir0.1 | ")]
    topology_rows = [r for r in rows if r.count("|") == 9]
    assert len(topology_rows) == 24 and all(r.split("|")[4].strip() for r in topology_rows)
    assert (tmp_path / "results_plots" / "algorithms_acc.png").stat().st_size > 0
    # The report's count of finished runs is run.py's (a cell read from another suite is not counted twice).
    reported = int(re.search(r"Finished runs: (\d+) of", text).group(1))
    listed = 0
    for suite in (name for name, suite in _suites().items() if suite.cells):  # every suite with runs of its own
        dry = _run(os.path.join(EXPERIMENTS, "run.py"), suite, "--dry-run")
        listed += int(re.search(r"runs, (\d+) done", dry.stdout).group(1))
    assert reported == listed


def test_run_dry_run_counts_finished_runs():
    done = _run(os.path.join(EXPERIMENTS, "run.py"), "algorithms", "--seeds", "0", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "suite algorithms: 15 runs, 15 done, 0 to go" in done.stdout
    bad = _run(os.path.join(EXPERIMENTS, "run.py"), "nonsense")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def _suites() -> dict:
    """experiments/suites.py's SUITES."""
    if EXPERIMENTS not in sys.path:
        sys.path.insert(0, EXPERIMENTS)
    from suites import SUITES
    return SUITES


def _report():
    """experiments/report.py as a module."""
    if EXPERIMENTS not in sys.path:
        sys.path.insert(0, EXPERIMENTS)
    import report
    return report


def _cell(name, accuracies, seeds=None, suite="s"):
    report = _report()
    seeds = range(len(accuracies)) if seeds is None else seeds
    return report.Cell(name, [report.Seeded({"seed": seed}, [{"acc_mean": acc}], {})
                              for seed, acc in zip(seeds, accuracies)], suite)


def test_compare_pairs_by_seed():
    """Only seeds finished in both cells are paired (n = 3 here); the odd seed is shown, not counted."""
    report = _report()
    row = report.compare("x", _cell("a", [0.90, 0.91, 0.95, 0.99], seeds=[0, 1, 2, 3]),
                         _cell("b", [0.80, 0.82, 0.83], seeds=[0, 1, 2]), "a", "b")
    assert row.result.n == 3 and row.result.diffs == pytest.approx((0.10, 0.09, 0.12))
    assert row.raw[0] == "0.9000 / 0.8000 → +0.1000" and row.raw[3] == "0.9900 / –"
    assert row.side == "above" and row.verdict.startswith("a better")
    assert report.compare("x", None, _cell("b", [0.8, 0.9]), "a", "b").verdict == "no pairs yet"


def test_holm_family_counts_each_test_once_and_claim_verdict_counts_sides():
    report = _report()
    a, b = _cell("a", [0.90, 0.91, 0.92]), _cell("b", [0.80, 0.81, 0.83])
    ahead = report.compare("ahead", a, b, "a", "b")
    again = report.compare("ahead again", a, b, "a", "b")  # the same test printed twice
    behind = report.compare("behind", _cell("c", [0.70, 0.71, 0.73]), b, "c", "b")
    close = report.compare("close", _cell("d", [0.80, 0.85, 0.90]), _cell("e", [0.82, 0.84, 0.86]), "d", "e")
    family = report.adjust([ahead, again, behind, close])
    assert family == 3 and ahead.adjusted == again.adjusted
    expected = report.stats.holm([ahead.result.p, behind.result.p, close.result.p])
    assert [ahead.adjusted, behind.adjusted, close.adjusted] == pytest.approx(list(expected))
    assert (ahead.side, behind.side, close.side) == ("above", "below", "within")
    verdict = report.claim_verdict([ahead, behind, close])
    assert verdict.startswith("Verdict: of 3 setting(s), the 95% CI lies on the claimed side of 0 in 1, on the other "
                              "side in 1 and contains 0 in 1 (cannot tell). Of the 1 on the claimed side, ")
    behind.claimed = close.claimed = "not below"
    assert "largest deficit these intervals leave open" in report.claim_verdict([behind, close])
    assert report.claim_verdict([report.compare("x", None, None, "a", "b")]).startswith("Verdict: no paired data")


def _write_run(folder, seed, acc, avg):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"seed": seed, "agents": 10}))
    (folder / "metrics.jsonl").write_text(json.dumps({"round": 10, "acc_mean": acc, "avg_model_acc": avg}) + "\n")
    (folder / "summary.json").write_text("{}")


def test_report_takes_every_committed_seed(tmp_path):
    """Seeds beyond 0, 1, 2 enter the statistics with no code change; a seed one cell lacks is not paired."""
    report = _report()
    for seed in range(8):
        for partition in ("iid", "dir0.5", "dir0.1"):
            _write_run(tmp_path / "algorithms" / f"decaf-{partition}-s{seed}", seed, 0.80 + 0.01 * seed, 0.9)
            if seed != 7:
                _write_run(tmp_path / "algorithms" / f"dlora-{partition}-s{seed}", seed, 0.78 + 0.01 * seed
                           + 0.001 * (seed % 2), 0.9)
    built = report.Report(str(tmp_path), str(tmp_path / "out" / "RESULTS.md"))
    claim = next(c for c in built.claim_list() if c.title.startswith("DeCAF removes"))
    first = claim.rows[0]
    assert first.result.n == 7 and first.result.mean == pytest.approx((0.02 * 7 - 0.003) / 7)
    assert first.side == "above" and first.raw[7] == "0.8700 / –"
    assert "Wilcoxon" not in first.verdict  # 7 pairs, all positive: the signed-rank p 2/128 agrees
    assert claim.rows[3].verdict == "identical on every seed"  # the averaged model: 0.9 on both sides
    assert built.further_seeds()[("algorithms", "decaf-iid")] == [3, 4, 5, 6, 7]


def test_run_mistakes_are_one_line_and_train_nothing():
    """Repeated seeds are refused (they would train one run twice), so is a cell pattern that matches no cell
    (it would run nothing, silently); a bad option is one line, not a traceback."""
    repeated = _run(os.path.join(EXPERIMENTS, "run.py"), "algorithms", "--seeds", "0,0", "--dry-run")
    assert repeated.returncode == 2 and "--seeds: expected distinct" in repeated.stderr
    mistyped = _run(os.path.join(EXPERIMENTS, "run.py"), "algorithms", "--cells", "decaf-iid,decfa-*", "--dry-run")
    assert mistyped.returncode == 2 and "--cells: decfa-* matches no cell of algorithms" in mistyped.stderr
    bad = _run(os.path.join(EXPERIMENTS, "run.py"), "algorithms", "--seeds", "99", "--cells", "decaf-iid",
               "--device", "tpu")
    assert bad.returncode == 2, bad.stderr
    assert bad.stderr.strip().splitlines() == ["experiments/run.py: error: device must be cpu, cuda, cuda:N or auto, "
                                               "got 'tpu'"]


def _write_records(folder, config, records):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "summary.json").write_text("{}")


def test_report_sections_for_the_mechanism_the_llm_and_rank_collapse(tmp_path):
    """The three sections appear only with runs that carry their metrics, from the per-seed numbers; an older run
    without the mixing error is left out of the mechanism section, not counted as 0."""
    report = _report()
    results = tmp_path / "results"
    for seed in range(3):
        for algorithm, error in (("dlora", 0.3), ("decaf", 0.1), ("dlora_fa", 1e-8), ("fedavg", 0.5)):
            records = [{"round": k, "acc_mean": 0.8, "avg_model_acc": 0.8, "mixing_error": error * k + 0.01 * seed}
                       for k in (2, 4)]
            _write_records(results / "algorithms" / f"{algorithm}-dir0.5-s{seed}", {"seed": seed, "agents": 10},
                           records)
        _write_records(results / "algorithms" / f"dlora-iid-s{seed}", {"seed": seed, "agents": 10},
                       [{"round": 2, "acc_mean": 0.8, "avg_model_acc": 0.8}])  # committed before the metric
        for algorithm, f1 in (("decaf", 0.80), ("dlora", 0.75)):
            _write_records(results / "llm" / f"{algorithm}-dir0.5-s{seed}", {"seed": seed, "agents": 4},
                           [{"round": 4, "acc_mean": 0.9, "avg_model_acc": 0.9, "macro_f1_mean": f1 + 0.01 * seed,
                             "avg_model_macro_f1": f1}])
        ranks = [[1.5, 3.0, 5.0, 9.0], [1.2, 2.0, 2.5, 3.0]]  # agents of ranks 2, 4, 8, 16 at two evaluations
        _write_records(results / "rank_collapse" / f"decaf-mixed-s{seed}",
                       {"seed": seed, "agents": 4, "rank": "cycle:2,4,8,16"},
                       [{"round": k, "acc_mean": 0.8, "avg_model_acc": 0.8, "effective_rank_agents": ranks[i],
                         "min_rank_energy_agents": [1.0, 0.9, 0.8, 0.5 + 0.2 * i]} for i, k in enumerate((2, 4))])
    out = tmp_path / "out" / "RESULTS.md"
    built = report.Report(str(results), str(out))
    rows = built.llm_rows()
    report.adjust(rows)
    mechanism, llm, collapse = built.mechanism(), built.llm(rows), built.rank_collapse()
    assert "| dir0.5 | dlora | 3 | 1.2100 ± 0.0100 | 0.9100 ± 0.0100 |" in mechanism  # 0.3k + 0.01s, k = 2, 4
    assert "| 8 | 0.4100 ± 0.0100 | 1.2100 ± 0.0100 |" in mechanism  # r = 8: the algorithms suite's dir0.5
    assert "| iid | dlora | 0 | not logged yet |" in mechanism
    assert (tmp_path / "out" / "results_plots" / "mechanism_mixing.png").stat().st_size > 0
    assert "| decaf | 3 | 0.810 ± 0.010 |" in llm and "| dlora | 3 | 0.760 ± 0.010 |" in llm
    assert "| decaf − dlora | 3 | +0.050 |" in llm  # paired macro-F1 differences, all 0.05
    assert "| decaf | 16 | 3 | 9.00 ± 0.00 | 3.00 ± 0.00 | 0.700 ± 0.000 |" in collapse
    assert "decaf: rank-16 agents' effective rank 9.00 → 3.00" in collapse
    assert (tmp_path / "out" / "results_plots" / "rank_collapse.png").stat().st_size > 0
    (tmp_path / "empty" / "algorithms").mkdir(parents=True)
    bare = report.Report(str(tmp_path / "empty"), str(tmp_path / "none" / "RESULTS.md"))
    assert bare.llm_rows() == [] and bare.llm([]) is None and bare.mechanism() is None and bare.rank_collapse() is None
