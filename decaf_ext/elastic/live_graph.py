"""The configured topology restricted to the live agents, and its mixing matrix from rows each agent computes
locally (Metropolis-Hastings), so that W stays symmetric and doubly stochastic over whoever is live.

Ring, complete, bipartite, star and exponential graphs re-link over the live agents in id order (the k-th live
agent takes node k of the k-node graph); erdos_renyi, torus, file and one_peer_exponential keep their live edges
(the configured graph's induced subgraph, which may be disconnected: its spectral gap is then 0). Metropolis-
Hastings: W_ij = 1 / (1 + max(d_i, d_j)) on a live edge, W_ii = 1 - sum_j W_ij; agent i needs only its own and
its neighbours' live degrees, which every agent reads off the agreed live set. A joining agent's row puts weight
0 on itself and 1/k on each of its k live neighbours (it starts from their consensus); no live row weights it.

Example::

    >>> mixing = LiveMixing("ring", 6)
    >>> W = mixing.at(6, live=(0, 1, 4, 5))     # the ring 0-1-4-5-0: 1/3 on each edge and on the diagonal
    >>> round(mixing.spectral_gap(W, (0, 1, 4, 5)), 6)
    0.666667
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from decaf_ext.topology import MixingSchedule, build_graph, make_schedule, one_peer_graph, spectral_gap

RELINKED: tuple[str, ...] = ("ring", "complete", "bipartite", "star", "exponential")
REWEIGHTED_RULES: tuple[str, ...] = ("auto", "metropolis")  # rules whose W on every live agent is the MH one


def live_adjacency(full: torch.Tensor | None, topology: str, n: int, live: Sequence[int]) -> torch.Tensor:
    """Bool adjacency [n, n] of `topology` over the `live` agents (edges only between live agents).

    full: the configured graph bool [n, n] (of this round, for one_peer_exponential), used by the topologies that
    keep their live edges; None for those in RELINKED.
    """
    live = sorted(live)
    adjacency = torch.zeros(n, n, dtype=torch.bool)
    if not live:
        return adjacency
    index = torch.tensor(live)
    if topology in RELINKED:
        adjacency[index[:, None], index[None, :]] = build_graph(topology, len(live))
    else:
        adjacency[index[:, None], index[None, :]] = full[index[:, None], index[None, :]]
    return adjacency


def metropolis_row(adjacency: torch.Tensor, agent: int) -> torch.Tensor:
    """Agent `agent`'s Metropolis-Hastings row, float64 [n], from its own and its neighbours' degrees in the
    live graph `adjacency` (bool [n, n]); an agent without neighbours keeps weight 1 on itself."""
    degree = adjacency.sum(dim=1).double()
    neighbours = adjacency[agent]
    row = torch.zeros(adjacency.shape[0], dtype=torch.float64)
    row[neighbours] = 1.0 / (1.0 + torch.maximum(degree[agent], degree[neighbours]))
    row[agent] = 1.0 - row.sum()
    return row


def joiner_row(adjacency: torch.Tensor, agent: int, live: Sequence[int]) -> torch.Tensor:
    """A joining agent's row, float64 [n]: 1/k on each of its k live neighbours in `adjacency` (the graph that
    includes it), 0 on itself (1 if it has no live neighbour)."""
    row = torch.zeros(adjacency.shape[0], dtype=torch.float64)
    neighbours = [j for j in live if adjacency[agent, j]]
    if neighbours:
        row[neighbours] = 1.0 / len(neighbours)
    else:
        row[agent] = 1.0
    return row


class LiveMixing:
    """The W of each round given who is live: the configured schedule's W while every agent is live and nobody
    joins (bitwise the static run), else the Metropolis-Hastings W of the live graph (rule auto or metropolis;
    with uniform or max_degree the configured W is kept and a missing neighbour's weight stays with the agent).

    Example::

        >>> mixing = LiveMixing("exponential", 8)
        >>> W = mixing.at(0, live=range(7), joining=[7])   # 7 listens to its neighbours, nobody weights it
    """

    def __init__(self, topology: str, n: int, *, rule: str = "auto", seed: int = 0, p: float | None = None,
                 path: str | None = None, schedule: MixingSchedule | None = None) -> None:
        self.topology, self.n, self.rule = topology, n, rule
        self.schedule = schedule or make_schedule(topology, n, rule=rule, seed=seed, p=p, path=path)
        self.full = None if topology in RELINKED or topology == "one_peer_exponential" else build_graph(
            topology, n, seed=seed, p=p, path=path)

    @classmethod
    def of(cls, config, schedule: MixingSchedule | None = None) -> LiveMixing:
        """The live mixing of a run's TrainConfig (`schedule`: its agents' configured W schedule, when built)."""
        return cls(config.topology, config.agents, rule=config.mixing, schedule=schedule, seed=config.seed,
                   p=config.topology_p, path=config.topology_file)

    @property
    def reweights(self) -> bool:
        """Whether W is re-weighted on the live graph (rule auto or metropolis)."""
        return self.rule in REWEIGHTED_RULES

    def graph(self, round_index: int, live: Sequence[int]) -> torch.Tensor:
        """The live graph of round `round_index`: bool [n, n] over `live`."""
        full = one_peer_graph(self.n, round_index) if self.topology == "one_peer_exponential" else self.full
        return live_adjacency(full, self.topology, self.n, live)

    def at(self, round_index: int, live: Sequence[int], joining: Sequence[int] = ()) -> torch.Tensor:
        """float64 W [n, n] of round `round_index`: Metropolis-Hastings rows of the `live` agents on their live
        graph, :func:`joiner_row` for the `joining` ones (their neighbours in the graph over live + joining),
        the identity row for everybody else."""
        live, joining = sorted(live), sorted(joining)
        if not self.reweights or (live == list(range(self.n)) and not joining):
            return self.schedule.at(round_index)
        members = self.graph(round_index, live)
        W = torch.eye(self.n, dtype=torch.float64)
        for i in live:
            W[i] = metropolis_row(members, i)
        if joining:
            extended = self.graph(round_index, live + joining)
            for i in joining:
                W[i] = joiner_row(extended, i, live)
        return W

    def fields(self, round_index: int, live: Sequence[int], joining: Sequence[int] = ()) -> dict[str, Any]:
        """What a metrics record says of round `round_index`'s membership: the live agents, the joining ones and
        the spectral gap of W over the live agents."""
        W = self.at(round_index, live, joining)
        return {"live": sorted(live), "joining": sorted(joining), "spectral_gap": self.spectral_gap(W, live)}

    @staticmethod
    def spectral_gap(W: torch.Tensor, live: Sequence[int]) -> float:
        """1 - |lambda_2| of W restricted to the live agents (0.0 when their live graph is disconnected)."""
        index = torch.tensor(sorted(live))
        return max(0.0, spectral_gap(W[index[:, None], index[None, :]]))
