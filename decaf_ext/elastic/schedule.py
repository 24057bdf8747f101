"""A churn schedule: which agents of a run's slots are live in each round.

``join:A@R`` — slot A is empty until round R (0-based round index): A listens in round R (it starts from its
neighbours' consensus, see :mod:`decaf_ext.elastic.live_graph`) and trains and mixes from round R + 1.
``leave:A@R`` — A leaves gracefully before round R (it announces it; nobody waits for it).
``kill:A@R`` — A crashes in round R, after its local steps and before communicating (unannounced: in a
distributed run the others wait one round timeout for it, then leave it out). Either way A takes part in rounds
before R only. Every agent without a ``join`` is live from round 0; an agent joins at most once and leaves at
most once, after it joined.

Example::

    >>> churn = ChurnSchedule.parse("join:5@3,leave:2@5,kill:3@6", 6)
    >>> churn.initial, churn.joined_at(5), churn.departure(3)
    ((0, 1, 2, 3, 4), 3, ('kill', 6))
"""

from __future__ import annotations

from dataclasses import dataclass

from decaf_ext.errors import ConfigError

KINDS: tuple[str, ...] = ("join", "leave", "kill")
FORMAT = "join:AGENT@ROUND, leave:AGENT@ROUND or kill:AGENT@ROUND, comma-separated"


@dataclass(frozen=True)
class ChurnSchedule:
    """The membership changes of a run of `n_agents` slots: joins {agent: round} and departures
    {agent: (kind "leave" or "kill", round)}, rounds 0-based."""

    n_agents: int
    joins: dict[int, int]
    departures: dict[int, tuple[str, int]]

    @classmethod
    def parse(cls, spec: str | None, n_agents: int) -> ChurnSchedule:
        """The schedule written as `spec` (None or "": nobody joins or leaves); ConfigError naming churn for a
        malformed entry, an agent outside [0, n_agents), a second join or departure of one agent, a departure
        before its join, or a round in which no agent would be live."""
        joins: dict[int, int] = {}
        departures: dict[int, tuple[str, int]] = {}
        for item in (spec or "").split(","):
            if not item.strip():
                continue
            try:
                kind, rest = item.strip().split(":")
                agent_text, round_text = rest.split("@")
                agent, round_index = int(agent_text), int(round_text)
                if kind not in KINDS or round_index < 0:
                    raise ValueError
            except ValueError:
                raise ConfigError(f"churn: cannot read {item.strip()!r} (expected {FORMAT})") from None
            if not 0 <= agent < n_agents:
                raise ConfigError(f"churn: agent {agent} of {item.strip()!r} is not one of the run's {n_agents} "
                                  f"agents (ids 0 to {n_agents - 1}; raise --agents for a new id)")
            table = joins if kind == "join" else departures
            if agent in table:
                raise ConfigError(f"churn: agent {agent} {'joins' if kind == 'join' else 'leaves'} twice")
            table[agent] = round_index if kind == "join" else (kind, round_index)
        for agent, round_index in joins.items():
            if round_index < 1:
                raise ConfigError(f"churn: join:{agent}@{round_index} must come after round 0 (an agent live from "
                                  "the start needs no join)")
            if agent in departures and departures[agent][1] <= round_index:
                raise ConfigError(f"churn: agent {agent} leaves (round {departures[agent][1]}) before it has "
                                  f"joined (round {round_index})")
        schedule = cls(n_agents, joins, departures)
        for round_index in sorted({0, *(r for _, r in departures.values())}):
            if not schedule.live(round_index):
                raise ConfigError(f"churn: no agent is live in round {round_index}")
        return schedule

    @property
    def active(self) -> bool:
        """Whether anybody joins or leaves."""
        return bool(self.joins or self.departures)

    @property
    def initial(self) -> tuple[int, ...]:
        """The agents live from round 0 (those without a join), ascending."""
        return tuple(j for j in range(self.n_agents) if j not in self.joins)

    def joined_at(self, agent: int) -> int:
        """The round in which `agent` joins (0 for an agent live from the start)."""
        return self.joins.get(agent, 0)

    def departure(self, agent: int) -> tuple[str, int] | None:
        """("leave" or "kill", round) of `agent`'s departure, or None if it stays."""
        return self.departures.get(agent)

    def live(self, round_index: int) -> tuple[int, ...]:
        """The agents that train and mix in round `round_index`: joined before it, not departed by it."""
        return tuple(j for j in range(self.n_agents)
                     if (j not in self.joins or self.joins[j] < round_index)
                     and (j not in self.departures or self.departures[j][1] > round_index))

    def joining(self, round_index: int) -> tuple[int, ...]:
        """The agents that join in round `round_index` (they listen: no local steps, no weight in others' rows)."""
        return tuple(j for j, r in sorted(self.joins.items()) if r == round_index
                     and (j not in self.departures or self.departures[j][1] > round_index))
