"""What a run reports: one metrics record per evaluation (every agent and the averaged model), the metrics log
(``metrics.jsonl``, TensorBoard), the exported adapters and the final summary.

Example::

    >>> record = evaluation_record(agents, 2, per_agent, average, groups, loss_sum, steps, sent)
    >>> log = MetricsLog("runs/r", tensorboard=False); log.add(record)   # rewrites runs/r/metrics.jsonl
"""

from __future__ import annotations

import os
import resource
from typing import Any

import numpy as np
import torch

from decaf_ext.lora import FactorGroup, consensus_error, consensus_interference, update_spectrum
from decaf_ext.lora.mixing import relative
from decaf_ext.sim.agents import Agents
from decaf_ext.sim.tensorboard_log import TensorBoardLog
from decaf_ext.storage.export import export_adapter
from decaf_ext.storage.files import replacing_folder, write_json
from decaf_ext.storage.run_folder import METRICS


def evaluation_record(agents: Agents, rounds_done: int, per_agent: list[dict[str, float]],
                      average: dict[str, float], groups: list[FactorGroup], loss_sum: float, loss_steps: float,
                      bytes_sent: int, mixing: list[list[float]]) -> dict[str, Any]:
    """One metrics.jsonl record: per-agent test metrics `per_agent`, the averaged model's `average`, the agents'
    factors `groups` (A [M, N, r, n], B [M, N, m, r]) for the consensus error and the update spectrum, the training
    loss summed over `loss_steps` steps since the last evaluation, the bytes sent so far, each agent's mixing tally
    since the last evaluation (:func:`~decaf_ext.lora.mixing.add_mixing`), the timings of `agents.counters`; with
    differential privacy, each agent's spent epsilon (``dp_epsilon`` of `per_agent`)."""
    accuracy = np.array([m["accuracy"] for m in per_agent])
    privacy = {"dp_epsilon": [m["dp_epsilon"] for m in per_agent]} if agents.privacy is not None else {}
    mixing_errors = [None if rounds == 0 else relative(torch.tensor(err), torch.tensor(ref)).item()
                     for err, ref, rounds in mixing]
    ranks, energy = update_spectrum(groups, min(agents.config.agent_ranks()))
    return {
        "round": rounds_done,
        "train_loss": loss_sum / loss_steps if loss_steps else None,  # None before any local step
        "acc_mean": float(accuracy.mean()),
        "acc_std": float(accuracy.std()),
        "macro_f1_mean": float(np.mean([m["macro_f1"] for m in per_agent])),
        "avg_model_acc": average["accuracy"],
        "avg_model_macro_f1": average["macro_f1"],
        "consensus_error": consensus_error(groups),
        "consensus_interference": consensus_interference(groups),
        "mixing_error": _mean(mixing_errors),
        "mixing_error_agents": mixing_errors,
        "effective_rank": _mean(_values(ranks)),
        "effective_rank_agents": _values(ranks),
        "min_rank_energy_agents": _values(energy),
        "bytes_sent": bytes_sent,
        "acc_agents": accuracy.tolist(),
        **privacy,
        "time": {k[5:]: round(v, 3) for k, v in agents.counters.items() if k.startswith("time_")},
    }


def _values(x: torch.Tensor) -> list[float | None]:
    """A float64 [N] as a list, NaN as None."""
    return [None if value != value else value for value in x.tolist()]


def _mean(values: list[float | None]) -> float | None:
    """Mean of the values that are not None (None when there are none)."""
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


class MetricsLog:
    """The evaluation records of a run (``history``), kept in run_dir/metrics.jsonl and, with `tensorboard`, in
    TensorBoard event files under run_dir/tensorboard."""

    def __init__(self, run_dir: str, *, tensorboard: bool) -> None:
        self.run_dir, self.tensorboard = run_dir, tensorboard
        self.history: list[dict[str, Any]] = []
        self.board: TensorBoardLog | None = None

    def add(self, record: dict[str, Any]) -> None:
        """Append `record`, rewrite metrics.jsonl, add its scalars to TensorBoard."""
        if self.tensorboard and self.board is None:
            self.board = TensorBoardLog(os.path.join(self.run_dir, "tensorboard"),
                                        self.history[-1] if self.history else None)
        self.history.append(record)
        self.write()
        if self.board is not None:
            self.board.write(record)

    def write(self) -> None:
        """Rewrite run_dir/metrics.jsonl (one line per record) atomically."""
        write_json(os.path.join(self.run_dir, METRICS), self.history, lines=True)

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


def export_adapters(agents: Agents, folder: str) -> None:
    """peft-format adapters (``PeftModel.from_pretrained``, ``AutoPeftModelFor...from_pretrained``), each with its
    card (label names, base model, prediction options; see :mod:`decaf_ext.storage.export`): agent_XX/ for each
    agent and average/ for the averaged model. Written to a temporary folder, then put in place of the previous
    one (:func:`~decaf_ext.storage.files.replacing_folder`)."""
    with replacing_folder(folder) as temporary:
        for i, model in zip(agents.agent_ids, agents.models):
            export_adapter(model, os.path.join(temporary, f"agent_{i:02d}"), agents.task, agents.label_names,
                           agents.model_path)
        export_adapter(agents.average_model(), os.path.join(temporary, "average"), agents.task, agents.label_names,
                       agents.model_path)


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated on a CUDA device, else the process's peak resident memory (MB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux reports KiB


def build_summary(agents: Agents, history: list[dict[str, Any]], run_dir: str, wall_seconds: float
                  ) -> dict[str, Any]:
    """Final metrics, totals and per-round timings of a finished run."""
    cfg, final = agents.config, history[-1]
    return {
        "task": cfg.task, "algorithm": cfg.algorithm, "topology": cfg.topology, "agents": cfg.agents,
        "rounds": cfg.rounds,
        "final": {k: v for k, v in final.items() if k != "time"},
        "bytes_per_agent_per_round": final["bytes_sent"] / (cfg.agents * cfg.rounds),
        "time": {**final["time"], "wall_this_session": round(wall_seconds, 3)},
        "seconds_per_round": {k: round(v / cfg.rounds, 4) for k, v in final["time"].items()},
        "peak_memory_mb": round(peak_memory_mb(agents.device), 1),
        "spectral_gap": agents.schedule.spectral_gap,
        "trainable_params_per_agent": agents.trainable_params,
        "label_names": agents.label_names,
        "examples": {"train": len(agents.train_labels), "test": len(agents.test_set),
                     "per_agent": [len(p) for p in agents.parts]},
        "run_dir": run_dir,
        **privacy_summary(agents),
    }


def privacy_summary(agents: Agents) -> dict[str, Any]:
    """{"privacy": the budget and, per agent of `agents`, its spent epsilon, delta, noise multiplier, sample rate
    and steps}, or {} without differential privacy."""
    if agents.privacy is None:
        return {}
    cfg = agents.config
    return {"privacy": {"epsilon_target": cfg.dp_epsilon, "max_grad_norm": cfg.dp_max_grad_norm,
                        "accountant": cfg.dp_accountant,
                        "agents": [{"agent": i, **private.summary()}
                                   for i, private in zip(agents.agent_ids, agents.privacy)]}}
