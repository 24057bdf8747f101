"""Plots of finished or running runs: a metric (default: mean test accuracy) against round or bytes sent.

    decaf-train plot RUN_DIR... -o acc.png
    decaf-train plot runs/cmp --metric mixing_error -o mechanism.png    # every strategy's mixing error per round

A RUN_DIR is a run folder (holding metrics.jsonl) or a folder holding runs (a --compare or --seeds folder:
every run below it is plotted). Each run is one line (with a ± std band for the agents' mean accuracy); the
averaged model is dashed. Runs whose algorithm and topology agree are told apart by their folder names.
Uses matplotlib's Agg canvas without pyplot, so no display and no global backend change are needed
(matplotlib is imported only when drawing).
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from typing import TYPE_CHECKING, Sequence

from decaf_ext.errors import ConfigError, first_line

if TYPE_CHECKING:
    from matplotlib.figure import Figure

METRICS: tuple[str, ...] = ("acc_mean", "macro_f1_mean", "train_loss", "consensus_error", "mixing_error",
                             "effective_rank")
AXES: tuple[str, ...] = ("round", "bytes_sent")
AVERAGED = {"acc_mean": "avg_model_acc", "macro_f1_mean": "avg_model_macro_f1"}


def run_folders(paths: Sequence[str]) -> list[str]:
    """Run folders named by `paths`: each path itself if it holds metrics.jsonl, else every folder below it
    that does (not looking inside a run folder)."""
    runs = []
    for path in paths:
        found = []
        for folder, children, files in os.walk(path):
            children.sort()
            if "metrics.jsonl" in files:
                found.append(folder)
                children.clear()
        if not found:
            raise ConfigError(f"run_dirs: {path!r} holds no metrics.jsonl (nor does any folder below it)")
        runs += found
    return runs


def load_run(folder: str, needed: Sequence[str] = ()) -> tuple[str, list[dict]]:
    """(label, history) of a run folder; the label is '<algorithm> <topology>' from its config.json, plus the
    message dtype when it is not float32. A line that is not a record, or a record without a key of `needed`, is
    a ConfigError naming the file."""
    path = os.path.join(folder, "metrics.jsonl")
    history = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as error:
                raise ConfigError(f"run_dirs: {path!r} line {number} is not JSON ({first_line(error)})") from None
            if not isinstance(record, dict):
                raise ConfigError(f"run_dirs: {path!r} line {number} is not a metrics record (a JSON object)")
            for key in needed:
                if key not in record:
                    raise ConfigError(f"run_dirs: {path!r} line {number} has no {key!r}")
            history.append(record)
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as handle:
            config = json.load(handle)
        label = f"{config['algorithm']} {config['topology']}"
        if config.get("message_dtype", "float32") != "float32":
            label += f" {config['message_dtype']}"
    except (OSError, KeyError, ValueError):
        label = os.path.basename(os.path.normpath(folder))
    return label, history


def _labels(folders: list[str], labels: list[str]) -> list[str]:
    """`labels`, with the run's folder path (from the runs' common parent) added where a label repeats."""
    repeated = {label for label, count in Counter(labels).items() if count > 1}
    if not repeated:
        return labels
    parent = os.path.dirname(os.path.commonpath([os.path.abspath(f) for f in folders]))
    return [f"{label} [{os.path.relpath(os.path.abspath(f), parent)}]" if label in repeated else label
            for label, f in zip(labels, folders)]


def plot_runs(paths: Sequence[str], output: str, *, metric: str = "acc_mean", x: str = "round") -> Figure:
    """Draw `metric` against `x` ("round" or "bytes_sent") for every run of `paths`; save to `output` (its
    folder is created when missing)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    if metric not in METRICS:
        raise ConfigError(f"metric must be one of {', '.join(METRICS)}; got {metric!r}")
    if x not in AXES:
        raise ConfigError(f"x must be one of {', '.join(AXES)}; got {x!r}")
    folders = run_folders(paths)
    needed = [x, metric, *(["acc_std"] if metric == "acc_mean" else [])]  # every key the loop below reads
    needed += [AVERAGED[metric]] if metric in AVERAGED else []
    runs = [load_run(folder, needed) for folder in folders]
    folder = os.path.dirname(os.path.abspath(output))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"output: cannot create the folder {folder!r} ({error.strerror})") from None
    figure = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for label, (_, history) in zip(_labels(folders, [label for label, _ in runs]), runs):
        xs = [r[x] / 1e6 if x == "bytes_sent" else r[x] for r in history]
        ys = [math.nan if r[metric] is None else r[metric] for r in history]  # None: absent (`local` mixes nothing)
        (line,) = axes.plot(xs, ys, marker="o", label=f"{label} (agents)")
        if metric == "acc_mean":
            mean, std = [r["acc_mean"] for r in history], [r["acc_std"] for r in history]
            axes.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                              color=line.get_color(), alpha=0.15)
        if metric in AVERAGED:
            axes.plot(xs, [r[AVERAGED[metric]] for r in history], linestyle="--", marker="s", fillstyle="none",
                      color=line.get_color(), label=f"{label} (averaged model)")
    axes.set_xlabel("MB sent (all agents)" if x == "bytes_sent" else "round")
    if x == "round":
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel(metric.replace("_", " "))
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    try:
        figure.savefig(output, dpi=120)
    except OSError as error:
        raise ConfigError(f"output: cannot write {output!r} ({error.strerror})") from None
    except ValueError as error:  # matplotlib: unknown image format of the file name
        raise ConfigError(f"output: {first_line(error)}") from None
    return figure
