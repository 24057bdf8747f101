"""Test-only fault injection for agent processes: the round hooks of one agent, read from a spec string
(``FAULTS`` below). Passed to the runtimes as ``test_hooks=partial(Faults.parse, spec)``."""

from __future__ import annotations

import dataclasses
import os
import signal
import time
import zlib
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from decaf_ext.comm.agent_round import RoundHooks
from decaf_ext.comm.layout import MessageLayout
from decaf_ext.errors import ConfigError
from decaf_ext.lora import select_agent, stack_agents
from decaf_ext.strategies import Strategy

KINDS = {"exit": False, "term": False, "nan": False, "badtag": False, "stall": True, "scale": True, "evalnan": False,
         "evalbadtag": False, "flip": False, "random": False}  # kind -> takes =VALUE
BYZANTINE_KINDS = ("scale", "flip", "random")  # what a Byzantine agent sends (see byzantine())
BYZANTINE_SCALE = 1e3


def byzantine(kind: str, data: torch.Tensor, layout: MessageLayout, factor: float = BYZANTINE_SCALE) -> torch.Tensor:
    """What a Byzantine agent sends instead of its packed data [data_numel] (`layout`'s packing); it is then
    sealed with the run key like any message. "scale": data * factor; "flip": B and extras negated, A kept (so the
    product B A is negated too: negating both factors would leave it unchanged); "random": N(0, 1) entries,
    seeded by the data itself (the same state sends the same message, also after a resume)."""
    if kind == "scale":
        return data * factor
    if kind == "flip":
        is_A = [k < layout.n_factors and layout.trains_A and k % 2 == 0 for k in range(len(layout.sizes))]
        sign = torch.cat([torch.full((size,), 1.0 if a else -1.0) for a, size in zip(is_A, layout.sizes)])
        return data * sign.to(device=data.device, dtype=data.dtype)
    if kind == "random":
        seed = zlib.crc32(data.detach().cpu().contiguous().numpy().tobytes())
        noise = torch.randn(data.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        return noise.to(device=data.device, dtype=data.dtype)
    raise ValueError(f"kind must be one of {', '.join(BYZANTINE_KINDS)}, got {kind!r}")


@dataclass
class Faults(RoundHooks):
    """Faults of one agent, e.g. ``"2:exit@3,1:nan@1,3:stall@2=5,0:badtag@1,1:scale@2=100,2:evalnan@1,3:evalbadtag@0"``
    (rounds 0-based): agent 2 kills itself (SIGKILL) after its local steps of round 3; agent 1 sends NaN buffers
    in round 1; agent 3 sleeps 5 s before communicating in round 2; agent 0 sends a wrong message tag in round 1;
    agent 1 sends its factors times 100 in round 2 (finite, correctly tagged); agent 2 sends NaN as its
    bytes_sent count in the evaluation after round 1 (correctly tagged), agent 3 a wrong tag on its evaluation
    after round 0. ``1:flip@2`` and ``1:random@2``: agent 1 is Byzantine in round 2 (:func:`byzantine`; its
    x1e3 fault is ``1:scale@2=1000``), its message tagged with the run key. A restarted process runs cleanly.
    ``events`` maps kind -> {round: value (seconds or factor; None for the others)}."""

    events: Mapping[str, Mapping[int, float | None]] = dataclasses.field(default_factory=dict)

    @classmethod
    def parse(cls, spec: str, agent: int, restarted: bool) -> Faults:
        """Agent `agent`'s faults in `spec`; none for a restarted process."""
        spec = spec.strip()
        if not spec or restarted:
            return cls()
        events: dict[str, dict[int, float | None]] = {}
        for item in spec.split(","):
            try:
                who, what = item.strip().split(":")
                kind, when = what.split("@")
                round_index, _, value = when.partition("=")
                if kind not in KINDS or KINDS[kind] != bool(value):
                    raise ValueError
                if int(who) == agent:
                    events.setdefault(kind, {})[int(round_index)] = float(value) if value else None
            except ValueError:
                raise ConfigError(f"faults: cannot read {item!r} (expected AGENT:KIND@ROUND with KIND one of "
                                  "exit, term, nan, badtag, flip, random, or AGENT:stall@ROUND=SECONDS, "
                                  "AGENT:scale@ROUND=FACTOR)"
                                  ) from None
        return cls(events)

    def at(self, kind: str, round_index: int) -> bool:
        return round_index in self.events.get(kind, {})

    def before_communication(self, round_index: int) -> None:
        if self.at("stall", round_index):
            time.sleep(self.events["stall"][round_index])

    def after_local_steps(self, round_index: int) -> None:
        if self.at("exit", round_index):
            os.kill(os.getpid(), signal.SIGKILL)
        if self.at("term", round_index):  # as `kill PID` would: the agent leaves after this round
            os.kill(os.getpid(), signal.SIGTERM)

    def outgoing(self, round_index: int, data: torch.Tensor,
                 seal: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The buffer this agent sends in round `round_index`: seal(data), with this round's faults applied."""
        if self.at("nan", round_index):
            data = torch.full_like(data, float("nan"))
        if self.at("scale", round_index):
            data = byzantine("scale", data, self.layout, self.events["scale"][round_index])
        for kind in ("flip", "random"):
            if self.at(kind, round_index):
                data = byzantine(kind, data, self.layout)
        buffer = seal(data)
        if self.at("badtag", round_index):
            buffer = buffer.clone()
            buffer[-1] = 255 - buffer[-1]  # another byte value (0..255 in any buffer dtype, uint8 included)
        return buffer

    def evaluation(self, round_index: int, data: torch.Tensor,
                   seal: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The evaluation buffer after round `round_index`: seal(data), with this round's faults applied."""
        if self.at("evalnan", round_index):
            data = data.clone()
            data[2] = float("nan")
        buffer = seal(data)
        if self.at("evalbadtag", round_index):
            buffer = buffer.clone()
            buffer[-1] = 255 - buffer[-1]
        return buffer


class ByzantineAgents(Strategy):
    """Test-only fault of the simulator: `inner` with agents `byzantine` sending byzantine(kind, ...) of their
    packed factors (`layout`) to everyone else every round; a Byzantine agent keeps its own factors (it trains
    locally and is left out of the honest agents' metrics). Takes the simulator's [N, N] call (float32 messages);
    installed by replacing a Trainer's ``agents.strategy`` (experiments/run.py does so for a cell's "byzantine")."""

    def __init__(self, inner: Strategy, byzantine: list[int], kind: str, layout: MessageLayout) -> None:
        if kind not in BYZANTINE_KINDS:
            raise ValueError(f"kind must be one of {', '.join(BYZANTINE_KINDS)}, got {kind!r}")
        self.inner, self.byzantine, self.kind, self.layout = inner, sorted(byzantine), kind, layout
        self.name, self.trains_A = inner.name, inner.trains_A
        self.decentralized, self.mixes_products = inner.decentralized, inner.mixes_products

    def communicate(self, groups, extras, W):
        n = self.check_agents(groups, extras, W)
        if W.shape[0] != n:
            raise ValueError("ByzantineAgents takes the simulator's [N, N] call (use float32 messages)")
        data = self.layout.pack_each(groups, extras)
        for j in self.byzantine:
            data[j] = byzantine(self.kind, data[j], self.layout)
        mixed = self.inner.communicate(*self.layout.unpack(data, *select_agent(groups, extras, 0)), W)
        rows = []
        for i in range(n):
            source, row = (select_agent(groups, extras, i), 0) if i in self.byzantine else (mixed, i)
            rows.append(select_agent(*source, row))
        return stack_agents(rows)

    def consensus(self, groups, extras):
        return self.inner.consensus(groups, extras)

    def bytes_per_message(self, groups, extras):
        return self.inner.bytes_per_message(groups, extras)

    def bytes_sent(self, groups, extras, W, message_bytes=None):
        return self.inner.bytes_sent(groups, extras, W, message_bytes)
