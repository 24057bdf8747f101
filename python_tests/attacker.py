"""Attacks on the message path, through the real receive path: N agents as threads of this process, each with
its own :class:`~decaf_ext.comm.agent_comm.AgentComm` (a real Transport, real gloo process groups over
loopback, a real MessageGuard), on one store. An attacker is one of them whose outgoing buffer is replaced by
crafted bytes (a test hook), so what the others receive crosses gloo and every check as a real message would.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch
import torch.distributed as dist

from decaf_ext.comm.agent_comm import AgentComm
from decaf_ext.comm.agent_round import RoundHooks
from decaf_ext.lora import FactorGroup, product_norm, select_agent, stack_agents
from decaf_ext.robust import with_robust
from decaf_ext.strategies import get_strategy
from decaf_ext.topology import make_schedule

KEY = b"a run key of 16+ bytes"
#: (the attacker's AgentComm, round, the honest data it would send, seal) -> the buffer it sends instead;
#: seal(data) encodes and tags data, seal(data, wire=W) tags a wire W of the attacker's making
Craft = Callable[[AgentComm, int, torch.Tensor, Callable[..., torch.Tensor]], torch.Tensor]


def agents(n: int, seed: int = 0, scale: float = 1.0) -> tuple[list[FactorGroup], dict[str, torch.Tensor]]:
    """Factors of n agents: two groups (A [M, n, 2, 6], B [M, n, 5, 2]) and a head, float32."""
    g = torch.Generator().manual_seed(seed)
    groups = [FactorGroup(["q", "v"], scale * torch.randn(2, n, 2, 6, generator=g),
                          scale * torch.randn(2, n, 5, 2, generator=g))]
    return groups, {"head.weight": scale * torch.randn(n, 3, 5, generator=g)}


class Crafted(RoundHooks):
    """Test hook of the attacker: every buffer it sends is craft(round, data, seal)."""

    def __init__(self, craft: Craft) -> None:
        self.craft, self.comm = craft, None

    def outgoing(self, round_index, data, seal):
        return self.craft(self.comm, round_index, data, seal)


class Ring:
    """n agents on a ring (W = 1/3 on self and both neighbours), each an AgentComm in this process.

    attackers: agent -> Craft; robust: every agent's ``--robust`` rule (None: none). Every agent keeps its own
    current factors; :meth:`round` runs one round for all of them at once (threads) and writes back what each
    agent's round returned."""

    def __init__(self, n: int, *, algorithm: str = "decaf", attackers: dict[int, Craft] | None = None,
                 key: bytes | None = KEY, store: dist.Store | None = None, timeout: float = 5.0,
                 factors: tuple[list[FactorGroup], dict[str, torch.Tensor]] | None = None, robust: str | None = None,
                 **guard) -> None:
        self.n, self.strategy = n, with_robust(get_strategy(algorithm), robust)
        self.groups, self.extras = factors or agents(n)
        self.schedule = make_schedule("ring", n)
        store = store if store is not None else dist.HashStore()
        attackers = attackers or {}

        def build(i: int) -> AgentComm:
            hooks = (lambda agent, restarted, craft=attackers[i]: Crafted(craft)) if i in attackers else None
            comm = AgentComm(self.strategy, *select_agent(self.groups, self.extras, i), store=store, agent=i,
                             n_agents=n, backend="gloo", device=torch.device("cpu"), run_key=key,
                             round_timeout=timeout, startup_timeout=2 * timeout, test_hooks=hooks, **guard)
            if comm.hooks is not None:
                comm.hooks.comm = comm
            return comm

        self.comms = [build(i) for i in range(n)]
        with ThreadPoolExecutor(n) as pool:
            list(pool.map(lambda comm: comm.start(0), self.comms))
        self.rounds = 0

    def round(self) -> None:
        W = self.schedule.at(self.rounds)

        def one(i: int):
            own = select_agent(self.groups, self.extras, i)
            view, mixed = self.comms[i].round(self.rounds, *own, W)
            return own if mixed is None else (mixed.groups, mixed.extras)

        with ThreadPoolExecutor(self.n) as pool:
            self.groups, self.extras = stack_agents(list(pool.map(one, range(self.n))))
        self.rounds += 1

    def events(self, agent: int) -> list[dict]:
        return self.comms[agent].transport.events

    def rejected(self, agent: int) -> list[dict]:
        return [e for e in self.events(agent) if e["event"] == "rejected"]

    def norms(self) -> list[float]:
        return product_norm(self.groups).tolist()

    def close(self) -> None:
        for comm in self.comms:
            comm.transport.close()


def finite(values: list[float]) -> bool:
    return all(math.isfinite(v) for v in values)
