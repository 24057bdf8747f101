"""Command line ``decaf-train`` (also ``python -m decaf_ext.train``).

    decaf-train                               the offline default (DeCAF, 10 agents, ring, MiniLM, BBC News)
    decaf-train --config run.yaml --rank 4    YAML options, overridden by flags
    decaf-train --compare local,fedavg,dlora,decaf,dlora_fa    same data and seeds, one table + compare.json
    decaf-train --resume RUN_DIR [--rounds N] continue a run from its newest checkpoint
    decaf-train --launcher dist --nproc 4 ... one process per agent (torchrun: see docs/distributed.md)
    decaf-train plot RUN_DIR... -o acc.png    accuracy vs round per run

User mistakes print one line ``decaf-train: error: ...`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import typing
import warnings
from dataclasses import fields
from datetime import datetime
from typing import Any, Callable, Sequence

from decaf_ext.config import ConfigError, TrainConfig, build_config, convert_value, field_types, first_line
from decaf_ext.strategies import STRATEGIES

PROG = "decaf-train"
RESUMABLE = ("rounds", "eval_every", "checkpoint_every", "device", "progress")
LAUNCHERS = ("sim", "dist")


class OneLineParser(argparse.ArgumentParser):
    """argparse that raises ConfigError (shown as one line by :func:`guarded`) instead of printing usage."""

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    """Flags: one per TrainConfig field (``--local-steps`` for local_steps), plus --config/--compare/--resume."""
    parser = OneLineParser(prog=PROG, argument_default=argparse.SUPPRESS,
                           description="Decentralized LoRA fine-tuning (local, fedavg, dlora, decaf, dlora_fa); "
                                       "see docs/training.md. Subcommand: plot RUN_DIR... -o FILE.")
    parser.add_argument("--config", metavar="FILE", help="YAML file of options (flags override it)")
    parser.add_argument("--compare", metavar="ALGS", help="comma-separated algorithms to run on identical data "
                                                          f"and seeds ({','.join(STRATEGIES)})")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its newest "
                                                            f"checkpoint (may change: {', '.join(RESUMABLE)})")
    parser.add_argument("--launcher", choices=LAUNCHERS, help="sim: simulate every agent in this process "
                        "(default); dist: one process per agent, flags of python -m decaf_ext.distributed")
    types = field_types()
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if types[f.name] is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, help=f.metadata["help"])
        else:
            parser.add_argument(flag, dest=f.name, metavar=f.name.split("_")[-1].upper(),
                                help=f"{f.metadata['help']} (default: {'-' if f.default is None else f.default})")
    return parser


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


def format_table(summaries: dict[str, dict[str, Any]]) -> str:
    """Comparison table, one row per algorithm."""
    f1 = any(_reports_f1(s) for s in summaries.values())
    header = ("algorithm", "acc mean ± std", "avg model", "macro-F1", *(("avg model F1",) if f1 else ()),
              "consensus err", "MB sent", "local s/round", "comm s/round")
    rows = [header]
    for name, s in summaries.items():
        final, per_round = s["final"], s["seconds_per_round"]
        rows.append((name, f"{final['acc_mean']:.4f} ± {final['acc_std']:.4f}", f"{final['avg_model_acc']:.4f}",
                     f"{final['macro_f1_mean']:.4f}", *((f"{final['avg_model_macro_f1']:.4f}",) if f1 else ()),
                     f"{final['consensus_error']:.3g}", f"{final['bytes_sent'] / 1e6:.2f}",
                     f"{per_round['local']:.3f}", f"{per_round['comm']:.4f}"))
    widths = [max(len(row[k]) for row in rows) for k in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows)


def resume_config(run_dir: str, overrides: dict[str, Any]) -> TrainConfig:
    """The saved config of `run_dir` with the allowed `overrides` applied."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"resume: {run_dir!r} holds no run (no config.json)")
    changed = sorted(set(overrides) - set(RESUMABLE))
    if changed:
        raise ConfigError(f"resume: only {', '.join(RESUMABLE)} may change when resuming, not {', '.join(changed)}")
    with open(path, encoding="utf-8") as handle:
        saved = json.load(handle)
    config = TrainConfig.from_dict({**saved, **overrides, "output_dir": run_dir}, source=path)
    config.validate()
    return config


def _compare(config: TrainConfig, algorithms: list[str]) -> int:
    from decaf_ext.trainer import Trainer

    if not algorithms:
        raise ConfigError("compare: name at least one algorithm")
    for name in algorithms:
        if name not in STRATEGIES:
            raise ConfigError(f"compare: unknown algorithm {name!r} (choose from {', '.join(STRATEGIES)})")
    root = config.output_dir or os.path.join("runs", f"compare-{datetime.now():%Y%m%d-%H%M%S}")
    configs = [TrainConfig(**{**config.to_dict(), "algorithm": name, "output_dir": os.path.join(root, name)})
               for name in algorithms]
    for run_config in configs:
        run_config.validate()
    summaries = {}
    for run_config in configs:
        summaries[run_config.algorithm] = Trainer(run_config).run()
        print(format_result(summaries[run_config.algorithm]), flush=True)
    print(format_table(summaries))
    with open(os.path.join(root, "compare.json"), "w", encoding="utf-8") as handle:
        json.dump({"config": config.to_dict(), "runs": summaries}, handle, indent=1)
    print(f"wrote {os.path.join(root, 'compare.json')}")
    return 0


def _train(argv: Sequence[str]) -> int:
    from decaf_ext.data import format_histograms, label_histograms
    from decaf_ext.trainer import Trainer

    options = vars(build_parser().parse_args(argv))
    yaml_path, compare, resume = (options.pop(k, None) for k in ("config", "compare", "resume"))
    overrides = {name: convert_value(name, value) for name, value in options.items()}
    if resume is not None:
        if yaml_path is not None or compare is not None:
            raise ConfigError("resume: --config and --compare cannot be combined with --resume")
        trainer = Trainer(resume_config(resume, overrides))
        print(format_result(trainer.run(resume=True)))
        return 0
    config = build_config(yaml_path, overrides)
    if compare is not None:
        return _compare(config, [name.strip() for name in compare.split(",") if name.strip()])
    trainer = Trainer(config)
    sizes = [len(p) for p in trainer.parts]
    print(f"{len(trainer.train_set)} training examples over {config.agents} agents ({config.partition}, "
          f"{min(sizes)}-{max(sizes)} each), {len(trainer.test_set)} test examples; topology {config.topology}, "
          f"spectral gap {trainer.schedule.spectral_gap:.3f}; {trainer.trainable_params:,} trainable parameters "
          f"per agent; run folder {trainer.run_dir}", flush=True)
    if config.progress:
        print(format_histograms(label_histograms(trainer.train_labels, trainer.parts, len(trainer.label_names)),
                                trainer.label_names), flush=True)
    print(format_result(trainer.run()))
    return 0


def _dispatch(argv: Sequence[str]) -> int:
    """--launcher dist hands the command line to decaf_ext.distributed (one process per agent); else simulate."""
    launcher = OneLineParser(add_help=False)
    launcher.add_argument("--launcher", choices=LAUNCHERS, default="sim")
    chosen, rest = launcher.parse_known_args(argv)
    if chosen.launcher == "dist":
        from decaf_ext.distributed import command

        return command(rest)
    return _train(rest)


def quiet_libraries() -> None:
    """Keep transformers' load reports, download bars and deprecation notices off the terminal."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


def guarded(command: Callable[[Sequence[str]], int], argv: Sequence[str], prog: str = PROG) -> int:
    """Run `command(argv)`; a user mistake (ValueError) becomes one line on stderr and status 2."""
    try:
        return command(argv)
    except ValueError as error:
        print(f"{prog}: error: {first_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted (a run with checkpoints continues with --resume RUN_DIR)", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``decaf-train``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_libraries()
    if argv[:1] == ["plot"]:
        from decaf_ext.plot import plot_command

        return guarded(plot_command, argv[1:], prog=f"{PROG} plot")
    return guarded(_dispatch, argv)


if __name__ == "__main__":
    sys.exit(main())
