"""Bring your own training loop: decentralized LoRA communication after the optimizer step of any loop.

The runtime counterpart of ``torch.distributed.algorithms.model_averaging.averagers.PeriodicModelAverager``:
the policy is a :class:`~decaf_ext.strategies.Strategy` (the same object the simulator and the distributed
runtime call), the transport is :class:`~decaf_ext.comm.transport.Transport` (round membership, timeouts, dead
neighbours, buffer checks), and one agent's round in between is :class:`~decaf_ext.comm.agent_round.AgentRound`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Mapping

import torch
import torch.distributed as dist
from torch import nn

from decaf_ext.comm.agent_comm import AgentComm, HooksFactory
from decaf_ext.comm.codec import check_message_dtype
from decaf_ext.comm.guard import load_run_key
from decaf_ext.comm.kit import check_neighbours, load_kit, schedule_neighbours
from decaf_ext.comm.transport import BACKENDS, check_backend
from decaf_ext.config import OPTIMIZER_STATE_POLICIES
from decaf_ext.errors import first_line
from decaf_ext.lora import DEFAULT_ADAPTER, RankPadding, collect_extras, collect_factors, lora_modules, \
    product_distance, product_norm, share_and_freeze_A, write_extras, write_factors
from decaf_ext.robust import with_robust
from decaf_ext.strategies import get_strategy
from decaf_ext.topology import MixingSchedule, make_schedule


@dataclass
class RoundStats:
    """One communication round of this agent: round (0-based), step (the optimizer step it followed), members
    of the round, mixed_with (agents whose factors were mixed, this agent first), bytes_sent, and the consensus
    statistics: disagreement = ||BA_after - BA_before|| / ||BA_after|| (how far this agent was from the mix of
    its neighbourhood; Frobenius over all modules), product_norm = ||BA_after||."""

    round: int
    step: int
    members: list[int]
    mixed_with: list[int]
    bytes_sent: int
    disagreement: float
    product_norm: float


@dataclass
class AveragerStats:
    """Totals: rounds this agent took part in, rounds it was left out of, bytes sent, the last round's stats,
    the transport's fault events (dead or late neighbours, rejected buffers, failed transfers)."""

    rounds: int = 0
    left_out: int = 0
    bytes_sent: int = 0
    last: RoundStats | None = None
    events: list[dict[str, Any]] = field(default_factory=list)


def _store_of(process_group: dist.ProcessGroup | None, store: dist.Store | None) -> dist.Store:
    """The control-plane store: `store`, else the default process group's, else torchrun's (env://)."""
    if store is not None:
        return store
    if process_group is not None or dist.is_initialized():
        return dist.distributed_c10d._get_default_store()
    rendezvous, _, _ = next(dist.rendezvous("env://", timeout=timedelta(seconds=600)))
    return rendezvous


def _rank_and_size(process_group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(this agent, number of agents) from the process group, the default group, or RANK / WORLD_SIZE."""
    if process_group is not None or dist.is_initialized():
        return dist.get_rank(process_group), dist.get_world_size(process_group)
    try:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except (KeyError, ValueError):
        raise ValueError("process_group: none given, torch.distributed is not initialized and RANK / WORLD_SIZE "
                         "are not set (launch with torchrun)") from None


class DecentralizedAverager:
    """Decentralized LoRA communication for a training loop you already have, one process per agent.

    Call :meth:`step` after every ``optimizer.step()``: after ``warmup_steps`` steps it communicates every
    ``period`` steps (the paper's "communicate every 3 batches" is ``period=3``): the agents agree on the
    round's members (those within ``round_timeout``), exchange one buffer per neighbour (or with every member
    for a server strategy such as fedavg), check it (size, dtype, finite, message tag, norm bound) and write the
    strategy's mix of what arrived into the model. A dead or stalled neighbour is left out of the round and its
    weight stays with this agent's own factors; it may come back later.

    model: a peft model with LoRA layers (``peft.get_peft_model``); every trainable parameter that is not a
    LoRA factor (a new head, ``modules_to_save``) travels with the factors. algorithm / options: a registered
    strategy and its options (``get_strategy(algorithm, **options)``). topology: a topology name (built for the
    process group's size with ``mixing``, ``seed``, ``topology_p``, ``topology_file``) or a
    :class:`~decaf_ext.topology.MixingSchedule`. process_group: gives this agent's rank and the number of
    agents (default: the default group; without one, torchrun's RANK / WORLD_SIZE); the exchanges run on
    groups of their own over each round's members, so a dead agent never blocks the caller's group. store: the
    control-plane store (default: the process group's, or torchrun's); use a differently prefixed one per
    averager when several run in one process. optimizer / optimizer_state: "reset" drops the optimizer state of
    the communicated parameters after every round (DeCAF changes the factors' gauge); "keep" leaves it.
    test_hooks: test-only fault injection (see :class:`~decaf_ext.comm.agent_comm.AgentComm`); leave it None.
    kit: an agent's TLS kit folder (``decaf-train provision``): the agents talk over mutual TLS
    (:class:`~decaf_ext.comm.tls_transport.TlsTransport`), this agent is the one the kit names, and no process
    group, store or RANK is needed; the topology must give the neighbours the kit's peers list gives.
    run_key_file / norm_bound / norm_cap: message safety (a shared key of at least 16 bytes for the message tags,
    also from DECAF_RUN_KEY; a bound on a neighbour's LoRA product norm as a multiple of the round's median; an
    absolute bound on every factor, extra and product norm of a message; see docs/security.md). message_dtype: float32 (uncompressed), bfloat16
    or int8 (per-row scale), see :mod:`decaf_ext.comm.codec`. ranks: every agent's LoRA rank, the same list on
    every agent, when the ranks differ (each agent sends its own rank's directions; the mix runs on factors
    zero-padded to the largest with each agent's alpha / r folded in, see :class:`~decaf_ext.lora.RankPadding`);
    None when every agent has the same rank. dlora_fa shares and freezes A at construction. robust: Byzantine-robust
    mixing, "clipped_gossip" or "clipped_gossip:TAU" (:mod:`decaf_ext.robust`, docs/robust.md); None: none.

    Example::

        >>> dist.init_process_group("gloo")              # torchrun --nproc-per-node 4 train.py
        >>> model = get_peft_model(base, LoraConfig(r=8, target_modules=["query", "value"]))
        >>> optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        >>> averager = DecentralizedAverager(model, algorithm="decaf", topology="ring", period=3)
        >>> for batch in loader:
        >>>     model(**batch).loss.backward()
        >>>     optimizer.step()
        >>>     optimizer.zero_grad()
        >>>     averager.step()
    """

    def __init__(self, model: nn.Module, *, algorithm: str = "decaf", options: dict[str, Any] | None = None,
                 topology: str | MixingSchedule = "ring", mixing: str = "auto", seed: int = 0,
                 topology_p: float | None = None, topology_file: str | None = None, period: int = 1,
                 warmup_steps: int = 0, process_group: dist.ProcessGroup | None = None,
                 store: dist.Store | None = None, optimizer: torch.optim.Optimizer | None = None,
                 optimizer_state: str = "keep", round_timeout: float = 60.0, startup_timeout: float = 600.0,
                 backend: str = "gloo", run_key_file: str | None = None, norm_bound: float | None = None,
                 norm_cap: float | None = None,
                 message_dtype: str = "float32", ranks: list[int] | None = None,
                 adapter_name: str = DEFAULT_ADAPTER, test_hooks: HooksFactory | None = None,
                 kit: str | None = None, robust: str | None = None) -> None:
        if isinstance(period, bool) or not isinstance(period, int) or period < 1:
            raise ValueError(f"period must be an integer >= 1, got {period!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        if optimizer_state not in OPTIMIZER_STATE_POLICIES:
            raise ValueError(f"optimizer_state must be one of {', '.join(OPTIMIZER_STATE_POLICIES)}; "
                             f"got {optimizer_state!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
        check_message_dtype(message_dtype)
        if options is not None and not isinstance(options, Mapping):
            raise ValueError(f"options must be a dict of the strategy's options (or None), got {options!r}")
        self.strategy = with_robust(get_strategy(algorithm, **(options or {})), robust)
        self.model, self.adapter_name = model, adapter_name
        tls = None if kit is None else load_kit(kit)  # the agent is the one its kit names; no store, no group
        self.agent, n_agents = _rank_and_size(process_group) if tls is None else (tls.agent, tls.n_agents)
        self.padding = None
        if ranks is not None:
            if not (isinstance(ranks, (list, tuple)) and len(ranks) == n_agents
                    and all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in ranks)):
                raise ValueError(f"ranks must list one LoRA rank >= 1 per agent ({n_agents}), got {ranks!r}")
            own = {m.lora_a.weight.shape[0] for m in lora_modules(model, adapter_name)}
            if own and own != {ranks[self.agent]}:
                raise ValueError(f"ranks: agent {self.agent}'s model has LoRA rank {sorted(own)}, "
                                 f"ranks[{self.agent}] = {ranks[self.agent]}")
            if len(set(ranks)) > 1:
                self.padding = RankPadding(max(ranks), frozen_A=not self.strategy.trains_A)
        try:
            groups, extras = self._collect()
        except ValueError as error:
            raise ValueError(f"model: {first_line(error)} (build it with peft.get_peft_model and a LoraConfig)"
                             ) from None
        device = next((p.device for p in model.parameters() if p.requires_grad), None)
        if device is None:
            raise ValueError("model: no trainable parameters (load a saved adapter with is_trainable=True)")
        check_backend(backend, device)
        try:
            self.schedule = topology if isinstance(topology, MixingSchedule) else make_schedule(
                topology, n_agents, rule=mixing, seed=seed, p=topology_p, path=topology_file)
        except ValueError as error:
            raise ValueError(f"topology: {first_line(error)}") from None
        if self.schedule.n_agents != n_agents:
            raise ValueError(f"process_group: {n_agents} processes but the topology has "
                             f"{self.schedule.n_agents} agents (one process per agent)")
        if tls is not None:
            check_neighbours(tls, schedule_neighbours(self.schedule.matrices), "the topology")
        if not self.strategy.trains_A:
            share_and_freeze_A([model], seed, adapter_name=adapter_name, rank=max(ranks) if ranks else None)
        if tls is None:
            store = dist.PrefixStore(f"decaf_ext/averager/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}",
                                     _store_of(process_group, store))
        self.comm = AgentComm(self.strategy, groups, extras, store=store, agent=self.agent, n_agents=n_agents,
                              backend=backend, device=device, run_key=load_run_key(run_key_file),
                              norm_bound=norm_bound, norm_cap=norm_cap, message_dtype=message_dtype, ranks=ranks,
                              round_timeout=round_timeout, startup_timeout=startup_timeout, test_hooks=test_hooks,
                              kit=tls)
        self.transport = self.comm.transport
        self.period, self.warmup_steps = period, warmup_steps
        self.optimizer, self.optimizer_state = optimizer, optimizer_state
        self.silent = self.strategy.bytes_per_message(groups, extras) == 0  # e.g. local: nothing to agree on or send
        self.steps = 0
        self.stats = AveragerStats(events=self.transport.events)
        self.round = self.comm.start(0)

    def _collect(self) -> tuple[list, dict[str, torch.Tensor]]:
        """This agent's groups (A [M, 1, r, n], B [M, 1, m, r]) and extras [1, ...]."""
        models = [self.model]
        return (collect_factors(models, adapter_name=self.adapter_name, padding=self.padding),
                collect_extras(models, adapter_name=self.adapter_name))

    def step(self, optimizer: torch.optim.Optimizer | None = None) -> RoundStats | None:
        """Count one optimizer step; communicate when it is due. Returns the round's stats, or None when no
        communication was due, the strategy sends nothing, or this agent was left out of the round (it then
        asks to join the next one). optimizer: overrides the one given at construction (for the reset policy).
        """
        self.steps += 1
        if self.silent or self.steps <= self.warmup_steps or (self.steps - self.warmup_steps) % self.period:
            return None
        round_index = self.round
        self.comm.after_local_steps(round_index)
        groups, extras = self._collect()
        view, mixed = self.comm.round(round_index, groups, extras, self.schedule.at(round_index))
        if view is None:
            self.stats.left_out += 1
            self.round = max(round_index + 1, self.transport.latest + 1)
            return None
        self.round = round_index + 1
        if mixed is None:
            return None
        write_factors([self.model], mixed.groups, adapter_name=self.adapter_name, padding=self.padding)
        write_extras([self.model], mixed.extras, adapter_name=self.adapter_name)
        self._apply_optimizer_policy(optimizer or self.optimizer)
        norm = float(product_norm(mixed.groups)[0])
        distance = float(product_distance(mixed.groups, groups)[0])
        stats = RoundStats(round=round_index, step=self.steps, members=view.agents, mixed_with=mixed.agents,
                           bytes_sent=mixed.bytes_sent, disagreement=distance / norm if norm > 0 else 0.0,
                           product_norm=norm)
        self.stats.rounds += 1
        self.stats.bytes_sent += mixed.bytes_sent
        self.stats.last = stats
        return stats

    def _apply_optimizer_policy(self, optimizer: torch.optim.Optimizer | None) -> None:
        if self.optimizer_state != "reset":
            return
        if optimizer is None:
            raise ValueError("optimizer: optimizer_state='reset' needs the optimizer (pass it to the averager or "
                             "to step())")
        for param in self.model.parameters():
            if param.requires_grad:
                optimizer.state.pop(param, None)

    def close(self) -> None:
        """Leave the run (drops this agent's exchange group; the caller's process group is untouched)."""
        self.transport.close()
