"""Plots of finished or running runs: a metric (default: mean test accuracy) against round or bytes sent.

    decaf-train plot RUN_DIR... -o acc.png        (or: python -m decaf_ext.plot RUN_DIR... -o acc.png)

A RUN_DIR is a run folder (holding metrics.jsonl) or a --compare folder (its sub-runs are plotted).
Each run is one line (with a ± std band for the agents' mean accuracy); the averaged model is dashed.
Uses matplotlib's Agg canvas without pyplot, so no display and no global backend change are needed.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

METRICS: tuple[str, ...] = ("acc_mean", "macro_f1_mean", "train_loss", "consensus_error")
AVERAGED = {"acc_mean": "avg_model_acc", "macro_f1_mean": "avg_model_macro_f1"}


def run_folders(paths: Sequence[str]) -> list[str]:
    """Run folders named by `paths`: each path itself if it holds metrics.jsonl, else its sub-folders that do."""
    runs = []
    for path in paths:
        if os.path.isfile(os.path.join(path, "metrics.jsonl")):
            runs.append(path)
            continue
        children = sorted(os.path.join(path, c) for c in os.listdir(path)) if os.path.isdir(path) else []
        found = [c for c in children if os.path.isfile(os.path.join(c, "metrics.jsonl"))]
        if not found:
            raise ValueError(f"run_dirs: {path!r} holds no metrics.jsonl (nor do its sub-folders)")
        runs += found
    return runs


def load_run(folder: str) -> tuple[str, list[dict]]:
    """(label, history) of a run folder; the label is '<algorithm> <topology>' from its config.json, plus the
    message dtype when it is not float32."""
    with open(os.path.join(folder, "metrics.jsonl"), encoding="utf-8") as handle:
        history = [json.loads(line) for line in handle if line.strip()]
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as handle:
            config = json.load(handle)
        label = f"{config['algorithm']} {config['topology']}"
        if config.get("message_dtype", "float32") != "float32":
            label += f" {config['message_dtype']}"
    except (OSError, KeyError, ValueError):
        label = os.path.basename(os.path.normpath(folder))
    return label, history


def plot_runs(paths: Sequence[str], output: str, *, metric: str = "acc_mean", x: str = "round") -> Figure:
    """Draw `metric` against `x` ("round" or "bytes_sent") for every run of `paths`; save to `output`."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}; got {metric!r}")
    if x not in ("round", "bytes_sent"):
        raise ValueError(f"x must be 'round' or 'bytes_sent'; got {x!r}")
    figure = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for label, history in (load_run(folder) for folder in run_folders(paths)):
        xs = [r[x] / 1e6 if x == "bytes_sent" else r[x] for r in history]
        (line,) = axes.plot(xs, [r[metric] for r in history], marker="o", label=f"{label} (agents)")
        if metric == "acc_mean":
            mean, std = [r["acc_mean"] for r in history], [r["acc_std"] for r in history]
            axes.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                              color=line.get_color(), alpha=0.15)
        if metric in AVERAGED:
            axes.plot(xs, [r[AVERAGED[metric]] for r in history], linestyle="--", color=line.get_color(),
                      label=f"{label} (averaged model)")
    axes.set_xlabel("MB sent (all agents)" if x == "bytes_sent" else "round")
    if x == "round":
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel(metric.replace("_", " "))
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(output, dpi=120)
    return figure


def plot_command(argv: Sequence[str]) -> int:
    """``plot RUN_DIR... -o FILE [--metric M] [--x round|bytes_sent]``; returns the exit status."""
    from decaf_ext.train import OneLineParser

    parser = OneLineParser(prog="decaf-train plot", description="Plot runs' metrics against rounds.")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders or --compare folders")
    parser.add_argument("-o", "--output", default="accuracy.png", help="image file (default: accuracy.png)")
    parser.add_argument("--metric", default="acc_mean", choices=METRICS, help="what to plot (default: acc_mean)")
    parser.add_argument("--x", default="round", choices=("round", "bytes_sent"), help="horizontal axis")
    args = parser.parse_args(argv)
    plot_runs(args.run_dirs, args.output, metric=args.metric, x=args.x)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    from decaf_ext.train import main

    sys.exit(main(["plot", *sys.argv[1:]]))
