"""One agent's communication round in its own process: hear from the round's members over a
:class:`~decaf_ext.comm.transport.Transport`, check what arrived, and mix with the strategy in its [1, k] form.

Built for every runtime by :class:`~decaf_ext.comm.agent_comm.AgentComm` (the distributed runtime and the
bring-your-own-loop API). A decentralized strategy hears from the agent's graph neighbours that are members
of the round and mixes with the agent's row of W restricted to those it heard from, own factors first; the
weight of a missing neighbour (left out, failed, rejected) stays with the agent's own factors, so the row still
sums to 1. A server strategy (``decentralized`` False) hears from every member and computes the round as a
server would (every member in agent order, the uniform [k, k] W), so every member keeps the same result.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from decaf_ext.comm.round_view import RoundView
from decaf_ext.comm.transport_base import TransportBase
from decaf_ext.lora import Extras, FactorGroup, select_agent
from decaf_ext.comm.guard import BROADCAST, MessageGuard, TagContext, message_norm
from decaf_ext.comm.layout import MessageLayout
from decaf_ext.strategies import Strategy

log = logging.getLogger(__name__)




class RoundHooks:
    """Test-only fault injection around one agent's round (a subclass overrides what it needs). Production code
    passes None and never calls these. ``layout``: the agent's message layout, set by
    :class:`~decaf_ext.comm.agent_comm.AgentComm` for hooks that craft messages."""

    layout: MessageLayout | None = None

    def after_local_steps(self, round_index: int) -> None:
        """Called after the agent's local steps of round `round_index`."""

    def before_communication(self, round_index: int) -> None:
        """Called before the agent agrees on round `round_index`'s members."""

    def outgoing(self, round_index: int, data: torch.Tensor, seal: Callable[[torch.Tensor], torch.Tensor]
                 ) -> torch.Tensor:
        """The buffer sent in round `round_index`: seal(data) by default (seal(data, wire=W) tags a wire W of its
        own making instead of data's encoding)."""
        return seal(data)

    def evaluation(self, round_index: int, data: torch.Tensor, seal: Callable[[torch.Tensor], torch.Tensor]
                   ) -> torch.Tensor:
        """The evaluation buffer sent after round `round_index` (statistics, then factors): seal(data) by default."""
        return seal(data)


@dataclass
class MixResult:
    """One round's outcome for this agent: new groups (A [M, 1, r, n], B [M, 1, m, r]) and extras [1, ...],
    the agents it mixed with (this agent first), the bytes it sent, and what it mixed: the input groups of its
    call of the strategy (A [M, k, r, n], B [M, k, m, r]) and its row of that call's W ([1, k]), for the mixing
    error (:mod:`decaf_ext.lora.mixing`)."""

    groups: list[FactorGroup]
    extras: Extras
    agents: list[int]
    bytes_sent: int
    received: list[FactorGroup]
    weights: torch.Tensor


class AgentRound:
    """strategy: the policy; transport: this agent's transport (its ``agent`` is this agent); layout: the
    buffer layout (its trailer = guard.trailer); guard: tags and norm bound; device: where the model's factors
    live (buffers travel on the transport's device); hooks: test-only fault injection (None in production)."""

    def __init__(self, strategy: Strategy, transport: TransportBase, layout: MessageLayout, *, guard: MessageGuard,
                 device: torch.device, hooks: RoundHooks | None = None) -> None:
        self.strategy, self.transport, self.layout = strategy, transport, layout
        self.guard, self.device, self.hooks = guard, device, hooks
        self.agent = transport.agent
        self.buffer_device = device if transport.backend == "nccl" else torch.device("cpu")

    def communicate(self, view: RoundView, round_index: int, groups: list[FactorGroup], extras: Extras,
                    W: torch.Tensor) -> MixResult | None:
        """Mix this agent's groups / extras (one agent) with the members of `view`; W [N, N] is the round's
        mixing matrix (only this agent's row is read). None when the strategy sends nothing.

        This agent's own factors enter exact; a neighbour's as decoded from its message (the layout's
        message dtype)."""
        if self.strategy.bytes_per_message(groups, extras) == 0:
            return None
        W = W.to(torch.float64).cpu()
        row, joining = W[self.agent], self.agent in view.joining
        if self.strategy.decentralized:  # its row's neighbours, and a joiner listening to it (its column)
            neighbours = [j for j in range(len(row)) if j != self.agent and row[j] > 0]
            peers = [j for j in range(len(row)) if j != self.agent and (row[j] > 0 or W[j, self.agent] > 0)]
        else:
            neighbours = peers = [j for j in view.agents if j != self.agent]
        peers = [j for j in peers if j in view.members]
        # one row per agent that may enter the strategy call, in an order of which every call's order is a
        # subsequence: this agent's packed data and each neighbour's message decoded in place (no other copy)
        slots = [self.agent, *peers] if self.strategy.decentralized else sorted([self.agent, *peers])
        rows = torch.empty(len(slots), self.layout.data_numel, dtype=self.layout.dtype, device=self.device)
        own = self.layout.pack(groups, extras, out=rows[slots.index(self.agent)])
        wire = self.layout.encode(own, self.agent).to(self.buffer_device)
        heard = self._exchange(view, round_index, own, wire, peers, groups, extras, rows, slots)
        live = [j for j in heard if j in neighbours and j not in view.joining]
        missing = [j for j in neighbours if j not in heard] if self.strategy.decentralized else []
        if missing:
            log.info("agent %d, round %d: mixing without agents %s (their weight %.4g stays with this agent)",
                     self.agent, round_index, missing, float(row[missing].sum()))
        order, W_round = round_inputs(self.strategy, self.agent, row, live, missing, joining)
        inputs = self.layout.unpack(compact(rows, slots, order), groups, extras)
        del rows, own, wire  # the inputs are copies, unless they share the rows' memory
        mixed = self.strategy.communicate(*inputs, W_round)
        new_groups, new_extras = select_agent(*mixed, output_index(order, self.agent))
        sent = self.layout.sent_bytes_of(self.agent, server=not self.strategy.decentralized) * (
            len(peers) if self.strategy.decentralized else 1)
        return MixResult(new_groups, new_extras, [self.agent, *live], sent, inputs[0],
                         W_round[output_index(order, self.agent)][None])

    def _context(self, view: RoundView, purpose: str, sender: int, receiver: int) -> TagContext:
        return TagContext(purpose, view.round, view.group, sender, view.members[sender], receiver)

    def _exchange(self, view: RoundView, round_index: int, own: torch.Tensor, wire: torch.Tensor, peers: list[int],
                  groups: list[FactorGroup], extras: Extras, rows: torch.Tensor, slots: list[int]) -> list[int]:
        """Send this agent's wire to `peers` (a decentralized strategy) or every member (a server strategy),
        decode each message into its row of `rows` [len(slots), data_numel] (row k: agent slots[k]) and return
        the senders whose message passed every check, ascending."""
        decentralized = self.strategy.decentralized

        def seal(data: torch.Tensor, receiver: int, crafted: torch.Tensor | None = None) -> torch.Tensor:
            if crafted is None:
                crafted = wire if data is own else self.layout.encode(data, self.agent).to(self.buffer_device)
            return self.guard.seal(crafted, self._context(view, "mix", self.agent, receiver))

        def sealed(receiver: int) -> torch.Tensor:
            if self.hooks is None:
                return seal(own, receiver)
            return self.hooks.outgoing(round_index, own, lambda data, wire=None: seal(data, receiver, wire))

        norms: dict[int, float] = {}

        def validate(j: int, buffer: torch.Tensor) -> str | None:
            receiver = self.agent if decentralized else BROADCAST
            data, reason = self.guard.open(buffer[:self.layout.numel_of(j)], self._context(view, "mix", j, receiver))
            reason = reason or self.layout.check(data, j)
            if reason is None:
                row = rows[slots.index(j)][None]
                self.layout.decode(data[None, :self.layout.wire_numel_of(j)].to(self.device), j, out=row)
                theirs, their_extras = self.layout.unpack(row, groups, extras)
                norms[j] = message_norm(theirs)
                reason = self.guard.check_values(theirs, their_extras, norms[j])
            return reason

        if decentralized:
            received = self.transport.send_and_receive(view, {j: sealed(j) for j in peers}, validate,
                                                       sizes={j: self.layout.numel_of(j) for j in peers})
        else:  # all_gather moves equal sizes: with unequal ranks every buffer is padded to the largest
            buffer = sealed(BROADCAST)
            padded = torch.cat([buffer, buffer.new_zeros(self.layout.numel - buffer.numel())])
            received = self.transport.gather_checked(view, padded, validate)
        if self.guard.norm_bound is None:
            return sorted(received)
        for j, reason in self.guard.check_relative({j: norms[j] for j in received}, message_norm(groups)).items():
            self.transport.record_event(view.round, "rejected", f"buffer of agent {j} rejected ({reason})",
                                        agent=j, reason=reason)
            del received[j]
        return sorted(received)


def round_inputs(strategy: Strategy, agent: int, row: torch.Tensor, heard: list[int], missing: list[int],
                 joining: bool = False) -> tuple[list[int], torch.Tensor]:
    """The agents whose factors enter `agent`'s call of the strategy, in input order, and the W of that call.

    row: float64 [N], the agent's row of the round's W; heard: the agents it received from (and mixes with);
    missing: graph neighbours it did not (their weight stays with its own factors). Decentralized:
    ([agent, *heard], W [1, k]); a server strategy: (every agent in ascending order, the uniform W [k, k]) as the
    server would compute it. The agent's own output is row :func:`output_index` of the call. A `joining` agent
    (see :mod:`decaf_ext.elastic`) starts from the consensus of what it heard: weight 0 on its own factors, its
    row renormalized over `heard` (decentralized), or the server's mean of the others.
    """
    if strategy.decentralized:
        if joining and heard:
            weights = row[heard] / row[heard].sum()
            return [agent, *heard], torch.cat([weights.new_zeros(1), weights])[None]
        own = (row[agent] + row[missing].sum()).reshape(1)
        return [agent, *heard], torch.cat([own, row[heard]])[None]
    order = sorted(heard) if joining and heard else sorted([agent, *heard])
    return order, torch.full((len(order), len(order)), 1.0 / len(order), dtype=torch.float64)


def compact(rows: torch.Tensor, slots: list[int], order: list[int]) -> torch.Tensor:
    """The rows of agents `order` (a subsequence of `slots`, row k of `rows` being agent slots[k]'s), in that
    order: moved up in place, rows [len(order), ...] sharing the memory of `rows`.

    >>> compact(torch.arange(4.0)[:, None], [0, 1, 2, 3], [0, 2]).flatten().tolist()
    [0.0, 2.0]
    """
    for k, j in enumerate(order):
        if (source := slots.index(j)) != k:
            rows[k].copy_(rows[source])
    return rows[:len(order)]


def output_index(order: list[int], agent: int) -> int:
    """Which output row of the strategy call of :func:`round_inputs` is `agent`'s (0 when a joining agent is not
    among the inputs: every output row of a server call is the same)."""
    return order.index(agent) if agent in order else 0
