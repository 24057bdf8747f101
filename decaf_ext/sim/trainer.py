"""Decentralized LoRA fine-tuning of N agents simulated in one process on one device.

Memory: one frozen pretrained model is shared. Each agent is a peft model deep-copied from a template
whose frozen parameters and buffers are passed through the copy memo, so the N agents (plus one scratch
model for the averaged adapter) share the base weights and own only their LoRA factors and head.
All agents start from the same adapter and head initialization (a common starting point).

Each round: every agent takes `local_steps` AdamW steps on its own partition (seeded per-agent data
order), then the strategy mixes the stacked factors and extras (``comm_order`` "train_then_mix"; with
"mix_then_train" mixing comes first). Every `eval_every` rounds the run logs one JSON line (see
docs/training.md); ``summary.json`` is written last and marks a finished run.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from decaf_ext.comm.agent_round import round_inputs
from decaf_ext.config import TrainConfig
from decaf_ext.elastic import LiveMixing
from decaf_ext.lora import FactorGroup, Extras, add_mixing, collect_extras, mixing_residuals, new_mixing_tally, \
    select_agent, stack_agents, write_extras
from decaf_ext.sim.agents import Agents
from decaf_ext.sim.elastic import ElasticRounds
from decaf_ext.sim.evaluation import MetricsLog, build_summary, evaluation_record, export_adapters
from decaf_ext.sim.resume import check_simulated, open_run_dir, write_checkpoint
from decaf_ext.sim.tensorboard_log import TensorBoardLog
from decaf_ext.storage.files import write_json
from decaf_ext.storage.run_folder import SUMMARY, RunLock, default_run_dir


class Trainer:
    """Builds the run's :class:`~decaf_ext.sim.agents.Agents` from a TrainConfig; :meth:`run` trains them.

    Args:
        config: the run's configuration (validated here; relative paths made absolute).

    Attributes: config, agents (data, models, optimizers, schedule, strategy, ...), run_dir, log (the
    :class:`~decaf_ext.sim.evaluation.MetricsLog`; ``history`` is its records).

    Example::

        >>> summary = Trainer(TrainConfig(algorithm="decaf", agents=4, rounds=2)).run()
        >>> summary["final"]["acc_mean"]
    """

    def __init__(self, config: TrainConfig) -> None:
        config.validate()
        config = config.with_absolute_paths()
        self.config = config
        self.run_dir = config.output_dir or default_run_dir(f"{config.algorithm}-{config.topology}")
        if config.tensorboard:
            TensorBoardLog.writer_class()
        self.agents = Agents(config)
        self.log = MetricsLog(self.run_dir, tensorboard=config.tensorboard)
        churn = config.churn_schedule()
        self.elastic = ElasticRounds(self.agents, churn) if churn.active else None  # --churn: docs/membership.md
        # what the records say of W (every agent live): the elastic rounds' own live mixing when there are any
        self.mixing = self.elastic.mixing if self.elastic is not None else LiveMixing.of(config, self.agents.schedule)

    @property
    def history(self) -> list[dict[str, Any]]:
        """The evaluation records so far (one dict per metrics.jsonl line)."""
        return self.log.history

    # --------------------------------------------------------------------------------------- communication

    def communicate(self, round_index: int) -> None:
        """One mixing step of the strategy on every agent's factors and extras (0-based round_index)."""
        if self.elastic is not None:
            return self.elastic.communicate(round_index)
        agents = self.agents
        start = agents.clock()
        groups, extras = agents.collect(agents.models), collect_extras(agents.models)
        W = agents.schedule.at(round_index)
        if agents.layout.codec.lossless:
            new_groups, new_extras = agents.strategy.communicate(groups, extras, W)
            n = W.shape[0]
            received = [(groups, W if agents.strategy.decentralized
                         else torch.full((n, n), 1.0 / n, dtype=torch.float64))]
        else:
            new_groups, new_extras, received = self._communicate_received(groups, extras, W)
        agents.write(agents.models, new_groups)
        write_extras(agents.models, new_extras)
        sent = agents.strategy.bytes_sent(groups, extras, W, self.message_bytes())
        agents.counters["bytes_sent"] += int(sent.sum())
        if self.config.optimizer_state == "reset":
            for optimizer, agent_sent in zip(agents.optimizers, sent.tolist()):
                if agent_sent > 0:
                    optimizer.state.clear()
        agents.counters["time_comm"] += agents.clock() - start
        if agents.strategy.bytes_per_message(groups, extras) > 0:  # `local` mixes nothing: no mixing error
            self._tally_mixing(received)

    def _tally_mixing(self, received: list[tuple[list[FactorGroup], torch.Tensor]]) -> None:
        """Add each agent's mixing error of this round (:mod:`decaf_ext.lora.mixing`) to its tally: `received` is
        one (inputs, W [N_out, N_in]) whose N_out rows are agents 0, 1, ... in order, or one per agent (its inputs
        and its [1, k] row), against the factors the agents hold now."""
        held = self.agents.collect(self.agents.models)
        first = 0
        for inputs, W in received:
            rows = [FactorGroup(g.names, g.A[:, first:first + len(W)], g.B[:, first:first + len(W)]) for g in held]
            for k, (err, ref) in enumerate(zip(*mixing_residuals(inputs, W, rows))):
                add_mixing(self.agents.counters["mixing"][first + k], err.item(), ref.item())
            first += len(W)

    def message_bytes(self) -> int | torch.Tensor:
        """Bytes of one message: an int, or int64 [N] per agent when unequal ranks make messages differ (a server
        strategy's all_gather pads every message to the largest)."""
        layout = self.agents.layout
        if layout.ranks is None:
            return layout.message_bytes
        return torch.tensor([layout.sent_bytes_of(agent, server=not self.agents.strategy.decentralized)
                             for agent in self.agents.agent_ids])

    def _communicate_received(self, groups: list[FactorGroup], extras: Extras, W: torch.Tensor
                              ) -> tuple[list[FactorGroup], Extras, list[tuple[list[FactorGroup], torch.Tensor]]]:
        """The round with lossy messages: each agent's own call of the strategy, as the distributed runtime makes
        it (:func:`~decaf_ext.comm.agent_round.round_inputs`), on its own exact factors and the others' as decoded
        from their messages. groups A [M, N, r, n], B [M, N, m, r], extras [N, ...] -> the same shapes, and per
        agent what it mixed: (its call's input groups, its row of the call's W, [1, k])."""
        strategy, layout = self.agents.strategy, self.agents.layout
        exact = layout.pack_each(groups, extras)
        heard = layout.received(exact)
        rows, received = [], []
        for i, row in enumerate(W.to(torch.float64).cpu()):
            others = [j for j in range(len(row)) if j != i and (row[j] > 0 or not strategy.decentralized)]
            order, W_round = round_inputs(strategy, i, row, others, [])
            data = torch.stack([exact[j] if j == i else heard[j] for j in order])
            inputs = layout.unpack(data, *select_agent(groups, extras, i))
            mixed = strategy.communicate(*inputs, W_round)
            rows.append(select_agent(*mixed, order.index(i)))
            received.append((self.agents.as_sent(inputs[0]), W_round[order.index(i)][None]))
        return (*stack_agents(rows), received)

    # ------------------------------------------------------------------------------------------ evaluation

    def average_model(self, groups: list[FactorGroup] | None = None, extras: Extras | None = None):
        """The scratch model holding the strategy's consensus of `groups` / `extras` (default: the agents')."""
        return self.agents.average_model(groups, extras)

    def evaluate(self, rounds_done: int) -> dict[str, Any]:
        """Test metrics of every agent and of the averaged model; appended to the metrics log."""
        if self.elastic is not None:
            record = self.elastic.evaluate(rounds_done)
            self.log.add(record)
            return record
        agents = self.agents
        start = agents.clock()
        per_agent = [{**agents.evaluate_model(model), **agents.spent(k)} for k, model in enumerate(agents.models)]
        average = agents.evaluate_model(agents.average_model())
        agents.counters["time_eval"] += agents.clock() - start
        record = evaluation_record(agents, rounds_done, per_agent, average, agents.collect(agents.models),
                                   agents.counters["loss_sum"], agents.counters["loss_steps"],
                                   agents.counters["bytes_sent"], agents.counters["mixing"])
        agents.counters["loss_sum"], agents.counters["loss_steps"] = 0.0, 0
        agents.counters["mixing"] = new_mixing_tally(len(agents.models))
        record.update(self.mixing.fields(max(rounds_done - 1, 0), range(len(agents.models))))
        self.log.add(record)
        return record

    # ------------------------------------------------------------------------------------------------- run

    def run(self, *, resume: bool = False) -> dict[str, Any]:
        """Train for config.rounds rounds (continuing from the newest checkpoint if `resume`); returns the
        summary that is also written to run_dir/summary.json. The run holds its folder's
        :class:`~decaf_ext.storage.run_folder.RunLock` throughout: a second run into it is refused."""
        cfg, agents = self.config, self.agents
        if resume:
            check_simulated(self.run_dir)
        with RunLock(self.run_dir):
            done = open_run_dir(self.run_dir, agents, self.log, resume=resume)
            wall = time.perf_counter()
            bar = tqdm(range(done, cfg.rounds), initial=done, total=cfg.rounds, unit="round",
                       disable=not cfg.progress, desc=f"{cfg.algorithm} {cfg.topology} x{cfg.agents}",
                       dynamic_ncols=True)
            if cfg.eval_at_start and done == 0:
                self.evaluate(0)
            for round_index in bar:
                if cfg.comm_order == "mix_then_train":
                    self.communicate(round_index)
                agents.local_round(round_index) if self.elastic is None else self.elastic.local_round(round_index)
                if cfg.comm_order == "train_then_mix":
                    self.communicate(round_index)
                rounds_done = round_index + 1
                if rounds_done % cfg.eval_every == 0 or rounds_done == cfg.rounds:
                    record = self.evaluate(rounds_done)
                    loss = record["train_loss"]  # None: no step recorded (DP-SGD does not record its loss)
                    bar.set_postfix(acc=f"{record['acc_mean']:.3f}", avg=f"{record['avg_model_acc']:.3f}",
                                    loss="-" if loss is None else f"{loss:.3f}")
                if (cfg.checkpoint_every and rounds_done % cfg.checkpoint_every == 0) or rounds_done == cfg.rounds:
                    write_checkpoint(self.run_dir, agents, self.history, rounds_done)
            bar.close()
            self.log.close()
            export_adapters(agents, os.path.join(self.run_dir, "adapters"))
            summary = build_summary(agents, self.history, self.run_dir, time.perf_counter() - wall)
            write_json(os.path.join(self.run_dir, SUMMARY), summary)
        return summary


def train(config: TrainConfig, *, resume: bool = False) -> dict[str, Any]:
    """Build a :class:`Trainer` for `config` and run it; returns the summary."""
    return Trainer(config).run(resume=resume)
