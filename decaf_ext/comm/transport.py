"""Transport of a distributed run (one agent per process): who takes part in a round, and moving flat buffers.

Control plane: the rendezvous store (torchrun's TCPStore, or the one ``python -m decaf_ext.distributed`` hosts).
Each round every agent posts a readiness record (incarnation, layout fingerprint, whether its process group
failed); the first agent whose wait ends writes the round's membership with ``compare_set`` and everybody reads
that single agreed :class:`RoundView`. An agent that misses the round timeout (dead, stalled, restarting) is left
out of the round; one that finds itself left out files a join request and is waited for again; one that announced
leaving is not waited for (:mod:`~decaf_ext.comm.membership`). The message layout (size, dtype, entries) is fixed
at startup and an agent with another one is never admitted: gloo aborts a process that receives a message larger
than its receive buffer, so sizes are agreed before any data moves.

Data plane: a torch.distributed process group object over exactly the round's members (never the default group,
which stays the user's), formed anew (fresh store prefix) whenever membership changes or a member reports a failed
group — gloo closes a pair for good after a timeout, so a group that saw one is never reused. Every wait has a
deadline of one round timeout.

Trust: store values go through :class:`~decaf_ext.comm.control_store.ControlStore` (signed with a run key; a
forged or unreadable one is treated as absent). Not covered: gloo's rendezvous keys (``group/...``) and the data
plane: gloo and NCCL trust their peers (more bytes than posted abort the receiver; it is then left out as dead).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from datetime import timedelta
from functools import partial
from itertools import zip_longest
from typing import Any, Callable

import torch
import torch.distributed as dist

from decaf_ext.comm.control_store import ControlStore, parse_int, parse_nonce
from decaf_ext.comm.membership import departed, wait_for
from decaf_ext.comm.round_view import RoundView, parse_record
from decaf_ext.comm.run_identity import difference
from decaf_ext.comm.transport_base import TransportBase, Validator, check_buffer, unfilled  # noqa: F401 (re-exported)
from decaf_ext.errors import ConfigError

BACKENDS: tuple[str, ...] = ("gloo", "nccl")  # torch.distributed backends that move the buffers
LATEST = "latest"
STARTUP = "startup"
FINGERPRINT = "fingerprint"
NONCE = "nonce"
READY_POLL = 0.02  # seconds between checks for the others' ready records
LEAVE_POLL = 1.0  # seconds between reads of the leave records while waiting for the others' ready records
_MIN_WAIT = timedelta(milliseconds=1)  # gloo reads a zero timeout as "the group's default"
PIECE_BYTES = 64 << 20  # bytes of one send or recv: a message of any size moves in pieces of at most this
MAX_TIMEOUT = 365 * 24 * 3600.0  # seconds of any wait: timedelta and gloo overflow far above (inf, 1e14)


def check_timeout(name: str, seconds: float) -> None:
    """ConfigError (a ValueError) naming `name` unless `seconds` is a number in (0, MAX_TIMEOUT]."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds <= MAX_TIMEOUT:
        raise ConfigError(f"{name} must be a number of seconds in (0, {MAX_TIMEOUT:.0f}], got {seconds!r}")


def check_backend(backend: str, device: torch.device) -> None:
    """ConfigError (a ValueError) naming backend when `backend` cannot move buffers of `device` (nccl off CUDA)."""
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError("backend: nccl needs a CUDA device (use gloo on CPU)")


def pieces(buffer: torch.Tensor) -> list[torch.Tensor]:
    """A 1-D buffer [n] as consecutive views of at most :data:`PIECE_BYTES` bytes each (none when n is 0): what one
    send or recv moves, written in place.

    Example::

        >>> [p.numel() for p in pieces(torch.empty(40 << 20))]   # 160 MiB of float32
        [16777216, 16777216, 8388608]
    """
    return list(buffer.split(max(1, PIECE_BYTES // buffer.element_size())))


class Transport(TransportBase):
    """One agent's end of the run: round membership through `store`, buffers through a process group.

    store: a store shared by all agents of this run only (prefix it per run); agent: this agent's id in
    [0, n_agents); fingerprint: identifies the message layout (size, dtype, entries); backend: "gloo" or
    "nccl"; timeout: seconds of one round's waits; startup_timeout: seconds to wait for every agent at start;
    run_key: the run's shared secret (None: store values are not signed). ``events`` lists the faults seen
    (also logged); ``nonce`` (after :meth:`start`) is the run's random 16 bytes, the same for every agent.

    Example::

        >>> transport = Transport(store, 0, 4, fingerprint=layout.fingerprint, backend="gloo", timeout=60.0,
        ...                       startup_timeout=600.0, run_key=key)
        >>> done = transport.start(0)
        >>> view = transport.agree(done)   # None: left out of this round
    """

    def __init__(self, store: dist.Store, agent: int, n_agents: int, *, fingerprint: str, backend: str,
                 timeout: float, startup_timeout: float, run_key: bytes | None = None) -> None:
        if not 0 <= agent < n_agents:
            raise ValueError(f"agent must be in [0, {n_agents}), got {agent}")
        check_timeout("round_timeout", timeout)
        check_timeout("startup_timeout", startup_timeout)
        self.store, self.agent, self.n_agents = store, agent, n_agents
        self.fingerprint, self.backend = fingerprint, backend
        self.timeout, self.startup_timeout = timeout, startup_timeout
        self.events: list[dict[str, Any]] = []
        self.round_now = self._latest = -1  # the round whose events are being recorded; the newest agreed round
        self.control = ControlStore(store, run_key, report=self._ignored)
        self.incarnation = self.control.increment(f"incarnation/{agent}")
        self.group: int | None = None
        self.process_group: dist.ProcessGroup | None = None
        self.broken = self.joining = False
        self.fresh = False  # joining without a state of its own: it listens first (RoundView.joining)
        self.seen: RoundView | None = None  # the newest agreed view this agent has read
        self._nonce: bytes | None = None
        self._layout: str | None = None  # the run's fingerprint, once start() has read it (maybe not this one's)

    # -------------------------------------------------------------------------------------- control plane

    def _ignored(self, key: str, kind: str, reason: str) -> None:
        self.record_event(self.round_now, kind, f"store value {key!r} ignored: {reason}", key=key, reason=reason)

    @property
    def nonce(self) -> bytes:
        """The run's 16 random bytes, agreed in :meth:`start` (RuntimeError before), the same for every agent of
        the run: bind per-run values (message tags) to it."""
        if self._nonce is None:
            raise RuntimeError("nonce: the run's nonce is agreed in Transport.start; call it first")
        return self._nonce

    def _record(self, **extra: Any) -> str:
        return json.dumps({"incarnation": self.incarnation, "fingerprint": self.fingerprint, **extra})

    def _view(self, text: str, round_index: int | None = None) -> RoundView:
        """A view read from the store, checked: members are agents of this run, of round `round_index`."""
        view = RoundView.from_json(text)
        if not all(0 <= j < self.n_agents for j in view.members) or round_index not in (None, view.round):
            raise ValueError(f"a view of round {view.round} over agents {view.agents}")
        return view

    def _present(self, prefix: str, parse: Callable[[str], dict] = parse_record) -> dict[int, dict[str, Any]]:
        """Sound records `prefix`/<agent> that exist now, by agent."""
        records = {j: self.control.get(f"{prefix}/{j}", parse) for j in range(self.n_agents)}
        return {j: record for j, record in records.items() if record is not None}

    def _wait(self, keys: list[str], seconds: float) -> None:
        """Wait until every key exists or `seconds` pass (whichever comes first)."""
        try:
            self.store.wait(keys, timedelta(seconds=seconds))
        except dist.DistStoreError:
            pass

    def _wait_ready(self, round_index: int, waited: set[int], left: set[int]) -> set[int]:
        """Wait (at most the round timeout) for the ready records of round `round_index` of `waited`, except those
        that announce leaving meanwhile (checked every LEAVE_POLL seconds); returns the agents that left."""
        deadline = time.monotonic() + self.timeout
        reread = time.monotonic() + LEAVE_POLL
        while keys := [f"ready/{round_index}/{j}" for j in sorted(waited - left)]:
            # polled, not store.wait: a TCPStore wait that times out logs a warning, once per slice
            if self.store.check(keys) or time.monotonic() >= deadline:
                break
            time.sleep(READY_POLL)
            if time.monotonic() >= reread:
                left, reread = departed(self.control, self.n_agents, round_index), time.monotonic() + LEAVE_POLL
        return left

    def _saw(self, view: RoundView | None) -> RoundView | None:
        if view is not None and (self.seen is None or view.round >= self.seen.round):
            self.seen = view
        return view

    def _agreed(self, round_index: int) -> RoundView | None:
        """Round `round_index`'s agreed view; None when absent (or forged)."""
        return self._saw(self.control.get(f"members/{round_index}", partial(self._view, round_index=round_index)))

    def _propose(self, key: str, round_index: int, records: dict[int, dict[str, Any]],
                 previous: RoundView | None, layout: str) -> RoundView | None:
        """Write the view made of `records` under `key` unless a view is there already; returns the one there
        (None if none could be agreed: the store's value keeps being replaced)."""
        members = {j: r["incarnation"] for j, r in records.items() if r["fingerprint"] == layout}
        for j in sorted(set(records) - set(members)):
            self.record_event(round_index, "refused", f"agent {j} refused: its message layout differs from the run's",
                              agent=j)
        fresh = previous is None or members != previous.members or any(records[j].get("broken") for j in members)
        view = RoundView(round_index, members, round_index if fresh else previous.group,
                         tuple(j for j in sorted(members) if records[j].get("fresh")))
        return self._saw(self.control.agree(key, view.to_json(), partial(self._view, round_index=round_index)))

    @property
    def latest(self) -> int:
        """The newest round whose membership has been agreed (-1 before the first round): the store's value, or
        the newest this agent has seen when that one is older, absent or forged."""
        stored = self.control.get(LATEST, parse_int)
        self._latest = self._latest if stored is None else max(self._latest, stored)
        return self._latest

    def _request_join(self, round_index: int) -> None:
        """Ask to be waited for; the request expires after round `round_index` + 1 (see :meth:`_joiners`)."""
        self.control.set(f"join/{self.agent}", self._record(round=round_index))
        self.joining = True

    def _joiners(self, round_index: int) -> set[int]:
        """Agents whose join request was filed in round `round_index` or the one before (a live agent left out
        re-files every round); older requests (their agent died) are deleted, so they cost one round only."""
        joiners = set()
        for j in range(self.n_agents):
            request = self.control.get(f"join/{j}", partial(parse_record, needs_round=True))
            if request is not None and request["round"] < round_index - 1:
                self.control.delete(f"join/{j}")
            elif request is not None and request["round"] <= round_index:
                joiners.add(j)
        return joiners

    def start(self, rounds_done: int, join_at: int = 0, starters: list[int] | None = None) -> int:
        """Enter the run with `rounds_done` rounds behind this agent (0, or a checkpoint's count), not before round
        `join_at` when the run is running (a scheduled joiner: waited for from that round on); `starters`: the
        agents the run starts with (default: all).

        The first agents wait up to startup_timeout for each other, fix the run's message layout (the most
        common among them), its nonce, and continue together from the newest checkpoint among them; an agent
        arriving later (or restarted) joins the running group. Returns the number of rounds done from which this
        agent continues (the group's, not necessarily its own). ValueError if this agent's layout is not the run's.
        """
        if join_at and not rounds_done:  # a scheduled joiner enters a run that has started
            wait_for(self.store, STARTUP, self.startup_timeout)
        if (join_at or rounds_done) and self.store.check([STARTUP]) and self.control.get(STARTUP, self._view) is None:
            raise ConfigError("run_key: the running run's store records are not signed with this agent's run key; "
                              "every agent must use the run's --run-key-file")
        own = self._record(round=rounds_done)
        self.control.set(f"start/{self.agent}", own)
        startup, layout = self.control.get(STARTUP, self._view), self.control.get(FINGERPRINT)
        if startup is None or layout is None:
            self._wait([f"start/{j}" for j in starters or range(self.n_agents)], self.startup_timeout)
            records = {**self._present("start", partial(parse_record, needs_round=True)), self.agent: json.loads(own)}
            votes = Counter(r["fingerprint"] for r in records.values())  # the most common layout, then lowest agent
            layout = self.control.agree(FINGERPRINT, max(votes, key=lambda f: (votes[f], -min(
                j for j, r in records.items() if r["fingerprint"] == f))))
            first = max(r["round"] for r in records.values()) - 1
            startup = self._propose(STARTUP, first, records, None, layout)
            if startup is not None:
                self._saw(self.control.agree(f"members/{first}", startup.to_json(),
                                             partial(self._view, round_index=first)))
                self.control.agree(LATEST, str(first), parse_int)
        self._layout, self._nonce = layout, self.control.agree(NONCE, os.urandom(16).hex(), parse_nonce)
        if layout is None or startup is None or self._nonce is None:
            raise ValueError("store: the run's layout, members or nonce could not be agreed (their values in the "
                             "store keep being replaced by values that are not the run's)")
        if layout != self.fingerprint:
            raise ConfigError(f"fingerprint: this agent's configuration differs from the run's (the run has "
                              f"{difference(self.fingerprint, layout)}); every agent must use the same model, rank, "
                              "algorithm and run key")
        latest = self.latest
        view = self._agreed(latest) or startup
        if view.members.get(self.agent) != self.incarnation:
            self.control.delete(f"leave/{self.agent}")  # it left (SIGTERM) and is back: waited for again
            self.record_event(latest, "joining", f"joining the running group in round {max(latest + 1, join_at)}")
            self._request_join(latest if join_at <= latest + 1 else join_at)  # counted in the round it joins
        return max(latest + 1, join_at)

    def current_view(self) -> RoundView:
        """The newest agreed view (after :meth:`start`: the members the run starts or continues with)."""
        return self._agreed(self.latest) or self.seen

    def agree(self, round_index: int) -> RoundView | None:
        """Post readiness for round `round_index` and return the agreed view (who takes part, which group).

        Waits up to the round timeout for the previous round's members and joiners (not those that announced
        leaving); the first whose wait ends writes the view (a ``fresh`` joiner waits for it). None when this
        agent is left out (too late): it then asks to join the next round. Needs the previous round's view.
        """
        self.round_now, key = round_index, f"members/{round_index}"
        self.control.set(f"ready/{round_index}/{self.agent}", self._record(broken=self.broken, fresh=self.fresh))
        previous = self._agreed(round_index - 1) or self.seen
        view, left = self._agreed(round_index), departed(self.control, self.n_agents, round_index)
        if view is None and self.fresh:  # a joiner without a state of its own lets the members decide
            self._wait([key], self.startup_timeout)
            view = self._agreed(round_index)
        if view is None:
            left = self._wait_ready(round_index, set(previous.members) | self._joiners(round_index), left)
            layout = self._layout if self._layout is not None else self.control.get(FINGERPRINT)
            view = self._propose(key, round_index, self._present(f"ready/{round_index}"), previous, layout)
        if round_index > self.latest:
            self.control.set(LATEST, str(round_index))
            self._latest = round_index
        if view is None or view.members.get(self.agent) != self.incarnation:
            self.record_event(round_index, "left_out", "left out of the round (late); asking to join the next one")
            self._request_join(round_index)
            return None
        for j in sorted(set(previous.members) - set(view.members)):
            self.record_event(round_index, *(("peer_left", f"agent {j} left the run") if j in left else (
                "peer_lost", f"agent {j} missed the round timeout and is left out")), agent=j)
        if self.joining:
            self.control.delete(f"join/{self.agent}")
            self.joining = False
        return view

    def connect(self, view: RoundView) -> bool:
        """Make sure this process holds `view`'s process group (formed anew when the view names a new one);
        False (logged) if it could not be formed within the round timeout."""
        return view.group == self.group or self._form_group(view)

    # ----------------------------------------------------------------------------------------- data plane

    def _failure(self, round_index: int, what: str, error: BaseException, **details: Any) -> None:
        """A transport error (torch.distributed raises RuntimeError subclasses): the process group is not trusted
        again, the members form a new one next round."""
        self.broken = True
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        self.record_event(round_index, "transport", f"{what} failed: {first_line[:200]}", what=what, **details)

    def _form_group(self, view: RoundView) -> bool:
        """Replace this agent's group by one over `view`'s members; False (and logged) if that failed.

        The group is a process group object of its own (never the default group, which belongs to the user):
        forming it involves only the members, through the store under a prefix named after the view's group."""
        self.process_group, self.group, agents = None, None, view.agents
        store = dist.PrefixStore(f"group/{view.group}", self.store)
        store.set_timeout(timedelta(seconds=self.timeout))  # connecting to a dead member gives up after this
        try:
            if self.backend == "nccl":
                options = dist.ProcessGroupNCCL.Options()
                options._timeout = timedelta(seconds=self.timeout)
                group = dist.ProcessGroupNCCL(store, agents.index(self.agent), len(agents), options)
            else:
                group = dist.ProcessGroupGloo(store, agents.index(self.agent), len(agents),
                                              timedelta(seconds=self.timeout))
        except RuntimeError as error:
            self._failure(view.round, "forming the process group", error)
            return False
        self.process_group, self.group, self.broken = group, view.group, False
        return True

    def _wait_all(self, works: list[Any], deadline: float) -> None:
        for work in works:
            work.wait(max(timedelta(seconds=deadline - time.monotonic()), _MIN_WAIT))

    def send_and_receive(self, view: RoundView, buffers: dict[int, torch.Tensor], validate: Validator | None = None,
                         sizes: dict[int, int] | None = None) -> dict[int, torch.Tensor]:
        """Send buffers[j] (1-D) to every agent j in `buffers` and receive theirs (tag = round), of `sizes[j]`
        elements from agent j (default: as many as buffers[j]).

        Returns the buffers that arrived within the round timeout and passed :func:`check_buffer` and
        `validate(agent, buffer) -> reason or None`, by agent; a peer whose transfer failed or whose buffer was
        rejected is absent (and logged). Every message moves in :func:`pieces` (at most :data:`PIECE_BYTES` per
        send/recv pair, the pieces of one pair in order under one tag) written straight into the returned
        buffer, which is filled with :func:`unfilled` first: a piece that never arrived stays NaN and fails the
        checks. Each pair orders its transfers by rank (the lower rank sends each piece first), so blocking
        backends cannot deadlock; one failing pair does not cancel the others.
        """
        rank = view.agents.index(self.agent)
        sizes = sizes or {j: buffer.numel() for j, buffer in buffers.items()}
        received = {j: unfilled(buffer, sizes[j]) for j, buffer in buffers.items()}
        posted = []
        for j, buffer in buffers.items():
            peer = view.agents.index(j)
            sends = [partial(self.process_group.send, [part], peer, view.round) for part in pieces(buffer)]
            recvs = [partial(self.process_group.recv, [part], peer, view.round) for part in pieces(received[j])]
            pairs = zip_longest(sends, recvs) if rank < peer else zip_longest(recvs, sends)
            try:
                posted.append((j, [op() for pair in pairs for op in pair if op is not None]))
            except RuntimeError as error:
                self._failure(view.round, f"exchange with agent {j}", error, agents=[j])
        deadline = time.monotonic() + self.timeout
        accepted = {}
        for j, works in posted:
            try:
                self._wait_all(works, deadline)
            except RuntimeError as error:
                self._failure(view.round, f"exchange with agent {j}", error, agents=[j])
                continue
            if self._accept(view.round, j, received[j], sizes[j], buffers[j].dtype, validate):
                accepted[j] = received[j]
        return accepted

    def all_gather(self, view: RoundView, buffer: torch.Tensor) -> torch.Tensor | None:
        """Every member's `buffer` [n] stacked as [len(view.members), n] in view.agents order, or None on failure."""
        gathered = buffer.new_empty(len(view.members) * buffer.numel())
        try:
            work = self.process_group._allgather_base(gathered, buffer)
            self._wait_all([work], time.monotonic() + self.timeout)
        except RuntimeError as error:
            self._failure(view.round, "all_gather", error)
            return None
        return gathered.view(len(view.members), buffer.numel())

    def leave(self, round_index: int) -> None:  # nobody waits for it in rounds from `round_index` on
        self.control.set(f"leave/{self.agent}", self._record(round=round_index))

    def close(self) -> None:
        """Leave the run: drop the process group (the store belongs to the launcher)."""
        self.process_group, self.group = None, None
