"""Test-only fault injection for agent processes: the round hooks of one agent, read from a spec string
(``FAULTS`` below). Passed to the runtimes as ``test_hooks=partial(Faults.parse, spec)``."""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from decaf_ext.comm.agent_round import RoundHooks
from decaf_ext.errors import ConfigError

KINDS = {"exit": False, "nan": False, "badtag": False, "stall": True, "scale": True, "evalnan": False,
         "evalbadtag": False}  # kind -> takes =VALUE


@dataclass
class Faults(RoundHooks):
    """Faults of one agent, e.g. ``"2:exit@3,1:nan@1,3:stall@2=5,0:badtag@1,1:scale@2=100,2:evalnan@1,3:evalbadtag@0"``
    (rounds 0-based): agent 2 kills itself (SIGKILL) after its local steps of round 3; agent 1 sends NaN buffers
    in round 1; agent 3 sleeps 5 s before communicating in round 2; agent 0 sends a wrong message tag in round 1;
    agent 1 sends its factors times 100 in round 2 (finite, correctly tagged); agent 2 sends NaN as its
    bytes_sent count in the evaluation after round 1 (correctly tagged), agent 3 a wrong tag on its evaluation
    after round 0. A restarted process runs cleanly.
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
                                  "exit, nan, badtag, or AGENT:stall@ROUND=SECONDS, AGENT:scale@ROUND=FACTOR)"
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

    def outgoing(self, round_index: int, data: torch.Tensor,
                 seal: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The buffer this agent sends in round `round_index`: seal(data), with this round's faults applied."""
        if self.at("nan", round_index):
            data = torch.full_like(data, float("nan"))
        if self.at("scale", round_index):
            data = data * self.events["scale"][round_index]
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
