"""The tables and result lines ``decaf-train`` prints: one run, a comparison, means over seeds.

Example::

    >>> print(format_result(Trainer(config).run()))
"""

from __future__ import annotations

import statistics
from typing import Any


def _reports_f1(summary: dict[str, Any]) -> bool:
    """Whether the run's task is scored by macro-F1 (the causal LM's paper metric) next to accuracy."""
    return summary.get("task") == "causal_lm"


def format_result(summary: dict[str, Any]) -> str:
    """One line: final mean test accuracy ± std (and macro-F1 where the task reports it), averaged-model
    accuracy, the largest epsilon spent (with differential privacy), consensus error, bytes, timings."""
    final, per_round = summary["final"], summary["seconds_per_round"]
    f1 = (f" | macro-F1 {final['macro_f1_mean']:.4f}, averaged model {final['avg_model_macro_f1']:.4f}"
          if _reports_f1(summary) else "")
    privacy = f" | DP epsilon spent <= {max(final['dp_epsilon']):.3g}" if "dp_epsilon" in final else ""
    return (f"{summary['algorithm']} {summary['topology']} x{summary['agents']} | round {final['round']}: "
            f"test acc {final['acc_mean']:.4f} ± {final['acc_std']:.4f} | averaged model {final['avg_model_acc']:.4f}"
            f"{f1}{privacy} | consensus error {final['consensus_error']:.3g} | sent {final['bytes_sent'] / 1e6:.2f} MB"
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
