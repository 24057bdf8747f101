"""The experiment tooling on the committed results: the report builds, and run.py lists and skips finished runs."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(ROOT, "experiments")


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_report_builds_from_the_committed_results(tmp_path):
    out = tmp_path / "RESULTS.md"
    done = _run(os.path.join(EXPERIMENTS, "report.py"), "--output", str(out))
    assert done.returncode == 0, done.stderr
    text = out.read_text()
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
    for suite in ("algorithms", "topologies", "rank", "agents", "split", "compression", "mixed_ranks", "clip"):
        dry = _run(os.path.join(EXPERIMENTS, "run.py"), suite, "--dry-run")
        listed += int(re.search(r"runs, (\d+) done", dry.stdout).group(1))
    assert reported == listed


def test_run_dry_run_counts_finished_runs():
    done = _run(os.path.join(EXPERIMENTS, "run.py"), "algorithms", "--seeds", "0", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "suite algorithms: 15 runs, 15 done, 0 to go" in done.stdout
    bad = _run(os.path.join(EXPERIMENTS, "run.py"), "nonsense")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def _report():
    """experiments/report.py as a module."""
    if EXPERIMENTS not in sys.path:
        sys.path.insert(0, EXPERIMENTS)
    import report
    return report


def _cell(name, accuracies):
    report = _report()
    return report.Cell(name, [report.Seeded({"seed": seed}, [{"acc_mean": acc}], {})
                              for seed, acc in enumerate(accuracies)])


def test_verdict_counts_settings_by_the_seed_spread_rule():
    report = _report()
    ahead = report.contrast(_cell("a", [0.90, 0.91, 0.92]), _cell("b", [0.80, 0.81, 0.82]), "a", "b")
    close = report.contrast(_cell("a", [0.80, 0.85, 0.90]), _cell("b", [0.82, 0.84, 0.86]), "a", "b")
    behind = report.contrast(_cell("a", [0.70, 0.71, 0.72]), _cell("b", [0.80, 0.81, 0.82]), "a", "b")
    one_seed = report.contrast(_cell("a", [0.9]), _cell("b", [0.8]), "a", "b")
    assert (ahead.distinguishable, close.distinguishable, behind.distinguishable, one_seed.distinguishable) == \
        (True, False, True, None)
    assert "distinguishable)" in ahead.text and "not a finding" in one_seed.text
    settings = [ahead, close, behind, one_seed]
    assert report.verdict("ahead", settings) == \
        "Verdict: the data agree in 1 of 4 setting(s), contradict in 1, cannot tell in 2."
    assert report.verdict("not behind", settings) == \
        "Verdict: the data agree in 2 of 4 setting(s), contradict in 1, cannot tell in 1."
    assert report.verdict("behind", settings) == \
        "Verdict: the data agree in 1 of 4 setting(s), contradict in 1, cannot tell in 2."
    assert report.verdict("ahead", [report.contrast(None, None, "a", "b")]) == "Verdict: no data yet."


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
