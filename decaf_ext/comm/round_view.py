"""What agents write into the run's store to agree on a round: the agreed :class:`RoundView` and the records
they post (start, ready, join), as JSON, checked when read back: anything else raises ValueError (or TypeError,
KeyError), which :class:`~decaf_ext.comm.control_store.ControlStore` turns into "absent".

Example::

    >>> view = RoundView(3, {0: 1, 2: 1}, group=3)
    >>> RoundView.from_json(view.to_json()) == view
    True
    >>> parse_record('{"incarnation": 1, "fingerprint": "f", "round": 2}', needs_round=True)["round"]
    2
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


def _integer(value: Any) -> int:
    if type(value) is not int:
        raise ValueError(f"{value!r} is not an integer")
    return value


def parse_record(text: str, needs_round: bool = False) -> dict[str, Any]:
    """A start / ready / join / leave record {incarnation: int, fingerprint: str, round: int, broken: bool,
    fresh: bool} (round required when `needs_round`); ValueError if it is not one."""
    record = json.loads(text)
    if not isinstance(record, dict) or not isinstance(record.get("fingerprint"), str) or (
            needs_round and "round" not in record) or type(record.get("broken", False)) is not bool or type(
            record.get("fresh", False)) is not bool:
        raise ValueError("not a record {incarnation, fingerprint, round, broken, fresh}")
    _integer(record.get("incarnation"))
    _integer(record.get("round", 0))
    return record


@dataclass(frozen=True)
class RoundView:
    """The agreed membership of round `round` (0-based): members {agent: incarnation}, the id of the
    process group they use (the round in which that group was formed), and the members that join in this round
    without a state of their own (they start from their neighbours' consensus, see :mod:`decaf_ext.elastic`)."""

    round: int
    members: dict[int, int]
    group: int
    joining: tuple[int, ...] = ()

    @property
    def live(self) -> tuple[int, ...]:
        """The members that train and mix (not joining), ascending."""
        return tuple(j for j in self.agents if j not in self.joining)

    @property
    def agents(self) -> list[int]:
        """Member agent ids, ascending (a member's rank in the process group is its index here)."""
        return sorted(self.members)

    def to_json(self) -> str:
        return json.dumps({"round": self.round, "members": self.members, "group": self.group,
                           "joining": list(self.joining)})

    @classmethod
    def from_json(cls, text: bytes | str) -> RoundView:
        """The view written by :meth:`to_json`; ValueError (or TypeError, KeyError) for anything else."""
        value = json.loads(text)
        members = {int(k): _integer(v) for k, v in value["members"].items()}
        joining = tuple(_integer(j) for j in value.get("joining", []))
        if not set(joining) <= set(members):
            raise ValueError(f"joining agents {joining} are not all members")
        return cls(_integer(value["round"]), members, _integer(value["group"]), joining)
