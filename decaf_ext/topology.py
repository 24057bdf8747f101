"""Communication graphs, doubly stochastic mixing matrices, their validation and spectral gap.

A graph is a bool adjacency [n, n] (symmetric, no self loops); a mixing matrix W is float64 [n, n],
symmetric, nonnegative, with rows and columns summing to 1. Agent i's consensus step is
x_i <- sum_j W[i, j] x_j. A ``MixingSchedule`` hands out the W of each communication round; it is
constant except for the time-varying "one_peer_exponential" topology.
"""

from __future__ import annotations

import math
import random
import warnings
from pathlib import Path
from typing import Sequence

import networkx as nx
import numpy as np
import torch

from decaf_ext.errors import first_line

TOPOLOGIES: tuple[str, ...] = (
    "ring",
    "complete",
    "bipartite",
    "star",
    "torus",
    "erdos_renyi",
    "exponential",
    "one_peer_exponential",
    "file",
)
RULES: tuple[str, ...] = ("auto", "uniform", "metropolis", "max_degree")
TOLERANCE = 1e-9
ERDOS_RENYI_TRIES = 1000


# ----------------------------------------------------------------------------------------------- graphs


def _to_adjacency(graph: nx.Graph, n: int) -> torch.Tensor:
    """Bool adjacency [n, n] of a networkx graph on nodes 0..n-1 (self loops dropped)."""
    adjacency = nx.to_numpy_array(graph, nodelist=range(n), dtype=bool)
    np.fill_diagonal(adjacency, False)
    return torch.from_numpy(adjacency)


def _torus_shape(n: int) -> tuple[int, int]:
    """(rows, cols) with rows * cols = n and rows the largest divisor of n not above sqrt(n)."""
    rows = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    if rows == 1 and n > 3:
        raise ValueError(f"n={n} is prime: a torus needs n = rows * cols with rows >= 2")
    return rows, n // rows


def _exponential_hops(n: int) -> list[int]:
    """Powers of two below n: 1, 2, 4, ..."""
    return [1 << k for k in range((n - 1).bit_length())]


def _erdos_renyi(n: int, p: float | None, seed: int) -> nx.Graph:
    """A connected G(n, p) sample: resampled (seeded) until connected."""
    p = min(1.0, 2.0 * math.log(n) / n) if p is None else p
    if not 0.0 < p <= 1.0:
        raise ValueError(f"p must be in (0, 1], got {p}")
    rng = random.Random(seed)
    for _ in range(ERDOS_RENYI_TRIES):
        graph = nx.gnp_random_graph(n, p, seed=rng)
        if nx.is_connected(graph):
            return graph
    raise ValueError(f"p={p} gave no connected Erdos-Renyi graph on n={n} in {ERDOS_RENYI_TRIES} samples; raise p")


def _read_graph_file(path: str, n: int) -> torch.Tensor:
    """Adjacency [n, n] from a .npy 0/1 matrix, or a text file holding an edge list "i j" (2 columns) or a
    0/1 matrix (n columns). Text numbers are separated by spaces or commas; '#' starts a comment.
    (For n = 2 a text matrix is read as an edge list; a valid one describes the same single edge.)
    """
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"path={path!r} is not a file")
    try:
        if file.suffix == ".npy":
            table = np.load(file)
        else:
            with warnings.catch_warnings():  # numpy warns of an empty file, refused below with its name
                warnings.simplefilter("ignore", UserWarning)
                table = np.loadtxt(file.read_text().replace(",", " ").splitlines(), ndmin=2)
    except (OSError, EOFError, ValueError) as error:  # unreadable, or not numbers in rows of equal length
        raise ValueError(f"path={path!r}: cannot read an edge list or a 0/1 matrix ({first_line(error)})") from None
    if table.size == 0:
        raise ValueError(f"path={path!r} holds no edges and no matrix rows")
    if file.suffix != ".npy" and table.shape[1] == 2:
        if not np.array_equal(table, np.round(table)) or table.min() < 0:
            raise ValueError(f"path={path!r}: edge list entries must be integer node ids in [0, {n - 1}]")
        if table.max() + 1 != n:
            raise ValueError(f"path={path!r}: the edge list has {int(table.max()) + 1} nodes (ids 0 to "
                             f"{int(table.max())}) but there are {n} agents")
        i, j = table.astype(np.int64).T
        if np.any(i == j):
            raise ValueError(f"path={path!r}: edge list has a self loop")
        adjacency = np.zeros((n, n), dtype=bool)
        adjacency[i, j] = adjacency[j, i] = True
        return torch.from_numpy(adjacency)
    if table.shape != (n, n) or not np.isin(table, (0, 1)).all():
        raise ValueError(f"path={path!r} must hold an edge list or an {n}x{n} 0/1 matrix for {n} agents, "
                         f"got shape {table.shape}")
    return _check_adjacency(torch.from_numpy(table != 0), f"adjacency in {path!r}")


def one_peer_graph(n: int, round_index: int) -> torch.Tensor:
    """Round `round_index` of the one-peer exponential graph: bool [n, n] perfect matching i <-> i XOR 2^k.

    k = round_index mod log2(n); agent i's single peer lies at ring distance 2^k (i + 2^k when bit k
    of i is 0, else i - 2^k). n must be a power of two; the union over log2(n) rounds is the hypercube.
    """
    if n < 1 or n & (n - 1):
        raise ValueError(f"n={n}: one_peer_exponential needs n to be a power of two")
    adjacency = torch.zeros(n, n, dtype=torch.bool)
    if n > 1:
        agents = torch.arange(n)
        adjacency[agents, agents ^ (1 << (round_index % (n.bit_length() - 1)))] = True
    return adjacency


def build_graph(name: str, n: int, *, seed: int = 0, p: float | None = None, path: str | None = None) -> torch.Tensor:
    """Bool adjacency [n, n] (symmetric, no self loops, connected) of topology `name` on n agents.

    ring: i ~ i+-1; complete; bipartite: complete bipartite between agents [0, n//2) and [n//2, n);
    star: agent 0 is the hub; torus: rows x cols grid with wrap-around, the most square factorization
    (n = 2, 3 give a ring, prime n > 3 is an error); erdos_renyi: G(n, p), p default min(1, 2 ln(n)/n),
    seeded, resampled until connected; exponential: i ~ i +- 2^k for 2^k < n; one_peer_exponential:
    the union of its per-round matchings (the hypercube; see ``one_peer_graph``); file: read from `path`.
    """
    if name not in TOPOLOGIES:
        raise ValueError(f"topology must be one of {TOPOLOGIES}, got {name!r}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if p is not None and name != "erdos_renyi":
        raise ValueError(f"p applies only to topology 'erdos_renyi', got topology {name!r}")
    if (path is not None) != (name == "file"):
        raise ValueError(f"path is required for topology 'file' and only for it (topology {name!r}, path {path!r})")
    if name == "file":
        adjacency = _read_graph_file(path, n)
    elif name == "one_peer_exponential":
        period = max(1, n.bit_length() - 1)
        adjacency = torch.stack([one_peer_graph(n, t) for t in range(period)]).any(dim=0)
    elif n == 1:
        adjacency = torch.zeros(1, 1, dtype=torch.bool)
    elif name == "ring":
        adjacency = _to_adjacency(nx.cycle_graph(n), n)
    elif name == "complete":
        adjacency = _to_adjacency(nx.complete_graph(n), n)
    elif name == "bipartite":
        adjacency = _to_adjacency(nx.complete_bipartite_graph(n // 2, n - n // 2), n)
    elif name == "star":
        adjacency = _to_adjacency(nx.star_graph(n - 1), n)
    elif name == "torus":
        rows, cols = _torus_shape(n)
        torus = nx.grid_2d_graph(rows, cols, periodic=True)
        adjacency = _to_adjacency(nx.relabel_nodes(torus, {(r, c): r * cols + c for r, c in torus}), n)
    elif name == "erdos_renyi":
        adjacency = _to_adjacency(_erdos_renyi(n, p, seed), n)
    else:  # exponential
        adjacency = _to_adjacency(nx.circulant_graph(n, _exponential_hops(n)), n)
    _require_connected(adjacency, f"topology {name!r}")
    return adjacency


# ------------------------------------------------------------------------------------ mixing matrices


def _check_adjacency(adjacency: torch.Tensor, name: str = "adjacency") -> torch.Tensor:
    """The adjacency as bool [n, n] after checking shape, symmetry and the absence of self loops."""
    if adjacency.dim() != 2 or adjacency.shape[0] != adjacency.shape[1] or adjacency.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty square [n, n] matrix, got shape {list(adjacency.shape)}")
    adjacency = adjacency.cpu() != 0
    if not torch.equal(adjacency, adjacency.T):
        raise ValueError(f"{name} is not symmetric")
    if adjacency.diagonal().any():
        raise ValueError(f"{name} has self loops (nonzero diagonal)")
    return adjacency


def _n_components(adjacency: torch.Tensor) -> int:
    """Number of connected components of the graph whose edges are the nonzero off-diagonal entries."""
    return nx.number_connected_components(nx.from_numpy_array(adjacency.cpu().numpy() != 0))


def _require_connected(adjacency: torch.Tensor, name: str) -> None:
    components = _n_components(adjacency)
    if components > 1:
        raise ValueError(f"{name} is disconnected ({components} components)")


def mixing_matrix(adjacency: torch.Tensor, rule: str = "auto") -> torch.Tensor:
    """Symmetric doubly stochastic float64 W [n, n] supported on the graph `adjacency` (bool [n, n]) plus I.

    uniform: W_ij = 1/(d+1) on edges and the diagonal (d-regular graphs only);
    metropolis: W_ij = 1/(1 + max(d_i, d_j)) on edges, W_ii = 1 - sum_j W_ij;
    max_degree: W_ij = 1/(1 + d_max) on edges, W_ii = 1 - d_i/(1 + d_max) (lazy: W_ii >= 1/(1 + d_max));
    auto: uniform if the graph is regular, else metropolis.
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    adjacency = _check_adjacency(adjacency)
    edges = adjacency.double()
    degree = edges.sum(dim=1)
    regular = bool((degree == degree[0]).all())
    if rule == "auto":
        rule = "uniform" if regular else "metropolis"
    if rule == "uniform":
        if not regular:
            raise ValueError("rule 'uniform' needs a regular graph (all degrees equal); use 'metropolis'")
        off_diagonal = edges / (degree[0] + 1.0)
    elif rule == "metropolis":
        off_diagonal = edges / (1.0 + torch.maximum(degree[:, None], degree[None, :]))
    else:  # max_degree
        off_diagonal = edges / (1.0 + degree.max())
    return off_diagonal + torch.diag(1.0 - off_diagonal.sum(dim=1))


def validate_mixing(W: torch.Tensor, *, name: str = "W", require_connected: bool = True) -> None:
    """Raise a one-line ValueError unless W [n, n] is finite, symmetric, nonnegative, doubly stochastic
    (tolerance 1e-9 in float64) and, if `require_connected`, its graph is connected (n = 1 allowed)."""
    if W.dim() != 2 or W.shape[0] != W.shape[1] or W.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty square [n, n] matrix, got shape {list(W.shape)}")
    W = W.detach().cpu().to(torch.float64)
    if not torch.isfinite(W).all():
        raise ValueError(f"{name} has non-finite entries")
    asymmetry = (W - W.T).abs().max().item()
    if asymmetry > TOLERANCE:
        raise ValueError(f"{name} is not symmetric (max |W - W^T| = {asymmetry:.3g})")
    if W.min().item() < -TOLERANCE:
        raise ValueError(f"{name} has negative entries (min {W.min().item():.3g})")
    for dim, what in ((1, "rows"), (0, "columns")):
        deviation = (W.sum(dim=dim) - 1.0).abs().max().item()
        if deviation > TOLERANCE:
            raise ValueError(f"{name} is not doubly stochastic: its {what} do not sum to 1 (max error {deviation:.3g})")
    if require_connected:
        _require_connected(W > TOLERANCE, name)


def spectral_gap(W: torch.Tensor) -> float:
    """1 - |lambda_2(W)|, the second-largest eigenvalue modulus of W [n, n] (1.0 for n = 1)."""
    W = W.detach().cpu().to(torch.float64)
    if W.shape[0] == 1:
        return 1.0
    if torch.allclose(W, W.T, rtol=0.0, atol=TOLERANCE):
        moduli = torch.linalg.eigvalsh(W).abs()
    else:
        moduli = torch.linalg.eigvals(W).abs()
    return 1.0 - torch.sort(moduli, descending=True).values[1].item()


# -------------------------------------------------------------------------------------------- schedule


class MixingSchedule:
    """The mixing matrix of every communication round: ``matrices[t mod period]``, each float64 [n, n]."""

    def __init__(self, matrices: Sequence[torch.Tensor]) -> None:
        if len(matrices) == 0:
            raise ValueError("matrices must hold at least one mixing matrix")
        self.matrices: tuple[torch.Tensor, ...] = tuple(m.detach().cpu().to(torch.float64) for m in matrices)
        if any(m.shape != self.matrices[0].shape for m in self.matrices):
            raise ValueError("matrices must all have the same shape [n, n]")

    @property
    def n_agents(self) -> int:
        return self.matrices[0].shape[0]

    @property
    def period(self) -> int:
        """Number of distinct rounds before the schedule repeats (1 for a static topology)."""
        return len(self.matrices)

    @property
    def spectral_gap(self) -> float:
        """1 - |lambda_2| of the round-0 matrix."""
        return spectral_gap(self.matrices[0])

    @property
    def effective_spectral_gap(self) -> float:
        """Per-round gap over one period: 1 - |lambda_2(W_{p-1} ... W_0)|^(1/p) (= spectral_gap if p = 1).

        A modulus below the 1e-9 tolerance counts as 0, so that round-off is not amplified by the root.
        """
        product = torch.linalg.multi_dot(list(self.matrices[::-1])) if self.period > 1 else self.matrices[0]
        modulus = 1.0 - spectral_gap(product)
        return 1.0 - (modulus if modulus > TOLERANCE else 0.0) ** (1.0 / self.period)

    def at(self, round_index: int) -> torch.Tensor:
        """W [n, n] float64 of communication round `round_index` (>= 0); a copy."""
        if round_index < 0:
            raise ValueError(f"round_index must be >= 0, got {round_index}")
        return self.matrices[round_index % self.period].clone()


def make_schedule(
    topology: str, n: int, *, rule: str = "auto", seed: int = 0, p: float | None = None, path: str | None = None
) -> MixingSchedule:
    """Validated mixing schedule of `topology` on n agents with weight rule `rule` (see ``mixing_matrix``).

    Static topologies give one W. one_peer_exponential gives log2(n) rounds, W_t = (I + P_t) / 2 for the
    matching P_t of ``one_peer_graph``: each W_t is symmetric and doubly stochastic but disconnected for
    n > 2; their product over one period is exactly J / n (the union over a period is connected).
    """
    adjacency = build_graph(topology, n, seed=seed, p=p, path=path)
    if topology != "one_peer_exponential":
        W = mixing_matrix(adjacency, rule)
        validate_mixing(W, name=f"mixing matrix of topology {topology!r}")
        return MixingSchedule([W])
    period = max(1, n.bit_length() - 1)
    matrices = [mixing_matrix(one_peer_graph(n, t), rule) for t in range(period)]
    for t, W in enumerate(matrices):
        validate_mixing(W, name=f"one_peer_exponential round {t}", require_connected=False)
    return MixingSchedule(matrices)
