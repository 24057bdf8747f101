"""Who takes part in each round of a run over the mutual-TLS transport, with no store and no central point: each
agent keeps its own :class:`LiveSet`, from the run's churn schedule (every agent's configuration holds it) and
from what the other agents tell it (see docs/membership.md, "Over TLS").

- planned(r): the agents expected in round r: a ``join:A@R`` agent from round R on, a ``leave:A@R`` agent (or one
  that announced leaving with ``Bye``, until its own Ready of a round from then on says it came back) before R
  only; ``kill:`` entries are crashes nobody is told of; an agent
  whose identity (:mod:`~decaf_ext.comm.run_identity`) differs is refused.
- Entering round r an agent tells every other agent ``Ready`` {round r, fresh}; it then waits (at most a round
  timeout) for the Ready of round r of every *candidate*: a planned agent that is not absent (an agent in round r
  answers a Ready of round r with its own). The round's members are itself and every planned agent whose Ready of
  round r arrived by then; those that sent it ``fresh`` (no state of their own) are its joining members. If more
  agents announced later rounds than it has members, it fell behind and continues with them (:meth:`behind`).
- An agent that missed a round (no Ready within the round timeout) is absent: not waited for until it speaks
  again (a Ready of a later round, e.g. when it restarts) — it is a member of that round as soon as its Ready
  arrives in time. One whose Ready came but whose message did not is still waited for: it said it is alive.

Example::

    >>> live = LiveSet(0, 3, "identity")
    >>> live.on_ready(1, 0, False, "identity") is None
    True
    >>> live.wait(0, fresh=False, timeout=0.1)      # agent 2 sent nothing: absent from now on
    ([0, 1], (), {2})
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import Future
from typing import Any, Callable, Iterable

import grpc
import torch

from decaf_ext.comm import tls_peer
from decaf_ext.comm.run_identity import difference
from decaf_ext.elastic import ChurnSchedule, LiveMixing

READY_ROUNDS = 4  # Ready rounds kept per agent (an insider cannot grow this agent's memory with more)
REASONS_LOGGED = 4  # refusal reasons logged per agent (one cycling through identities cannot grow the log)
Graph = Callable[[int, Iterable[int]], torch.Tensor]  # (round, agents) -> bool adjacency [n, n] over them
Record = Callable[[int, str, str, int], None]  # (round, event kind, message, agent)


class LiveSet:
    """Agent `agent`'s view of who is live in each round of a run of `n_agents`; `identity`: this agent's run
    identity; churn: the run's schedule (None: nobody joins or leaves on schedule); graph(round, agents): the live
    graph over `agents` (None: none, the sender check then lets every planned agent push); record(round, kind,
    message, agent): logs a refusal (once per agent and reason); run: the run's id (its messages carry it).
    Thread-safe."""

    def __init__(self, agent: int, n_agents: int, identity: str, churn: ChurnSchedule | None = None,
                 graph: Graph | None = None, record: Record | None = None, run: bytes = bytes(16)) -> None:
        self.agent, self.n_agents, self.identity, self.record, self.run = agent, n_agents, identity, record, run
        self.entered = (-1, False)  # the round this agent is in, and whether it entered it without a state
        self.churn = churn or ChurnSchedule(n_agents, {}, {})
        self.graph = graph
        self.cond = threading.Condition()
        self.ready: dict[int, dict[int, bool]] = {}  # agent -> {round: fresh}, its newest READY_ROUNDS Readys
        self.left: dict[int, int] = {}  # agent -> the first round it no longer takes part in (Bye)
        self.relayed: set[int] = set()  # agents in `left` only because another agent said so (learn_left)
        self.absent: dict[int, int | None] = {}  # agent -> the round from which it is waited for again (None: not)
        self.refused: dict[int, str] = {}  # agent -> why (its identity differs)
        self.logged: set[tuple[int, str]] = set()  # (agent, why) of the refusals logged, each once

    # ------------------------------------------------------------------------------------------ who, when

    def departs(self, j: int, round_index: int) -> bool:
        """Whether agent j no longer takes part in round `round_index` (scheduled leave or Bye)."""
        kind, at = self.churn.departure(j) or ("", None)
        return (kind == "leave" and at <= round_index) or self.left.get(j, round_index + 1) <= round_index

    def planned(self, round_index: int) -> set[int]:
        """The agents expected in round `round_index` (this one included)."""
        return {j for j in range(self.n_agents) if self.churn.joined_at(j) <= round_index
                and not self.departs(j, round_index) and j not in self.refused}

    def candidates(self, round_index: int) -> set[int]:
        """The planned agents this agent waits for in round `round_index` (not absent)."""
        return {j for j in self.planned(round_index)
                if j not in self.absent or (self.absent[j] is not None and self.absent[j] <= round_index)}

    def present(self, round_index: int) -> dict[int, bool]:
        """Planned agents whose Ready of round `round_index` arrived: {agent: fresh}."""
        planned = self.planned(round_index)
        return {j: rounds[round_index] for j, rounds in self.ready.items()
                if round_index in rounds and j in planned}

    # --------------------------------------------------------------------------------------- from the wire

    def check(self, j: int, identity: Any, round_index: int = -1) -> str | None:
        """Why agent j is refused (its identity differs from this agent's; logged when new, at most REASONS_LOGGED
        reasons per agent), or None (it is, again, admitted)."""
        reason = difference(self.identity, identity)
        with self.cond:
            self.refused.pop(j, None)
            new = reason is not None and (j, reason) not in self.logged and \
                sum(i == j for i, _ in self.logged) < REASONS_LOGGED
            if reason is not None:
                self.refused[j] = reason
            if new:
                self.logged.add((j, reason))
            self.cond.notify_all()
        if new and self.record is not None:
            self.record(round_index, "refused", f"agent {j} refused: it has {reason}", j)
        return reason

    def on_ready(self, j: int, round_index: int, fresh: bool, identity: Any) -> str | None:
        """Agent j entered round `round_index` (`fresh`: without a state of its own); returns why it is refused."""
        reason = self.check(j, identity, round_index)
        if reason is not None:
            return reason
        with self.cond:
            rounds = self.ready.setdefault(j, {})
            rounds[round_index] = fresh
            for old in sorted(rounds)[:-READY_ROUNDS]:
                del rounds[old]
            if self.left.get(j, round_index + 1) <= round_index:  # it says itself that it is in that round: a
                del self.left[j]  # relayed departure was wrong, or it left (Bye) and came back (restarted)
                self.relayed.discard(j)
            if j in self.absent:  # it speaks again: waited for from that round on
                back = self.absent[j]
                self.absent[j] = round_index if back is None else min(back, round_index)
            self.cond.notify_all()
        return None

    def enter(self, round_index: int, fresh: bool) -> bytes:
        """This agent enters round `round_index` (`fresh`: without a state of its own); returns its Ready."""
        self.entered = (round_index, fresh)
        return self.answer(round_index)

    def answer(self, round_index: int) -> bytes:
        """What a Ready of round `round_index` is answered with: this agent's own when it is in that round."""
        entered, fresh = self.entered
        return notice(self.run, round_index, fresh=fresh, identity=self.identity) if entered == round_index else b""

    def on_answer(self, j: int, answer: bytes) -> None:
        """Agent j's answer to this agent's Ready: its own Ready of that round (read like one it sent)."""
        try:
            value = read_notice(answer, self.run)
        except ValueError:
            return
        if type(value.get("fresh")) is bool:
            self.on_ready(j, value["round"], value["fresh"], value.get("identity"))

    def on_bye(self, j: int, round_index: int) -> None:
        """Agent j leaves before round `round_index` (announced: nobody waits for it from then on)."""
        with self.cond:  # its own word replaces a relayed one
            self.left[j] = round_index if j in self.relayed else min(self.left.get(j, round_index), round_index)
            self.relayed.discard(j)
            self.cond.notify_all()

    def learn_left(self, left: Any, others: frozenset[int]) -> None:
        """Take the departures another agent heard of ({agent: round}, from its Hello answer), believed until the
        agent itself sends a Ready of a round from then on (the agent relaying them may be lying)."""
        names = {str(j): j for j in others}  # not int(key): '²' or 5000 digits would raise
        with self.cond:
            for key, at in (left.items() if isinstance(left, dict) else ()):
                if (j := names.get(key)) is not None and type(at) is int and at >= 0 and (
                        j not in self.left or j in self.relayed):  # the earliest relayed round, never over a Bye
                    self.left[j] = min(self.left.get(j, at), at)
                    self.relayed.add(j)
            self.cond.notify_all()

    # ------------------------------------------------------------------------------------------ the round

    def wait(self, round_index: int, fresh: bool, timeout: float) -> tuple[list[int], tuple[int, ...], set[int]]:
        """Wait (at most `timeout` seconds) for the Ready of round `round_index` of every candidate; returns the
        round's members (ascending), its joining members and the candidates that did not come (now absent)."""
        with self.cond:
            self.cond.wait_for(lambda: self.candidates(round_index) - {self.agent} <= set(self.present(round_index)),
                               timeout=timeout)
            present = self.present(round_index)
            missing = self.candidates(round_index) - set(present) - {self.agent}
            for j in missing:
                self.absent[j] = None
            for j in [j for j, back in self.absent.items() if back is not None and back <= round_index]:
                del self.absent[j]  # waited for again, for good
        members = sorted({self.agent, *present})
        return members, tuple(j for j in members if (fresh if j == self.agent else present[j])), missing

    def behind(self, round_index: int, members: list[int]) -> int | None:
        """The round the others have gone on to, when more agents sent Readys of later rounds only (not joining)
        than round `round_index` has members (this agent included): it fell behind and continues there (a lone
        agent that ran ahead is not followed); else None."""
        with self.cond:
            ahead = {j: max(rounds) for j, rounds in self.ready.items() if rounds and j not in members
                     and max(rounds) > round_index and not rounds[max(rounds)] and j in self.planned(max(rounds))}
        return min(ahead.values()) if len(ahead) > len(members) else None

    def may_push(self, j: int, round_now: int) -> bool:
        """Whether agent j may push mixing messages to this agent now: a neighbour in the live graph of the
        current or the next round as this agent knows it — over the agents expected or present, or over those
        present only (the view of an agent that has stopped waiting for the others; for the next round, those
        present in this round count as present, so that in a graph that re-links, such as a star, an agent is
        not let in merely because the hub's Ready of the next round has not come yet); with and without the
        joining ones."""
        with self.cond:
            for round_index in (max(round_now, 0), max(round_now, 0) + 1):
                present = self.present(round_index)
                joining = {i for i, fresh in present.items() if fresh}
                expected = self.candidates(round_index) | set(present) | {self.agent}
                if j not in expected:
                    continue
                if self.graph is None:
                    return True
                came = set(present) | set(self.present(max(round_now, 0))) | {self.agent}
                if any(j in group and bool(self.graph(round_index, sorted(group))[self.agent, j])
                       for group in (expected, expected - joining, came, came - joining)):
                    return True
        return False


def running(states: dict[int, dict[str, Any]]) -> dict[int, int]:
    """The round each agent whose state (a ``Hello`` answer) is in `states` is in (only those in a round, >= 0)."""
    return {j: s["round"] for j, s in states.items() if type(s.get("round")) is int and s["round"] >= 0}


def live_graph(neighbours: dict[int, list[int]], mixing: LiveMixing | None) -> Graph:
    """The live graph of a round over some agents: the mixing's when it re-weights on the live graph, else the
    configured graph (`neighbours`: every agent's, from the kit) restricted to them."""
    if mixing is not None and mixing.reweights:
        return mixing.graph
    n = len(neighbours)
    configured = torch.zeros(n, n, dtype=torch.bool)
    for i, theirs in neighbours.items():
        configured[i, theirs] = True

    def restricted(round_index: int, agents: Iterable[int]) -> torch.Tensor:
        mask = torch.zeros(n, dtype=torch.bool)
        mask[list(agents)] = True
        return configured & mask[:, None] & mask[None, :]

    return restricted


# ----------------------------------------------------------------------------------------- the messages


def notice(run: bytes, round_index: int, **fields: Any) -> bytes:
    """A Ready or Bye message: JSON {run, round, ...}."""
    return json.dumps({"run": run.hex(), "round": round_index, **fields}).encode()


def read_notice(data: bytes, run: bytes) -> dict[str, Any]:
    """A Ready / Bye message of run `run`; ValueError naming what is wrong otherwise."""
    if len(data) > tls_peer.HEADER_LIMIT:
        raise ValueError("longer than the header limit")
    try:
        value = json.loads(data)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    if not isinstance(value, dict) or value.get("run") != run.hex():
        raise ValueError("not a message of this run")
    if type(value.get("round")) is not int or value["round"] < 0:
        raise ValueError("round is not a round index")
    return value


def handlers(live: LiveSet, others: frozenset[int]) -> dict[str, grpc.RpcMethodHandler]:
    """The unary methods ``Ready`` and ``Bye`` of agent live.agent's server (callers: the run's other agents,
    named by their certificates). A Ready of round r is answered with this agent's own Ready of round r when it
    is in that round (:meth:`LiveSet.answer`), so that a caller to which its own channel is down still hears it."""

    def receive(request: bytes, context: grpc.ServicerContext) -> tuple[int, dict[str, Any]]:
        sender = tls_peer.caller(context)
        if sender not in others:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "not an agent of this run")
        try:
            return sender, read_notice(request, live.run)
        except ValueError as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))

    def ready(request: bytes, context: grpc.ServicerContext) -> bytes:
        sender, value = receive(request, context)
        if type(value.get("fresh")) is not bool:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "fresh is not a boolean")
        reason = live.on_ready(sender, value["round"], value["fresh"], value.get("identity"))
        if reason is not None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"agent {live.agent} refuses agent {sender}: "
                                                               f"{reason}")
        return live.answer(value["round"])

    def bye(request: bytes, context: grpc.ServicerContext) -> bytes:
        sender, value = receive(request, context)
        live.on_bye(sender, value["round"])
        return b""

    return {"Ready": tls_peer.unary(ready), "Bye": tls_peer.unary(bye)}


def tell(channels: dict[int, grpc.Channel], name: str, message: bytes, agents: Iterable[int], timeout: float,
         waiting: Iterable[int] = (), answered: Callable[[int, bytes], None] | None = None) -> list[Future]:
    """Send the unary `name` `message` to each of `agents` in the background (a failure is ignored: an agent
    that is not there misses it); to those in `waiting` once their channel is (again) connected, within
    `timeout`, to the others only if it is connected now. answered(agent, answer) takes each non-empty answer.
    Each call is a gRPC future, not a thread: calls an agent never answers hold back no other call."""
    waiting = set(waiting)

    def one(j: int) -> Future:
        done: Future = Future()

        def finished(call: grpc.Future) -> None:
            try:
                answer = call.result()
                if answer and answered is not None:
                    answered(j, answer)
            except (grpc.RpcError, grpc.FutureCancelledError):
                pass  # that agent misses it
            finally:
                done.set_result(None)

        call = channels[j].unary_unary(tls_peer.method(name)).future(message, timeout=timeout,
                                                                     wait_for_ready=j in waiting)
        call.add_done_callback(finished)
        return done

    return [one(j) for j in sorted(agents)]
