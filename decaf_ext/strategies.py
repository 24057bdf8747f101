"""Communication strategies: one round of mixing on the agents' stacked LoRA factors.

Every strategy maps (groups, extras, W) to new groups and extras without touching its inputs:
groups hold A [M, N, r, n] and B [M, N, m, r] (see :mod:`decaf_ext.lora`), extras are the other trainable
parameters stacked as [N, ...], W is the [N, N] doubly stochastic mixing matrix of the round.
``bytes_sent`` counts what each agent puts on the wire in that round (formulas in docs/strategies.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable

import torch

from decaf_ext.lora import FactorGroup

STRATEGIES: tuple[str, ...] = ("local", "fedavg", "dlora", "decaf", "dlora_fa")

Extras = dict[str, torch.Tensor]


def _n_agents(groups: list[FactorGroup], extras: Extras, W: torch.Tensor) -> int:
    """N, checked to agree between the groups, the extras and W [N, N]."""
    counts = {g.n_agents for g in groups} | {x.shape[0] for x in extras.values()}
    if len(counts) > 1:
        raise ValueError(f"groups/extras: agent counts disagree ({sorted(counts)})")
    if W.dim() != 2:
        raise ValueError(f"W must be a [N, N] matrix, got shape {list(W.shape)}")
    n = counts.pop() if counts else W.shape[0]
    if W.shape != (n, n):
        raise ValueError(f"W must have shape [{n}, {n}] for {n} agents, got {list(W.shape)}")
    return n


def mix(W: torch.Tensor, x: torch.Tensor, dim: int) -> torch.Tensor:
    """sum_j W[i, j] x_j along agent axis `dim` of x; computed in at least float32, returned in x's dtype."""
    compute = torch.promote_types(x.dtype, torch.float32)
    mixed = torch.tensordot(W.to(device=x.device, dtype=compute), x.to(compute).movedim(dim, 0), dims=1)
    return mixed.movedim(0, dim).to(x.dtype)


def _average(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Plain mean over agent axis `dim`, handed to every agent (same shape as x)."""
    compute = torch.promote_types(x.dtype, torch.float32)
    return x.to(compute).mean(dim=dim, keepdim=True).expand_as(x).to(x.dtype).contiguous()


def _bytes_per_agent(tensors: Iterable[torch.Tensor], dim: int) -> int:
    """Bytes of one agent's slice of each tensor (agent axis `dim`), summed."""
    return sum(t.numel() // t.shape[dim] * t.element_size() for t in tensors)


class Strategy:
    """Base class: one communication round on stacked factors.

    name: registry name; trains_A: whether agents train A locally; decentralized: whether agents talk to
    graph neighbours (True) or to a server (False).
    """

    name: str = ""
    trains_A: bool = True
    decentralized: bool = True

    def communicate(
        self, groups: list[FactorGroup], extras: Extras, W: torch.Tensor
    ) -> tuple[list[FactorGroup], Extras]:
        """New groups and extras after one round (inputs untouched). W: [N, N]."""
        raise NotImplementedError

    def payload(self, groups: list[FactorGroup], extras: Extras) -> int:
        """Bytes of one agent's copy of everything it sends in a round: its trainable factors (B, and A
        when trains_A) plus its extras."""
        factors = [t for g in groups for t in ((g.A, g.B) if self.trains_A else (g.B,))]
        return _bytes_per_agent(factors, 1) + _bytes_per_agent(extras.values(), 0)

    def bytes_sent(self, groups: list[FactorGroup], extras: Extras, W: torch.Tensor) -> torch.Tensor:
        """int64 [N]: bytes each agent sends this round.

        Decentralized: payload times the number of neighbours (nonzero off-diagonal entries of the agent's
        row of W; W is symmetric). Server: the payload, uploaded once.
        """
        n = _n_agents(groups, extras, W)
        if not self.decentralized:
            return torch.full((n,), self.payload(groups, extras), dtype=torch.int64)
        off_diagonal = (W != 0) & ~torch.eye(n, dtype=torch.bool, device=W.device)
        return off_diagonal.sum(dim=1).cpu().to(torch.int64) * self.payload(groups, extras)


class Local(Strategy):
    """No communication: every agent keeps its own factors."""

    name = "local"
    decentralized = False

    def communicate(
        self, groups: list[FactorGroup], extras: Extras, W: torch.Tensor
    ) -> tuple[list[FactorGroup], Extras]:
        _n_agents(groups, extras, W)
        return (
            [FactorGroup(list(g.names), g.A.clone(), g.B.clone()) for g in groups],
            {k: x.clone() for k, x in extras.items()},
        )

    def payload(self, groups: list[FactorGroup], extras: Extras) -> int:
        return 0


class FedAvg(Strategy):
    """Server averaging: every agent receives the plain mean of A, B and extras over all agents (W unused)."""

    name = "fedavg"
    decentralized = False

    def communicate(
        self, groups: list[FactorGroup], extras: Extras, W: torch.Tensor
    ) -> tuple[list[FactorGroup], Extras]:
        _n_agents(groups, extras, W)
        return (
            [FactorGroup(list(g.names), _average(g.A, 1), _average(g.B, 1)) for g in groups],
            {k: _average(x, 0) for k, x in extras.items()},
        )


class DLoRA(Strategy):
    """Gossip on each factor separately: A_i <- sum_j W_ij A_j, B_i <- sum_j W_ij B_j, extras likewise."""

    name = "dlora"

    def communicate(
        self, groups: list[FactorGroup], extras: Extras, W: torch.Tensor
    ) -> tuple[list[FactorGroup], Extras]:
        _n_agents(groups, extras, W)
        return (
            [FactorGroup(list(g.names), mix(W, g.A, 1), mix(W, g.B, 1)) for g in groups],
            {k: mix(W, x, 0) for k, x in extras.items()},
        )


@dataclass
class DeCAF(Strategy):
    """Consensus on the products, then rank-r truncated SVD (``decaf_ext.consensus_tsvd``), per shape group.

    B_i A_i <- best rank-r approximation of sum_j W_ij B_j A_j, r = the adapter's rank; extras gossip-averaged
    with W. The fields are passed on to ``consensus_tsvd``.
    """

    method: str = "auto"
    oversample: int = 10
    n_iter: int = 2
    seed: int = 0

    name = "decaf"

    def communicate(
        self, groups: list[FactorGroup], extras: Extras, W: torch.Tensor
    ) -> tuple[list[FactorGroup], Extras]:
        from decaf_ext.ops import consensus_tsvd

        _n_agents(groups, extras, W)
        new_groups = []
        for g in groups:
            A, B, _ = consensus_tsvd(g.A, g.B, W.to(g.A), rank=g.rank, method=self.method,
                                     oversample=self.oversample, n_iter=self.n_iter, seed=self.seed)
            new_groups.append(FactorGroup(list(g.names), A, B))
        return new_groups, {k: mix(W, x, 0) for k, x in extras.items()}


class DLoRAFA(Strategy):
    """DLoRA with A frozen at an init shared by all agents: only B and extras are gossip-averaged."""

    name = "dlora_fa"
    trains_A = False

    def communicate(
        self, groups: list[FactorGroup], extras: Extras, W: torch.Tensor
    ) -> tuple[list[FactorGroup], Extras]:
        _n_agents(groups, extras, W)
        for g in groups:
            if not torch.equal(g.A, g.A[:, :1].expand_as(g.A)):
                raise ValueError("groups: dlora_fa needs the same A on every agent (call share_and_freeze_A)")
        return (
            [FactorGroup(list(g.names), g.A.clone(), mix(W, g.B, 1)) for g in groups],
            {k: mix(W, x, 0) for k, x in extras.items()},
        )


_REGISTRY: dict[str, type[Strategy]] = {cls.name: cls for cls in (Local, FedAvg, DLoRA, DeCAF, DLoRAFA)}


def get_strategy(name: str, **options) -> Strategy:
    """The strategy called `name` (one of STRATEGIES); `options` go to its constructor (decaf: method,
    oversample, n_iter, seed)."""
    if name not in _REGISTRY:
        raise ValueError(f"algorithm must be one of {', '.join(STRATEGIES)}; got {name!r}")
    cls = _REGISTRY[name]
    known = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"algorithm {name!r} takes no option(s) {', '.join(unknown)}")
    return cls(**options)
