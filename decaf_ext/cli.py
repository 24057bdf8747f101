"""The ``decaf-train`` command line: argument parsing, the commands, and one-line errors.

    decaf-train                               the offline default (DeCAF, 10 agents, ring, MiniLM, BBC News)
    decaf-train --config run.yaml --rank 4    YAML options, overridden by flags
    decaf-train --compare local,fedavg,dlora,decaf,dlora_fa    same data and seeds, one table + compare.json
    decaf-train --seeds 0,1,2                 the same run over several seeds, mean ± std across seeds
    decaf-train --resume RUN_DIR [--rounds N] continue a run from its newest checkpoint
    decaf-train --launcher dist --nproc 4 ... one process per agent (torchrun: see docs/distributed.md)
    decaf-train plot RUN_DIR... -o acc.png    accuracy vs round per run
    decaf-train predict ADAPTER_DIR --text T  label names predicted by an exported adapter

Nothing heavy (torch, transformers) is imported before the arguments are parsed, so ``--help`` and mistakes in
the flags answer at once. User mistakes (:class:`~decaf_ext.errors.ConfigError`, argparse errors) print one
line ``decaf-train: error: ...`` and exit with status 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import statistics
import sys
import typing
from dataclasses import fields
from datetime import datetime
from typing import Any, Callable, Sequence

from decaf_ext import __version__
from decaf_ext.config import RENAMED, RESUMABLE, TrainConfig, build_config, convert_value, field_types, load_saved, \
    registry_names
from decaf_ext.errors import ConfigError, first_line

PROG = "decaf-train"
LAUNCHERS = ("sim", "dist")
DISTRIBUTED_FLAGS = ("nproc", "max_restarts", "backend", "round_timeout", "startup_timeout")
RUN_FLAGS = ("config", "compare", "seeds", "resume", "list", "imports")


class OneLineParser(argparse.ArgumentParser):
    """argparse that raises ConfigError (shown as one line by :func:`guarded`) instead of printing usage."""

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(message)


# ---------------------------------------------------------------------------------------------- parsers


def build_parser(prog: str = PROG) -> OneLineParser:
    """Flags: one per TrainConfig field (``--local-steps`` for local_steps), the run modes, the distributed flags."""
    parser = OneLineParser(prog=prog, argument_default=argparse.SUPPRESS,
                           description="Decentralized LoRA fine-tuning of N agents (see docs/training.md). "
                                       "Subcommands: 'plot RUN_DIR... -o FILE' (see 'plot --help'), "
                                       "'predict ADAPTER_DIR --text T' (see 'predict --help').")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    modes = parser.add_argument_group("run modes")
    modes.add_argument("--config", metavar="FILE", help="YAML file of options (flags override it)")
    modes.add_argument("--compare", metavar="ALGS", help="comma-separated algorithms to run on identical data "
                                                         "and seeds: one table and compare.json")
    modes.add_argument("--seeds", metavar="S,S,...", help="run the same configuration once per seed (mean ± std "
                                                          "across seeds); works with --compare")
    modes.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its newest "
                                                           f"checkpoint (may change: {', '.join(RESUMABLE)})")
    modes.add_argument("--list", action="store_true", help="list the registered algorithms, topologies, "
                                                           "mixing rules, partitions and tasks, then exit")
    modes.add_argument("--import", dest="imports", action="append", metavar="MODULE",
                       help="import MODULE first (repeatable; searched in the current folder too), e.g. one that "
                            "registers your own strategy: --import my_strategy --algorithm damped_dlora")
    options = parser.add_argument_group("training options (also YAML keys; 'none' clears an optional value)")
    types = field_types()
    aliases = {new: old for old, new in RENAMED.items()}
    for f in fields(TrainConfig):
        flags = ["--" + f.name.replace("_", "-")] + (["--" + aliases[f.name]] if f.name in aliases else [])
        if types[f.name] is bool:
            options.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction,
                                 help=f"{f.metadata['help']} (default: {f.default})")
        else:
            default = "" if f.default is None else f" (default: {f.default})"
            options.add_argument(*flags, dest=f.name, metavar=f.name.split("_")[-1].upper(),
                                 help=f.metadata["help"] + default)
    add_distributed_arguments(parser)
    return parser


def add_distributed_arguments(parser: argparse.ArgumentParser) -> None:
    """--launcher and the flags of a distributed run (one process per agent; see docs/distributed.md)."""
    group = parser.add_argument_group("distributed (one process per agent, --launcher dist)")
    group.add_argument("--launcher", choices=LAUNCHERS, help="sim: simulate every agent in this process "
                                                             "(default); dist: one process per agent")
    group.add_argument("--nproc", type=int, metavar="N",
                       help="start N local processes, one per agent (without it: run as one agent of torchrun)")
    group.add_argument("--max-restarts", type=int, metavar="K",
                       help="with --nproc: restart a failed agent up to K times; it rejoins from its checkpoint")
    group.add_argument("--backend", metavar="NAME", help="auto (nccl on CUDA, else gloo), gloo or nccl")
    group.add_argument("--round-timeout", type=float, metavar="S",
                       help="seconds an agent waits for the others in a round before leaving them out")
    group.add_argument("--startup-timeout", type=float, metavar="S",
                       help="seconds to wait for every agent at start, model loading included")


def plot_parser(prog: str) -> OneLineParser:
    from decaf_ext.plot import AXES, METRICS

    parser = OneLineParser(prog=prog, description="Plot runs' metrics against rounds (or bytes sent).")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders or folders holding runs")
    parser.add_argument("-o", "--output", default="accuracy.png", help="image file (default: accuracy.png)")
    parser.add_argument("--metric", default=METRICS[0], choices=METRICS, help=f"what to plot (default: {METRICS[0]})")
    parser.add_argument("--x", default=AXES[0], choices=AXES, help=f"horizontal axis (default: {AXES[0]})")
    return parser


def predict_parser(prog: str) -> OneLineParser:
    parser = OneLineParser(prog=prog, description="Classify texts with an exported adapter; prints one label "
                                                  "name per text (tab, then the text).")
    parser.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="an exported adapter, e.g. RUN/adapters/average")
    parser.add_argument("--text", action="append", default=[], metavar="TEXT", help="a text to classify (repeatable)")
    parser.add_argument("--file", metavar="FILE", help="a file with one text per line ('-': standard input)")
    parser.add_argument("--max-len", type=int, default=None, metavar="LEN",
                        help="tokens per text (default: the run's max_len)")
    parser.add_argument("--batch-size", type=int, default=64, metavar="B", help="texts per forward pass")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    return parser


# -------------------------------------------------------------------------------------------- formatting


def _reports_f1(summary: dict[str, Any]) -> bool:
    """Whether the run's task is scored by macro-F1 (the causal LM's paper metric) next to accuracy."""
    return summary.get("task") == "causal_lm"


def format_result(summary: dict[str, Any]) -> str:
    """One line: final mean test accuracy ± std (and macro-F1 where the task reports it), averaged-model
    accuracy, consensus error, bytes, timings."""
    final, per_round = summary["final"], summary["seconds_per_round"]
    f1 = (f" | macro-F1 {final['macro_f1_mean']:.4f}, averaged model {final['avg_model_macro_f1']:.4f}"
          if _reports_f1(summary) else "")
    return (f"{summary['algorithm']} {summary['topology']} x{summary['agents']} | round {final['round']}: "
            f"test acc {final['acc_mean']:.4f} ± {final['acc_std']:.4f} | averaged model {final['avg_model_acc']:.4f}"
            f"{f1} | consensus error {final['consensus_error']:.3g} | sent {final['bytes_sent'] / 1e6:.2f} MB"
            f" | {per_round['local']:.2f} s local + {per_round['comm']:.3f} s comm per round"
            f" | {summary['run_dir']}")


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[k]) for row in rows) for k in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows)


def format_table(summaries: dict[str, dict[str, Any]]) -> str:
    """Comparison table, one row per algorithm (an averaged-model F1 column where the task reports F1)."""
    f1 = any(_reports_f1(s) for s in summaries.values())
    rows = [("algorithm", "acc mean ± std", "avg model", "macro-F1", *(("avg model F1",) if f1 else ()),
             "consensus err", "MB sent", "local s/round", "comm s/round")]
    for name, s in summaries.items():
        final, per_round = s["final"], s["seconds_per_round"]
        rows.append((name, f"{final['acc_mean']:.4f} ± {final['acc_std']:.4f}", f"{final['avg_model_acc']:.4f}",
                     f"{final['macro_f1_mean']:.4f}", *((f"{final['avg_model_macro_f1']:.4f}",) if f1 else ()),
                     f"{final['consensus_error']:.3g}", f"{final['bytes_sent'] / 1e6:.2f}",
                     f"{per_round['local']:.3f}", f"{per_round['comm']:.4f}"))
    return _table(rows)


ACROSS_SEEDS = ("acc_mean", "acc_std", "avg_model_acc", "macro_f1_mean", "avg_model_macro_f1", "consensus_error",
                "bytes_sent")


def across_seeds(summaries: dict[int, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """{metric: {mean, std}} over seeds of the final metrics (std: sample std, 0 for one seed)."""
    result = {}
    for key in ACROSS_SEEDS:
        values = [s["final"][key] for s in summaries.values()]
        result[key] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}
    return result


def format_seed_table(stats: dict[str, dict[str, dict[str, float]]], seeds: list[int]) -> str:
    """One row per algorithm: mean ± std across `seeds` of the final metrics."""
    rows = [(f"algorithm ({len(seeds)} seeds)", "acc mean (agents)", "avg model", "macro-F1", "consensus err",
             "MB sent")]
    def cell(values: dict[str, float], scale: float = 1.0, fmt: str = ".4f") -> str:
        return f"{values['mean'] / scale:{fmt}} ± {values['std'] / scale:{fmt}}"

    for name, s in stats.items():
        rows.append((name, cell(s["acc_mean"]), cell(s["avg_model_acc"]), cell(s["macro_f1_mean"]),
                     cell(s["consensus_error"], fmt=".3g"), cell(s["bytes_sent"], 1e6, ".2f")))
    return _table(rows)


# ---------------------------------------------------------------------------------------------- commands


def resume_config(run_dir: str, overrides: dict[str, Any]) -> TrainConfig:
    """The saved config of `run_dir` with the allowed `overrides` applied."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"resume: {run_dir!r} holds no run (no config.json)")
    changed = sorted(set(overrides) - set(RESUMABLE))
    if changed:
        raise ConfigError(f"resume: only {', '.join(RESUMABLE)} may change when resuming, not {', '.join(changed)}")
    config = TrainConfig.from_dict({**load_saved(path), **overrides, "output_dir": run_dir}, source=path)
    config.validate()
    return config


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2] (distinct integers)."""
    try:
        seeds = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise ConfigError(f"seeds: expected comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds: expected distinct comma-separated integers, got {text!r}")
    return seeds


def _default_root(config: TrainConfig, kind: str) -> str:
    return config.output_dir or os.path.join("runs", f"{kind}-{datetime.now():%Y%m%d-%H%M%S}")


def _write_json(path: str, value: Any) -> None:
    from decaf_ext.trainer import write_json

    write_json(path, value)
    print(f"wrote {path}")


def _run_one(config: TrainConfig, *, announce: bool) -> dict[str, Any]:
    """Train one configuration and print its result line (with the data/partition overview when `announce`)."""
    from decaf_ext.data import format_histograms, label_histograms
    from decaf_ext.trainer import Trainer

    trainer = Trainer(config)
    if announce:
        sizes = [len(p) for p in trainer.parts]
        params = trainer.trainable_params  # one count, or one per agent when their ranks differ
        params = f"{min(params):,}-{max(params):,}" if isinstance(params, list) else f"{params:,}"
        print(f"{len(trainer.train_set)} training examples over {config.agents} agents ({config.partition}, "
              f"{min(sizes)}-{max(sizes)} each), {len(trainer.test_set)} test examples; topology "
              f"{config.topology}, spectral gap {trainer.schedule.spectral_gap:.3f}; {params} "
              f"trainable parameters per agent; run folder {trainer.run_dir}", flush=True)
        print(format_histograms(label_histograms(trainer.train_labels, trainer.parts, len(trainer.label_names)),
                                trainer.label_names), flush=True)
    summary = trainer.run()
    print(format_result(summary), flush=True)
    return summary


def _with(config: TrainConfig, **changes: Any) -> TrainConfig:
    """`config` with `changes`, validated, its run folder checked to be free (before anything is trained)."""
    from decaf_ext.trainer import check_free

    changed = TrainConfig(**{**config.to_dict(), **changes})
    changed.validate()
    if changed.output_dir is not None:
        check_free(changed.output_dir)
    return changed


def _compare(config: TrainConfig, algorithms: list[str], seeds: list[int] | None) -> int:
    known = registry_names()["algorithm"]
    if not algorithms:
        raise ConfigError("compare: name at least one algorithm")
    for name in algorithms:
        if name not in known:
            raise ConfigError(f"compare: unknown algorithm {name!r} (choose from {', '.join(known)})")
    root = _default_root(config, "compare")
    if seeds is None:
        configs = {name: _with(config, algorithm=name, output_dir=os.path.join(root, name)) for name in algorithms}
        summaries = {name: _run_one(run_config, announce=False) for name, run_config in configs.items()}
        print(format_table(summaries))
        _write_json(os.path.join(root, "compare.json"), {"config": config.to_dict(), "runs": summaries})
        return 0
    configs = {name: {seed: _with(config, algorithm=name, seed=seed,
                                  output_dir=os.path.join(root, name, f"seed{seed}")) for seed in seeds}
               for name in algorithms}
    runs = {name: {seed: _run_one(c, announce=False) for seed, c in by_seed.items()}
            for name, by_seed in configs.items()}
    stats = {name: across_seeds(by_seed) for name, by_seed in runs.items()}
    print(format_seed_table(stats, seeds))
    _write_json(os.path.join(root, "compare.json"), {"config": config.to_dict(), "seeds": seeds, "runs": runs,
                                                      "across_seeds": stats})
    return 0


def _seeded(config: TrainConfig, seeds: list[int]) -> int:
    root = _default_root(config, f"{config.algorithm}-{config.topology}")
    configs = {seed: _with(config, seed=seed, output_dir=os.path.join(root, f"seed{seed}")) for seed in seeds}
    runs = {seed: _run_one(c, announce=False) for seed, c in configs.items()}
    stats = across_seeds(runs)
    print(format_seed_table({config.algorithm: stats}, seeds))
    _write_json(os.path.join(root, "seeds.json"), {"config": config.to_dict(), "seeds": seeds, "runs": runs,
                                                    "across_seeds": stats})
    return 0


def import_modules(names: Sequence[str]) -> None:
    """Import each module of `names` (the current folder searched too, as ``python -m`` does), so that what it
    registers (strategies, tasks) exists before the configuration is checked; ConfigError if one is not found."""
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    for name in names:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name is None or not (name == error.name or name.startswith(error.name + ".")):
                raise  # a module that the user's module imports is missing: its own traceback
            raise ConfigError(f"import: no module named {name!r} (in the current folder or on sys.path)") from None


def _list() -> int:
    for name, choices in registry_names().items():
        print(f"{name}: {', '.join(choices)}")
    return 0


def _distributed(argv: Sequence[str], prog: str, config: TrainConfig, resume: str | None,
                 launch_options: dict[str, Any]) -> int:
    """One agent of a distributed run (under torchrun or the launcher), or, with --nproc, the local launcher."""
    from decaf_ext.distributed import DistributedOptions, launch, run_distributed
    from decaf_ext.trainer import check_free

    nproc, max_restarts = launch_options.pop("nproc", None), launch_options.pop("max_restarts", None) or 0
    options = DistributedOptions(**launch_options)
    options.validate()
    if nproc is None or "RANK" in os.environ:
        summary = run_distributed(config, resume=resume is not None, options=options)
        if summary["distributed"]["reporter"]:
            print(format_result(summary), flush=True)
        return 0
    if nproc != config.agents:
        raise ConfigError(f"nproc: {nproc} processes for {config.agents} agents (one process per agent)")
    output_dir = _default_root(config, f"{config.algorithm}-{config.topology}")
    if resume is None:
        check_free(output_dir)  # once here rather than once per agent
    named = [] if config.output_dir else ["--output-dir", output_dir]
    statuses = launch([sys.executable, "-m", "decaf_ext.train", *argv, "--launcher", "dist", *named], nproc,
                      max_restarts=max_restarts)
    failed = {rank: code for rank, code in enumerate(statuses) if code != 0}
    if failed:
        print(f"{prog}: agents {sorted(failed)} failed (exit status {', '.join(map(str, failed.values()))}); "
              f"see {output_dir}", file=sys.stderr)
    return 1 if failed else 0


def train_command(argv: Sequence[str], prog: str = PROG) -> int:
    """The main command (training, comparison, seeds, resume, distributed); returns the exit status."""
    options = vars(build_parser(prog).parse_args(argv))
    run = {name: options.pop(name, None) for name in RUN_FLAGS}
    import_modules(run["imports"] or [])
    launcher = options.pop("launcher", "sim")
    launch_options = {name: options.pop(name) for name in DISTRIBUTED_FLAGS if name in options}
    if run["list"]:
        return _list()
    if launcher == "sim" and launch_options:
        flags = ", ".join("--" + name.replace("_", "-") for name in launch_options)
        raise ConfigError(f"launcher: {flags} need --launcher dist")
    if launcher == "dist":
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # c10d's per-socket timeout warnings during faults
    overrides = {name: convert_value(name, value) for name, value in options.items()}
    seeds = parse_seeds(run["seeds"]) if run["seeds"] is not None else None
    if seeds is not None and "seed" in overrides:
        raise ConfigError("seeds: give either --seed or --seeds")
    if run["resume"] is not None:
        if any(run[name] is not None for name in ("config", "compare", "seeds")):
            raise ConfigError("resume: --config, --compare and --seeds cannot be combined with --resume")
        config = resume_config(run["resume"], overrides)
    else:
        config = build_config(run["config"], overrides)
    _quiet_terminal(prog, launcher)
    if launcher == "dist":
        if run["compare"] is not None or seeds is not None:
            raise ConfigError("compare: --compare and --seeds are not available in a distributed run "
                              "(launch one run per algorithm and seed)")
        return _distributed(argv, prog, config, run["resume"], launch_options)
    if run["resume"] is not None:
        from decaf_ext.trainer import Trainer

        print(format_result(Trainer(config).run(resume=True)))
        return 0
    if run["compare"] is not None:
        return _compare(config, [name.strip() for name in run["compare"].split(",") if name.strip()], seeds)
    if seeds is not None:
        return _seeded(config, seeds)
    _run_one(_with(config), announce=True)
    return 0


def plot_command(argv: Sequence[str], prog: str = f"{PROG} plot") -> int:
    """``plot RUN_DIR... -o FILE [--metric M] [--x round|bytes_sent]``; returns the exit status."""
    args = plot_parser(prog).parse_args(argv)
    from decaf_ext.plot import plot_runs

    plot_runs(args.run_dirs, args.output, metric=args.metric, x=args.x)
    print(f"wrote {args.output}")
    return 0


def predict_command(argv: Sequence[str], prog: str = f"{PROG} predict") -> int:
    """``predict ADAPTER_DIR (--text T ... | --file F)``: one line per text, label name TAB text."""
    args = predict_parser(prog).parse_args(argv)
    if bool(args.text) == bool(args.file):
        raise ConfigError("predict: give texts with --text or a file with --file (one of the two)")
    if args.file is not None:
        try:
            handle = sys.stdin if args.file == "-" else open(args.file, encoding="utf-8")
            with handle:
                texts = [line.rstrip("\n") for line in handle if line.strip()]
        except OSError as error:
            raise ConfigError(f"file: cannot read {args.file!r} ({error.strerror})") from None
    else:
        texts = args.text
    _quiet_terminal(prog, "sim")
    from decaf_ext.predict import Classifier

    classifier = Classifier.load(args.adapter_dir, device=args.device, max_len=args.max_len)
    for label, text in zip(classifier.predict(texts, batch_size=args.batch_size), texts):
        print(f"{label}\t{text}")
    return 0


# ------------------------------------------------------------------------------------------ entry point


def _quiet_terminal(prog: str, launcher: str) -> None:
    """Our warnings as one line each under this command's name; transformers' notices and bars off for good."""
    import warnings

    import transformers

    agent = f"[agent {os.environ.get('RANK', '-')}] " if launcher == "dist" else ""
    logging.basicConfig(format=f"{prog}: {agent}%(levelname)s: %(message)s")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


def guarded(command: Callable[[Sequence[str], str], int], argv: Sequence[str], prog: str) -> int:
    """Run `command(argv, prog)`; a user mistake (ConfigError) becomes one line on stderr and status 2.

    Every other exception propagates with its traceback: it is a bug, not a mistake of the user's.
    """
    try:
        return command(argv, prog)
    except ConfigError as error:
        print(f"{prog}: error: {first_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted (continue with --resume RUN_DIR: checkpoints are written every "
              "--checkpoint-every rounds)", file=sys.stderr)
        return 130


SUBCOMMANDS: dict[str, Callable[[Sequence[str], str], int]] = {"plot": plot_command, "predict": predict_command}


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    """Entry point of ``decaf-train``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] in SUBCOMMANDS:
        return guarded(SUBCOMMANDS[argv[0]], argv[1:], f"{prog} {argv[0]}")
    return guarded(train_command, argv, prog)


if __name__ == "__main__":
    sys.exit(main())
