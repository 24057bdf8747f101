"""The mutual-TLS transport of a distributed run across sites: agents talk to each other directly over gRPC, with
no store and no other central point (see docs/deploy.md and docs/security.md).

Identity: each agent holds its kit (:mod:`decaf_ext.comm.kit`): a certificate naming it, signed by the run's CA,
and the peers list. Both ends of every connection verify the other's certificate against that CA only; the
client checks that it reached the agent it dialled, the server reads the caller's agent id from its certificate
and aborts (PERMISSION_DENIED) before reading any message of a caller that may not send it: ``Mix`` messages
from the agent's neighbours in the live graph only (from every run agent for a server strategy such as fedavg),
``Gather`` (the evaluation), ``Hello``, ``Ready`` and ``Bye`` from the run's agents.

Membership (:mod:`~decaf_ext.comm.tls_membership`): entering a round an agent tells every agent ``Ready`` and
waits (at most a round timeout) for its candidates' Readys; the round's :class:`RoundView` (group 0, incarnation
1) holds those that came. Data: each agent pushes its buffer to each receiver (a client stream: JSON header
{run, round, seq, numel, dtype}, then chunks); the receiver holds a push until it has entered that exchange,
checks the declared size against the one it expects from that sender before it keeps any chunk (larger or
smaller is a logged rejection, never a crash), and refuses pushes of rounds it has left (stale) and duplicates.
At start an agent asks the others for their round (``Hello``) and continues after the lowest one (a restarted
agent or a scheduled joiner enters once the others have entered that round, so that its exchanges overlap
theirs); at construction its graph neighbours expected in its first round must answer within startup_timeout
with the same run identity (:mod:`~decaf_ext.comm.run_identity`), or it stops with one line naming the neighbour
and what differs. The run's nonce (message tags) is the kit's run id.

Example::

    >>> transport = TlsTransport(load_kit("kit/agent_01"), fingerprint=layout.fingerprint, timeout=60.0,
    ...                          startup_timeout=600.0)
    >>> done = transport.start(0)
    >>> view = transport.agree(done)
    >>> received = transport.send_and_receive(view, {0: buffer, 2: buffer})
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, Any, Iterator

import grpc
import torch

from decaf_ext.comm import tls_membership, tls_peer
from decaf_ext.comm.kit import Kit
from decaf_ext.comm.round_view import RoundView
from decaf_ext.comm.run_identity import difference
from decaf_ext.comm.transport import check_timeout
from decaf_ext.comm.transport_base import TransportBase, Validator, unfilled
from decaf_ext.errors import ConfigError

if TYPE_CHECKING:
    from decaf_ext.elastic import ChurnSchedule, LiveMixing

Key = tuple[str, int, int]  # (method, round, sequence number of the round's gathers)
HELLO_TIMEOUT = 5.0  # seconds to ask a running agent for its round at start
AWAIT_POLL = 0.1  # seconds between Hellos of a rejoining agent waiting for its neighbours to reach its round
STREAMS_PER_SENDER = 4  # pushes one sender may have open at once (the server's workers cover every sender's)


class TlsTransport(TransportBase):
    """Agent kit.agent's end of a run over mutual TLS (module docstring).

    kit: this agent's loaded kit; fingerprint: the run identity; timeout: seconds of one round's exchange;
    startup_timeout: seconds to wait for the others at start; server_strategy: the strategy mixes with every
    member; churn / mixing: the run's churn schedule and live-graph mixing (None: none; the configured graph).
    ConfigError (after closing what it opened) if the agent cannot listen on its address, or a neighbour does
    not answer or has another identity."""

    backend = "tls"

    def __init__(self, kit: Kit, *, fingerprint: str, timeout: float, startup_timeout: float,
                 server_strategy: bool = False, churn: ChurnSchedule | None = None,
                 mixing: LiveMixing | None = None) -> None:
        check_timeout("round_timeout", timeout)
        check_timeout("startup_timeout", startup_timeout)
        self.kit, self.agent, self.n_agents = kit, kit.agent, kit.n_agents
        self.fingerprint, self.timeout, self.startup_timeout = fingerprint, timeout, startup_timeout
        self.window = 2 * timeout  # of an exchange: agents that waited unequally in agree enter it a timeout apart
        self.others = frozenset(j for j in range(self.n_agents) if j != self.agent)
        self.events: list[dict[str, Any]] = []
        self.incarnation, self.group, self.round_now, self._latest = 1, 0, -1, -1
        self.fresh = False  # joining without a state of its own: it listens first (RoundView.joining)
        self.absent: frozenset[int] = frozenset()
        graph = None if server_strategy else tls_membership.live_graph(kit.all_neighbours, mixing)
        self.live = tls_membership.LiveSet(self.agent, self.n_agents, fingerprint, churn, graph,
                                           lambda r, kind, text, j: self.record_event(r, kind, text, agent=j), kit.run)
        self._view: RoundView | None = None  # the newest agreed view
        self._byes: list = []  # Byes under way
        self._cond = threading.Condition()
        self._expected: dict[Key, dict[int, tuple[int, torch.dtype]]] = {}
        self._inbox: dict[Key, dict[int, torch.Tensor]] = {}
        self._done: set[Key] = set()
        self._gathers = 0  # gathers so far in round_now
        self._open: dict[int, int] = {}  # pushes being received, per sender
        self._channels = {j: tls_peer.channel_to(kit, j) for j in self.others}
        self._pool = ThreadPoolExecutor(max_workers=max(1, 2 * len(self.others)))
        workers = 6 * self.n_agents + 4
        handlers = {"Hello": tls_peer.unary(self._hello), "Mix": tls_peer.streaming(self._receiver("Mix")),
                    "Gather": tls_peer.streaming(self._receiver("Gather")),
                    **tls_membership.handlers(self.live, self.others)}
        try:
            self._server = tls_peer.serve(kit, handlers, workers)
        except OSError as error:
            self._close_channels()
            raise ConfigError(f"kit: agent {self.agent} {error} (its address in {kit.folder}/peers.json)") from None
        try:
            self._check_neighbours()
        except ConfigError:
            self.close()
            raise

    # ----------------------------------------------------------------------------------- control plane

    @property
    def nonce(self) -> bytes:
        """The run's 16 bytes: the kit's run id (message tags are bound to it)."""
        return self.kit.run

    @property
    def latest(self) -> int:
        """The newest round this agent has entered (-1 before the first)."""
        return self._latest

    def _hello(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        caller = tls_peer.caller(context)
        if caller not in self.others:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "not an agent of this run")
        try:  # an identity longer than a header is none (its reason, logged, quotes it)
            self.live.check(caller, json.loads(request).get("identity") if len(request) <= tls_peer.HEADER_LIMIT
                            else None, self.round_now)
        except (ValueError, RecursionError, AttributeError):
            self.live.check(caller, None, self.round_now)
        return json.dumps({"round": self.round_now, "fingerprint": self.fingerprint, "run": self.kit.run.hex(),
                           "left": dict(self.live.left)}).encode()

    def _ask(self, j: int, timeout: float) -> dict[str, Any] | str:
        """Agent j's state {round, fingerprint, run, left}, or why it could not be had."""
        try:
            answer = self._channels[j].unary_unary(tls_peer.method("Hello"))(
                json.dumps({"identity": self.fingerprint}).encode(), timeout=timeout, wait_for_ready=True)
            state = json.loads(answer)
        except grpc.RpcError as error:
            return f"{error.code().name}: {error.details()}"
        except (ValueError, RecursionError):
            return "an unreadable answer"
        return state if isinstance(state, dict) else "an answer that is not a state"

    def _check_neighbours(self) -> None:
        """Every graph neighbour expected in this agent's first round answers in startup_timeout, of this run."""
        first = self.live.planned(self.live.churn.joined_at(self.agent))
        futures = {j: self._pool.submit(self._ask, j, self.startup_timeout) for j in self.kit.neighbours
                   if j in first}
        for j, future in sorted(futures.items()):
            state = future.result()
            where = f"neighbour agent {j} at {self.kit.address(j)}"
            if isinstance(state, str):
                raise ConfigError(f"kit: {where} unreachable within startup_timeout {self.startup_timeout:g} s "
                                  f"({state[:160]})")
            if state.get("run") != self.kit.run.hex() or state.get("fingerprint") != self.fingerprint:
                theirs = "another run" if state.get("run") != self.kit.run.hex() else difference(
                    self.fingerprint, state.get("fingerprint"))
                raise ConfigError(f"kit: {where} runs another configuration (it has {theirs}; every agent must use "
                                  "the same kit, model, rank, algorithm and run key)")

    def start(self, rounds_done: int, join_at: int = 0, starters: list[int] | None = None) -> int:
        """Enter the run with `rounds_done` rounds behind this agent, not before round `join_at` (a scheduled
        joiner, :mod:`decaf_ext.elastic`); returns the round to continue from: its own, or the one after the round
        the running agents are in (the lowest they report; a restarted agent rejoins). At a fresh start it waits
        (startup_timeout) for the agents planned in its first round to answer; joining a running run, it tells the
        others the round it enters (Ready) and waits until they have entered it. `starters`: the schedule says."""
        first, asked = max(rounds_done, join_at), self.live.planned(max(rounds_done, join_at)) - {self.agent}
        states = self._states(asked, HELLO_TIMEOUT if first else self.startup_timeout)
        # nobody is in a round: the whole run (re)starts, wait for the others
        if first and not tls_membership.running(states):
            states = self._states(asked, self.startup_timeout)
        for state in states.values():  # Byes sent before this agent was up to hear them
            self.live.learn_left(state.get("left"), self.others)
        # the lowest round a running agent is in: one agent announcing a far later round cannot make it skip
        lowest = min(tls_membership.running(states).values(), default=-1)
        done = max(lowest + 1 if lowest > rounds_done else rounds_done, join_at)
        self.round_now = self._latest = done - 1
        self.fresh = rounds_done == 0 and done > 0
        if done > rounds_done:
            self.record_event(done - 1, "joining", f"joining the running group in round {done}")
            self._announce(done, self.others, self.live.enter(done, self.fresh))
            self._await_round(done, scheduled=join_at > 0)
        return done

    def _announce(self, round_index: int, agents, message: bytes) -> None:  # Ready: it enters round `round_index`
        tls_membership.tell(self._channels, "Ready", message, agents, min(self.timeout, HELLO_TIMEOUT),
                            self.live.candidates(round_index), self.live.on_answer)

    def _states(self, agents: set[int] | frozenset[int], timeout: float) -> dict[int, dict[str, Any]]:
        """The states of `agents` that answer Hello within `timeout` for this run with this identity."""
        futures = {j: self._pool.submit(self._ask, j, timeout) for j in sorted(agents)}
        states = {j: future.result() for j, future in futures.items()}
        return {j: s for j, s in states.items() if isinstance(s, dict) and s.get("run") == self.kit.run.hex()
                and s.get("fingerprint") == self.fingerprint}

    def _await_round(self, round_index: int, scheduled: bool = False) -> None:
        """Wait (at most startup_timeout) until every running agent expected in round `round_index` has entered
        it, so that this agent's first exchange overlaps theirs (a `scheduled` joiner: and some agent is running)."""
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            rounds = tls_membership.running(self._states(self.live.planned(round_index) - {self.agent}, HELLO_TIMEOUT))
            if (rounds or not scheduled) and min(rounds.values(), default=round_index) >= round_index:
                return
            time.sleep(AWAIT_POLL)

    def current_view(self) -> RoundView:
        """The newest agreed view; before the first round, the agents expected in it."""
        members = self.live.candidates(max(self._latest, 0)) | {self.agent}
        return self._view or RoundView(self._latest, dict.fromkeys(sorted(members), 1), self.group)

    def agree(self, round_index: int) -> RoundView | None:
        """Enter round `round_index`: tell every agent (Ready), wait (at most a round timeout) for the candidates'
        Readys and return the round's view (members: who came; joining: those that came without a state); None
        when the others have gone on without it (:meth:`LiveSet.behind`): ``latest`` is then their round - 1."""
        with self._cond:
            if round_index != self.round_now:
                self._gathers = 0
            self.round_now = round_index
            self._latest = max(self._latest, round_index)
            self._done = {key for key in self._done if key[1] >= round_index - 1}
            self._cond.notify_all()  # pushes of older rounds waiting here are now stale
        self._announce(round_index, {j for j in self.others if not self.live.departs(j, round_index)},
                       self.live.enter(round_index, self.fresh))
        members, joining, _ = self.live.wait(round_index, self.fresh, self.timeout)
        if (ahead := self.live.behind(round_index, members)) is not None:
            self._latest = ahead - 1
            self.record_event(round_index, "left_out", f"the others are in round {ahead}: continuing there")
            return None
        previous = self._view.agents if self._view is not None else members
        for j in sorted(set(previous) - set(members)):
            self.record_event(round_index, *(("peer_left", f"agent {j} left the run") if self.live.departs(
                j, round_index) else ("peer_lost", f"agent {j} missed the round timeout and is left out")), agent=j)
        self._view = RoundView(round_index, dict.fromkeys(members, 1), self.group, joining)
        return self._view

    def leave(self, round_index: int) -> None:
        """Announce that this agent takes part in rounds before `round_index` only (Bye to every agent, each
        delivered once it listens, within startup_timeout; close waits for them): nobody waits for it from then on."""
        self._byes = tls_membership.tell(self._channels, "Bye", tls_membership.notice(
            self.kit.run, round_index), self.others, self.startup_timeout, waiting=self.others)

    def connect(self, view: RoundView) -> bool:
        """Nothing to form: connections are per neighbour and made (again) on demand."""
        return True

    # ----------------------------------------------------------------------------------------- data plane

    def _stale(self, key: Key) -> bool:
        return key[1] < self.round_now or key in self._done

    def _may_push(self, name: str, sender: int | None) -> bool:
        """Whether `sender` may push `name` messages now: Gather (and a server strategy's Mix) from any run agent,
        Mix from the neighbours in the live graph (:meth:`LiveSet.may_push`)."""
        return sender in self.others and (name == "Gather" or self.live.graph is None
                                          or self.live.may_push(sender, self.round_now))

    def _receiver(self, name: str):
        def receive(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
            sender = tls_peer.caller(context)
            if not self._may_push(name, sender):  # before reading any message of the stream
                self._refuse(context, name, sender, "now")
            deadline = context.time_remaining()
            if deadline is None or deadline > self.window + 1.0:  # the gRPC core ends the stream at its deadline
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"a push needs a deadline within {self.window:g} s")
            with self._cond:
                if self._open.get(sender, 0) >= STREAMS_PER_SENDER:
                    context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{tls_peer.caller_name(sender)} has "
                                                                      f"{STREAMS_PER_SENDER} pushes open")
                self._open[sender] = self._open.get(sender, 0) + 1
            try:
                return take(requests, context, sender)
            finally:
                with self._cond:
                    self._open[sender] -= 1

        def take(requests: Iterator[bytes], context: grpc.ServicerContext, sender: int) -> bytes:
            try:
                header = tls_peer.parse_header(next(requests, None))
            except ValueError as error:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"header: {error}")
            if header["run"] != self.kit.run.hex():
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, "another run")
            key = (name, header["round"], header["seq"])
            with self._cond:
                self._cond.wait_for(lambda: key in self._expected or self._stale(key),
                                    timeout=min(context.time_remaining() or self.window, self.window))
                if key not in self._expected:
                    context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                  f"agent {self.agent} is in round {self.round_now}, not in {key}")
                wanted = self._expected[key].get(sender)
                if wanted is not None and sender in self._inbox[key]:
                    context.abort(grpc.StatusCode.ALREADY_EXISTS, "a duplicate")
            if wanted is None:  # let in while the round's members were open, not a sender of the agreed exchange
                self._refuse(context, name, sender, f"in exchange {key[1]}.{key[2]}", "unexpected")
            declared = (header["numel"], tls_peer.DTYPES[header["dtype"]])
            if declared != wanted:
                return self._reject(context, key, sender, f"declared {declared[0]} x {header['dtype']} instead "
                                                          f"of {wanted[0]} x {str(wanted[1]).removeprefix('torch.')}")
            tensor, reason = tls_peer.receive(requests, *wanted)
            if tensor is None:
                return self._reject(context, key, sender, reason)
            with self._cond:
                if key not in self._expected or sender in self._inbox[key]:
                    context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the exchange ended meanwhile")
                self._inbox[key][sender] = tensor
                self._cond.notify_all()
            return b""

        return receive

    def _refuse(self, context: grpc.ServicerContext, name: str, sender: int | None, when: str,
                kind: str = "refused") -> None:
        """Log (event `kind`: "refused", or "unexpected" for a run agent the agreed exchange leaves out, an honest
        one at the edge of a membership change included) and abort (PERMISSION_DENIED) a push from `sender`, which
        may not send `name` messages `when`."""
        self.record_event(self.round_now, kind, f"{name} push from {tls_peer.caller_name(sender)} refused (not a "
                          f"sender this agent expects {when})", agent=sender, what=name)
        context.abort(grpc.StatusCode.PERMISSION_DENIED, f"agent {self.agent} takes no {name} messages from "
                                                         f"{tls_peer.caller_name(sender)} {when}")

    def _reject(self, context: grpc.ServicerContext, key: Key, sender: int, reason: str) -> bytes:
        self.record_event(key[1], "rejected", f"buffer of agent {sender} rejected ({reason})", agent=sender,
                          reason=reason)
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, reason)

    def _push(self, j: int, key: Key, tensor: torch.Tensor, deadline: float) -> str | None:
        """Stream `tensor` to agent j; None when it took it, else why not."""
        header = {"run": self.kit.run.hex(), "round": key[1], "seq": key[2]}
        call = self._channels[j].stream_unary(tls_peer.method(key[0]))
        try:
            call(tls_peer.messages(header, tensor), timeout=max(deadline - time.monotonic(), 0.001),
                 wait_for_ready=True)
            return None
        except grpc.RpcError as error:
            return f"{error.code().name}: {error.details()}"

    def _exchange(self, key: Key, outgoing: dict[int, torch.Tensor], expected: dict[int, tuple[int, torch.dtype]]
                  ) -> dict[int, torch.Tensor]:
        """Push outgoing[j] to each j and collect what the `expected` senders pushed, within one round timeout."""
        deadline = time.monotonic() + self.window
        with self._cond:
            self._expected[key], self._inbox[key] = expected, {}
            self._cond.notify_all()
        pushes = {j: self._pool.submit(self._push, j, key, tensor, deadline) for j, tensor in outgoing.items()}
        with self._cond:
            self._cond.wait_for(lambda: len(self._inbox[key]) == len(expected), timeout=self.window)
        wait(pushes.values(), timeout=max(deadline - time.monotonic(), 0.0) + 1.0)
        with self._cond:
            del self._expected[key]
            received = self._inbox.pop(key)
            self._done.add(key)
            self._cond.notify_all()
        for j, push in sorted(pushes.items()):
            failure = push.result() if push.done() else "no answer"
            if failure is not None:
                self.record_event(key[1], "transport", f"{key[0]} push to agent {j} failed ({failure[:200]})",
                                  agents=[j], what=key[0], reason=failure[:200])
        for j in sorted(set(expected) - set(received)):
            self.record_event(key[1], "peer_lost", f"no {key[0]} message from agent {j} within the round timeout",
                              agent=j)  # still waited for next round: its Ready said it is alive
        return received

    def send_and_receive(self, view: RoundView, buffers: dict[int, torch.Tensor], validate: Validator | None = None,
                         sizes: dict[int, int] | None = None) -> dict[int, torch.Tensor]:
        """Send buffers[j] (1-D) to every agent j in `buffers` and receive theirs, of `sizes[j]` elements (default:
        as many as buffers[j]); returns those that arrived within the round timeout and passed the checks (as
        :meth:`Transport.send_and_receive <decaf_ext.comm.transport.Transport.send_and_receive>`)."""
        sizes = sizes or {j: buffer.numel() for j, buffer in buffers.items()}
        expected = {j: (sizes[j], buffer.dtype) for j, buffer in buffers.items()}
        received = self._exchange(("Mix", view.round, 0), {j: b.cpu() for j, b in buffers.items()}, expected)
        return {j: tensor for j, tensor in sorted(received.items())
                if self._accept(view.round, j, tensor, sizes[j], buffers[j].dtype, validate)}

    def all_gather(self, view: RoundView, buffer: torch.Tensor) -> torch.Tensor:
        """Every member's `buffer` [n] stacked as [len(view.members), n] in view.agents order; a member whose
        buffer did not arrive has an :func:`unfilled` row (and is listed in ``absent``)."""
        with self._cond:
            seq = self._gathers
            self._gathers += 1
        others = [j for j in view.agents if j != self.agent]
        received = self._exchange(("Gather", view.round, seq), dict.fromkeys(others, buffer.cpu()),
                                  dict.fromkeys(others, (buffer.numel(), buffer.dtype)))
        self.absent = frozenset(set(others) - set(received))
        rows = [buffer.cpu() if j == self.agent else received.get(j, unfilled(buffer.cpu())) for j in view.agents]
        return torch.stack(rows).to(buffer.device)

    def _close_channels(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        """Stop this agent's server (a second of grace for pushes under way) and close its channels."""
        wait(self._byes, timeout=HELLO_TIMEOUT)
        self._server.stop(grace=1.0).wait()
        self._close_channels()
