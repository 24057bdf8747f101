"""One agent's communication stack, built in one place for every runtime (the distributed runtime, the
user-loop averager): guard -> message layout -> transport -> the agent's round, and the round step they share
(agree on the members, hold their process group, mix).

Example::

    >>> comm = AgentComm(strategy, groups, extras, store=store, agent=2, n_agents=4, backend="gloo",
    ...                  device=torch.device("cpu"))
    >>> done = comm.start(0)
    >>> view, mixed = comm.round(done, groups, extras, W)   # view None: left out of the round
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import torch
import torch.distributed as dist

from decaf_ext.comm.agent_round import AgentRound, MixResult, RoundHooks
from decaf_ext.comm.guard import MessageGuard
from decaf_ext.comm.layout import MessageLayout
from decaf_ext.comm.run_identity import run_identity
from decaf_ext.comm.transport import RoundView, Transport
from decaf_ext.lora import Extras, FactorGroup
from decaf_ext.strategies import Strategy

if TYPE_CHECKING:
    from decaf_ext.comm.kit import Kit
    from decaf_ext.elastic import ChurnSchedule, LiveMixing

#: test-only: (agent, restarted) -> the hooks of that agent's process, or None
HooksFactory = Callable[[int, bool], "RoundHooks | None"]


class AgentComm:
    """The communication stack of agent `agent` of `n_agents`.

    Args:
        strategy: how factors are mixed.
        groups / extras: this agent's factors (A [M, 1, r, n], B [M, 1, m, r]) and extras [1, ...]: they fix the
            message layout.
        store: the run's control-plane store (prefixed per run and attempt).
        backend: "gloo" or "nccl"; device: where the factors live.
        run_key / norm_bound / norm_cap: message safety (:class:`~decaf_ext.comm.guard.MessageGuard`); the run
            key also signs the transport's store values.
        message_dtype / ranks: the message codec and every agent's LoRA rank (None: all equal).
        round_timeout / startup_timeout: seconds (:class:`~decaf_ext.comm.transport.Transport`).
        restarted: whether this process replaces one of the run's (a torchrun restart).
        test_hooks: test-only fault injection, called as test_hooks(agent, restarted); None in production.
        kit: with an agent's loaded TLS kit, the agents talk over mutual TLS
            (:class:`~decaf_ext.comm.tls_transport.TlsTransport`; store and backend are then unused).
        churn / mixing: the run's churn schedule and live-graph mixing (TLS: each agent's own membership, see
            docs/membership.md); None: nobody joins or leaves on schedule, the configured graph.
    """

    def __init__(self, strategy: Strategy, groups: list[FactorGroup], extras: Extras, *, store: dist.Store | None,
                 agent: int, n_agents: int, backend: str, device: torch.device, run_key: bytes | None = None,
                 norm_bound: float | None = None, norm_cap: float | None = None, message_dtype: str = "float32",
                 ranks: Sequence[int] | None = None, round_timeout: float = 60.0, startup_timeout: float = 600.0,
                 restarted: bool = False, test_hooks: HooksFactory | None = None, kit: Kit | None = None,
                 churn: ChurnSchedule | None = None, mixing: LiveMixing | None = None) -> None:
        self.guard = MessageGuard(run_key, norm_bound, norm_cap)
        self.layout = MessageLayout(groups, extras, trains_A=strategy.trains_A, trailer=self.guard.trailer,
                                    message_dtype=message_dtype, ranks=ranks)
        identity = run_identity(self.layout.fingerprint, strategy.name, run_key)  # what every agent must share
        if kit is None:
            self.transport = Transport(store, agent, n_agents, fingerprint=identity, backend=backend,
                                       timeout=round_timeout, startup_timeout=startup_timeout, run_key=run_key)
        else:
            from decaf_ext.comm.tls_transport import TlsTransport

            self.transport = TlsTransport(kit, fingerprint=identity, timeout=round_timeout,
                                          startup_timeout=startup_timeout, server_strategy=not strategy.decentralized,
                                          churn=churn, mixing=mixing)
        self.restarted = restarted or self.transport.incarnation > 1
        self.hooks = None if test_hooks is None else test_hooks(agent, self.restarted)
        if self.hooks is not None:
            self.hooks.layout = self.layout
        self.agent_round = AgentRound(strategy, self.transport, self.layout, guard=self.guard, device=device,
                                      hooks=self.hooks)

    def start(self, rounds_done: int, join_at: int = 0, starters: list[int] | None = None) -> int:
        """Enter the run (:meth:`Transport.start <decaf_ext.comm.transport.Transport.start>`) and bind the message
        tags to its nonce; returns the number of rounds done from which this agent continues."""
        done = self.transport.start(rounds_done, join_at, starters)
        self.guard.bind(self.transport.nonce)
        return done

    def after_local_steps(self, round_index: int) -> None:
        """The point between local training and communication (test hooks only)."""
        if self.hooks is not None:
            self.hooks.after_local_steps(round_index)

    def round(self, round_index: int, groups: list[FactorGroup], extras: Extras,
              W: torch.Tensor | Callable[[RoundView], torch.Tensor]) -> tuple[RoundView | None, MixResult | None]:
        """Agree on round `round_index`'s members, hold their process group and mix this agent's groups / extras
        with theirs (W [N, N]: the round's mixing matrix, or a function of the agreed view giving it, e.g. the
        live graph's, :class:`~decaf_ext.elastic.LiveMixing`). Returns (view, mixed): view None when this agent
        is left out of the round; mixed None when left out or the strategy sends nothing."""
        if self.hooks is not None:
            self.hooks.before_communication(round_index)
        view = self.transport.agree(round_index)
        if view is not None and not self.transport.connect(view):
            view = None
        if view is None:
            return None, None
        return view, self.agent_round.communicate(view, round_index, groups, extras, W(view) if callable(W) else W)
