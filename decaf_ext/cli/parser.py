"""The ``decaf-train`` argument parsers: training (every TrainConfig field a flag), plot and predict.
Errors become :class:`~decaf_ext.errors.ConfigError` (one line), never argparse's usage dump.

Example::

    >>> vars(build_parser().parse_args(["--rank", "4"]))["rank"]
    '4'
"""

from __future__ import annotations

import argparse
import typing
from dataclasses import fields

from decaf_ext import __version__
from decaf_ext.config import RENAMED, RESUMABLE, TrainConfig, field_types
from decaf_ext.errors import ConfigError

PROG = "decaf-train"
LAUNCHERS = ("sim", "dist")


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
    from decaf_ext.cli.plot import AXES, METRICS

    parser = OneLineParser(prog=prog, description="Plot runs' metrics against rounds (or bytes sent).")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders or folders holding runs")
    parser.add_argument("-o", "--output", default="accuracy.png", help="image file (default: accuracy.png)")
    parser.add_argument("--metric", default=METRICS[0], choices=METRICS, help=f"what to plot (default: {METRICS[0]})")
    parser.add_argument("--x", default=AXES[0], choices=AXES, help=f"horizontal axis (default: {AXES[0]})")
    return parser


def predict_parser(prog: str) -> OneLineParser:
    parser = OneLineParser(prog=prog, description="Classify texts or images with an exported adapter of any task; "
                                                  "prints per input its label name, probability and the input, "
                                                  "tab-separated (with --generate: the input and its continuation).")
    parser.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="an exported adapter, e.g. RUN/adapters/average")
    parser.add_argument("--text", action="append", default=[], metavar="TEXT", help="a text to classify (repeatable)")
    parser.add_argument("--file", metavar="FILE", help="a file with one text per line ('-': standard input); for "
                                                       "a causal-LM template with several fields, one JSON object each")
    parser.add_argument("--image", action="append", default=[], metavar="IMAGE",
                        help="an image file, or a folder of them, to classify (repeatable; CLIP adapters)")
    parser.add_argument("--generate", type=int, default=None, metavar="N",
                        help="causal LM: print up to N generated tokens after each prompt instead of a label")
    parser.add_argument("--max-len", type=int, default=None, metavar="LEN",
                        help="tokens per input (default: the run's max_len)")
    parser.add_argument("--batch-size", type=int, default=64, metavar="B", help="inputs per forward pass")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    return parser
