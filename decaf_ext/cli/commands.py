"""The ``decaf-train`` command line: argument parsing, the commands, and one-line errors.

    decaf-train                               the offline default (DeCAF, 10 agents, ring, MiniLM, BBC News)
    decaf-train --config run.yaml --rank 4    YAML options, overridden by flags
    decaf-train --compare local,fedavg,dlora,decaf,dlora_fa    same data and seeds, one table + compare.json
    decaf-train --seeds 0,1,2                 the same run over several seeds, mean ± std across seeds
    decaf-train --resume RUN_DIR [--rounds N] continue a run from its newest checkpoint
    decaf-train --launcher dist --nproc 4 ... one process per agent (torchrun: see docs/distributed.md)
    decaf-train plot RUN_DIR... -o acc.png    accuracy vs round per run
    decaf-train predict ADAPTER_DIR --text T  the class an exported adapter predicts (--image I for CLIP)
    decaf-train provision --agents N --hosts H:P,... --out KIT   TLS kit of a run across sites (docs/deploy.md)

Nothing heavy (torch, transformers) is imported before the arguments are parsed, so ``--help`` and mistakes in
the flags answer at once. User mistakes (:class:`~decaf_ext.errors.ConfigError`, argparse errors) print one
line ``decaf-train: error: ...`` and exit with status 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Any, Callable, Sequence

from decaf_ext.cli.parser import PROG, build_parser, plot_parser, predict_parser
from decaf_ext.cli.provision import provision_command
from decaf_ext.cli.tables import across_seeds, format_result, format_seed_table, format_table
from decaf_ext.config import RESUMABLE, TrainConfig, build_config, convert_value, registry_names
from decaf_ext.storage.loading import load_saved
from decaf_ext.errors import ConfigError, first_line

DISTRIBUTED_FLAGS = ("nproc", "max_restarts", "backend", "round_timeout", "startup_timeout")
RUN_FLAGS = ("config", "compare", "seeds", "resume", "list", "imports")
# Python's safe-path flag (3.11+): the launched agents' `python -m` leaves the current folder off sys.path (--import
# still searches it). Older Pythons have no such flag: their agents search the current folder first.
SAFE_PATH = ["-P"] if sys.version_info >= (3, 11) else []


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
    from decaf_ext.storage.run_folder import default_run_dir

    return config.output_dir or default_run_dir(kind)


def _write_json(path: str, value: Any) -> None:
    from decaf_ext.storage.files import write_json

    write_json(path, value)
    print(f"wrote {path}")


def _run_one(config: TrainConfig, *, announce: bool) -> dict[str, Any]:
    """Train one configuration and print its result line (with the data/partition overview when `announce`)."""
    from decaf_ext.data.partition import format_histograms, label_histograms
    from decaf_ext.sim.trainer import Trainer

    trainer = Trainer(config)
    if announce:
        agents = trainer.agents
        sizes = [len(p) for p in agents.parts]
        params = agents.trainable_params  # one count, or one per agent when their ranks differ
        params = f"{min(params):,}-{max(params):,}" if isinstance(params, list) else f"{params:,}"
        print(f"{len(agents.train_set)} training examples over {config.agents} agents ({config.partition}, "
              f"{min(sizes)}-{max(sizes)} each), {len(agents.test_set)} test examples; topology "
              f"{config.topology}, spectral gap {agents.schedule.spectral_gap:.3f}; {params} "
              f"trainable parameters per agent; run folder {trainer.run_dir}", flush=True)
        print(format_histograms(label_histograms(agents.train_labels, agents.parts, len(agents.label_names)),
                                agents.label_names), flush=True)
    summary = trainer.run()
    print(format_result(summary), flush=True)
    return summary


def _with(config: TrainConfig, **changes: Any) -> TrainConfig:
    """`config` with `changes`, validated, its run folder checked to be free (before anything is trained)."""
    from decaf_ext.storage.run_folder import check_free

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
    """Import each module of `names` (the current folder searched too, after everything else on sys.path), so that
    what it registers (strategies, tasks) exists before the configuration is checked; ConfigError if one is not
    found. Without names the current folder stays off sys.path (no module of the command's own is taken from it)."""
    if not names:
        return
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
    from decaf_ext.storage.run_folder import check_free

    nproc, max_restarts = launch_options.pop("nproc", None), launch_options.pop("max_restarts", None) or 0
    if config.transport == "tls" and nproc is not None:
        raise ConfigError("nproc: with --transport tls start each agent on its own, with its own --kit")
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
    statuses = launch([sys.executable, *SAFE_PATH, "-m", "decaf_ext.cli", *argv, "--launcher", "dist", *named],
                      nproc, max_restarts=max_restarts)
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
    if launcher == "sim" and config.transport != "gloo":
        raise ConfigError(f"transport: --transport {config.transport} needs --launcher dist")
    if launcher == "dist":
        if run["compare"] is not None or seeds is not None:
            raise ConfigError("compare: --compare and --seeds are not available in a distributed run "
                              "(launch one run per algorithm and seed)")
        return _distributed(argv, prog, config, run["resume"], launch_options)
    if run["resume"] is not None:
        from decaf_ext.sim.trainer import Trainer

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
    from decaf_ext.cli.plot import plot_runs

    plot_runs(args.run_dirs, args.output, metric=args.metric, x=args.x)
    print(f"wrote {args.output}")
    return 0


def predict_command(argv: Sequence[str], prog: str = f"{PROG} predict") -> int:
    """``predict ADAPTER_DIR (--text T ... | --file F | --image I ...)``: one line per input (see cli/predict.py)."""
    args = predict_parser(prog).parse_args(argv)
    _quiet_terminal(prog, "sim")
    from decaf_ext.cli.predict import predict_lines

    for line in predict_lines(args):
        print(line)
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


SUBCOMMANDS: dict[str, Callable[[Sequence[str], str], int]] = {"plot": plot_command, "predict": predict_command,
                                                                "provision": provision_command}


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    """Entry point of ``decaf-train``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] in SUBCOMMANDS:
        return guarded(SUBCOMMANDS[argv[0]], argv[1:], f"{prog} {argv[0]}")
    return guarded(train_command, argv, prog)

