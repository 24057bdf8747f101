"""Run an experiment suite, resumably: ``python experiments/run.py SUITE [--seeds 0,1,2] [--device cuda]``.

Also ``--cells 'decaf-*,dlora-iid'`` (only those cells) and ``--dry-run`` (list the runs, train none).

Each run trains in a scratch folder ``runs/experiments/<suite>/<run>/`` (checkpointed every evaluation) and, once
finished, its ``config.json``, ``metrics.jsonl`` and ``summary.json`` are copied to
``experiments/results/<suite>/<run>/`` (summary last). A run whose results hold summary.json is skipped; an
interrupted run resumes from its newest checkpoint, or restarts from scratch when it has none.
Runs go in seed-major order (every cell with seed 0, then seed 1, ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import os
import resource
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from suites import DEFAULT_SEEDS, SPLIT_FIELDS, SUITES, Run, Suite  # noqa: E402

RESULTS = os.path.join(HERE, "results")
SCRATCH = os.path.join(os.path.dirname(HERE), "runs", "experiments")
KEPT = ("config.json", "metrics.jsonl", "summary.json")  # copied in this order: summary.json marks a finished run


def result_dir(run: Run) -> str:
    return os.path.join(RESULTS, run.suite, run.key)


def is_done(run: Run) -> bool:
    return os.path.isfile(os.path.join(result_dir(run), "summary.json"))


def config_fields() -> set[str]:
    from decaf_ext.config import TrainConfig

    return {f.name for f in dataclasses.fields(TrainConfig)}


def adapt_overrides(run: Run, fields: set[str]) -> dict:
    """The run's overrides with the factor-split option renamed to the TrainConfig field that exists."""
    overrides = dict(run.overrides)
    if "split" in overrides:
        field = next(name for name in SPLIT_FIELDS if name in fields)
        overrides[field] = overrides.pop("split")
    return overrides


def make_trainer(config, byzantine: dict | None):
    """A Trainer for `config`; with `byzantine` ({"agents": [...], "kind": ...}, a cell of the byzantine suite) its
    strategy is wrapped in the test-only fault of python_tests/faults.py (imported only here, only then)."""
    from decaf_ext.sim.trainer import Trainer

    trainer = Trainer(config)
    if byzantine:
        sys.path.insert(0, os.path.join(os.path.dirname(HERE), "python_tests"))
        from faults import ByzantineAgents

        agents = trainer.agents
        agents.strategy = ByzantineAgents(agents.strategy, byzantine["agents"], byzantine["kind"], agents.layout)
    return trainer


def honest_accuracy(scratch: str, byzantine: dict) -> float:
    """Mean final accuracy of the agents that are not Byzantine."""
    with open(os.path.join(scratch, "metrics.jsonl")) as lines:
        accuracies = json.loads(lines.read().splitlines()[-1])["acc_agents"]
    honest = [a for i, a in enumerate(accuracies) if i not in byzantine["agents"]]
    return sum(honest) / len(honest)


def train_one(run: Run, device: str, fields: set[str]) -> dict:
    """Train (or resume) `run` in its scratch folder, then copy the kept files to its result folder (with a
    Byzantine fault, also byzantine.json: the Byzantine agents, what they send and the honest agents' accuracy)."""
    from decaf_ext.config import TrainConfig
    from decaf_ext.errors import ConfigError

    scratch = os.path.join(SCRATCH, run.suite, run.key)
    overrides = {**adapt_overrides(run, fields), "device": device, "output_dir": scratch,
                 "checkpoint_every": run.overrides["eval_every"]}
    byzantine = overrides.pop("byzantine", None)
    config = TrainConfig.from_dict(overrides)
    config.validate()
    resume = os.path.isdir(os.path.join(scratch, "checkpoints"))
    if not resume:
        shutil.rmtree(scratch, ignore_errors=True)
    try:
        summary = make_trainer(config, byzantine).run(resume=resume)
    except ConfigError:
        if not resume:
            raise
        print(f"  {run.key}: its checkpoint cannot be resumed; restarting from scratch", flush=True)
        shutil.rmtree(scratch, ignore_errors=True)
        summary = make_trainer(config, byzantine).run()
    target = result_dir(run)
    temporary = target + ".tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    os.makedirs(temporary)
    if byzantine:
        summary["honest_acc"] = honest_accuracy(scratch, byzantine)
        with open(os.path.join(temporary, "byzantine.json"), "w") as out:
            json.dump({**byzantine, "honest_acc": summary["honest_acc"]}, out)
    for name in KEPT:
        shutil.copyfile(os.path.join(scratch, name), os.path.join(temporary, name))
    shutil.rmtree(target, ignore_errors=True)
    os.rename(temporary, target)
    shutil.rmtree(scratch, ignore_errors=True)
    return summary


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (all threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def runnable(suite: Suite, fields: set[str]) -> str | None:
    """Why `suite` cannot run with this TrainConfig (None when it can)."""
    if suite.source is not None:
        return f"suite {suite.name!r} has no runs of its own: it reads the {suite.source!r} suite's results"
    if suite.needs_field and not fields.intersection(suite.needs_field):
        return (f"suite {suite.name!r} needs a TrainConfig field {' or '.join(map(repr, suite.needs_field))}, "
                "which this version of decaf_ext lacks; skipped")
    return None


def parse_seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError("expected at least one seed")
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct seeds, got {text!r}")
    return seeds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="experiments/run.py", description=__doc__.splitlines()[0])
    parser.add_argument("suite", choices=sorted(SUITES))
    parser.add_argument("--seeds", type=parse_seeds, default=DEFAULT_SEEDS,
                        help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--cells", type=lambda text: tuple(text.split(",")), default=("*",),
                        help="comma-separated cell names or shell patterns to run (default: every cell)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default cpu)")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and whether each is done; train none")
    args = parser.parse_args(argv)
    suite = SUITES[args.suite]
    fields = config_fields()
    reason = runnable(suite, fields)
    if reason is not None:
        print(reason)
        return 0
    runs = [run for run in suite.runs(args.seeds) if any(fnmatch.fnmatchcase(run.name, p) for p in args.cells)]
    unmatched = [p for p in args.cells if not any(fnmatch.fnmatchcase(run.name, p) for run in suite.runs(args.seeds))]
    if unmatched:  # a mistyped cell would otherwise run nothing, silently
        parser.error(f"--cells: {', '.join(unmatched)} matches no cell of {suite.name} "
                     f"({', '.join(sorted({run.name for run in suite.runs(args.seeds)}))})")
    todo = [run for run in runs if not is_done(run)]
    print(f"suite {suite.name}: {len(runs)} runs, {len(runs) - len(todo)} done, {len(todo)} to go", flush=True)
    if args.dry_run:
        for run in runs:
            print(f"  {'done' if is_done(run) else 'todo'}  {run.key}")
        return 0
    from decaf_ext.errors import ConfigError, first_line

    for index, run in enumerate(todo, start=1):
        start, cpu = time.perf_counter(), cpu_seconds()
        try:
            summary = train_one(run, args.device, fields)
        except ConfigError as error:  # a user mistake (e.g. --device): one line, like decaf-train
            print(f"{parser.prog}: error: {first_line(error)}", file=sys.stderr)
            return 2
        final = summary["final"]
        honest = f"honest {summary['honest_acc']:.4f}, " if "honest_acc" in summary else ""
        print(f"[{index}/{len(todo)}] {run.suite}/{run.key}: {honest}acc {final['acc_mean']:.4f} ± "
              f"{final['acc_std']:.4f}, averaged {final['avg_model_acc']:.4f}, macro-F1 {final['macro_f1_mean']:.4f}, "
              f"{time.perf_counter() - start:.0f} s wall, "
              f"{cpu_seconds() - cpu:.0f} CPU s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
