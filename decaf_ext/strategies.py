"""Communication strategies: how one round mixes the LoRA factors of the agents a runtime hands over.

A strategy is policy only; the runtime decides whom an agent hears from and moves the bytes. Every strategy
maps (groups, extras, W) to new groups and extras without touching its inputs:

- groups hold A [M, N_in, r, n] and B [M, N_in, m, r] (see :mod:`decaf_ext.lora.factors`), extras the other trainable
  parameters stacked as [N_in, ...];
- W [N_out, N_in] holds the mixing weights; output agent i's own factors are input i. The simulator passes the
  round's [N, N] matrix; an agent in its own process passes its [1, k] row over itself (input 0) and the k - 1
  agents it heard from. Output: A [M, N_out, r, n], B [M, N_out, m, r], extras [N_out, ...].

Every runtime (the simulator, the distributed runtime, :class:`~decaf_ext.integrations.averager.DecentralizedAverager`) calls
the same ``communicate``, so a strategy registered from user code runs everywhere unchanged::

    from decaf_ext.lora import FactorGroup
    from decaf_ext.strategies import Strategy, register_strategy, mix

    @register_strategy("half_dlora")
    class HalfDLoRA(Strategy):
        '''DLoRA that moves only half-way towards the neighbours' mix.'''

        def communicate(self, groups, extras, W):
            self.check_agents(groups, extras, W)
            def half(x, dim):
                return 0.5 * x[(slice(None),) * dim + (slice(0, W.shape[0]),)] + 0.5 * mix(W, x, dim)
            return ([FactorGroup(g.names, half(g.A, 1), half(g.B, 1)) for g in groups],
                    {k: half(x, 0) for k, x in extras.items()})
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Iterable, TypeVar

import torch

from decaf_ext.lora import Extras, FactorGroup


S = TypeVar("S", bound=type)

DECAF_METHODS: tuple[str, ...] = ("auto", "exact", "randomized", "dense")
DECAF_SPLITS: tuple[str, ...] = ("balanced", "left", "right")


def mix(W: torch.Tensor, x: torch.Tensor, dim: int) -> torch.Tensor:
    """sum_j W[i, j] x_j along agent axis `dim` of x ([..., N_in, ...] -> [..., N_out, ...]); computed in at
    least float32, returned in x's dtype."""
    compute = torch.promote_types(x.dtype, torch.float32)
    mixed = torch.tensordot(W.to(device=x.device, dtype=compute), x.to(compute).movedim(dim, 0), dims=1)
    return mixed.movedim(0, dim).to(x.dtype)


def _mean(x: torch.Tensor, dim: int, n_out: int) -> torch.Tensor:
    """Plain mean over agent axis `dim`, handed to `n_out` agents."""
    compute = torch.promote_types(x.dtype, torch.float32)
    mean = x.to(compute).mean(dim=dim, keepdim=True)
    return mean.expand(*x.shape[:dim], n_out, *x.shape[dim + 1:]).to(x.dtype).contiguous()


def _own(x: torch.Tensor, dim: int, n_out: int) -> torch.Tensor:
    """A copy of the first `n_out` agents along `dim` (output agent i's own input is input i)."""
    return x.narrow(dim, 0, n_out).clone()


def _each_tensor(groups: list[FactorGroup], extras: Extras, rule: Callable[[torch.Tensor, int], torch.Tensor]
                 ) -> tuple[list[FactorGroup], Extras]:
    """`rule(x, dim)` applied to every A and B (agent axis 1) and every extra (agent axis 0)."""
    return ([FactorGroup(list(g.names), rule(g.A, 1), rule(g.B, 1)) for g in groups],
            {k: rule(x, 0) for k, x in extras.items()})


def _bytes_per_agent(tensors: Iterable[torch.Tensor], dim: int) -> int:
    """Bytes of one agent's slice of each tensor (agent axis `dim`), summed."""
    return sum(t.numel() // t.shape[dim] * t.element_size() for t in tensors)


class Strategy(ABC):
    """One communication round on stacked factors (policy only; see the module docstring for shapes).

    Class attributes: name (registry name, set by :func:`register_strategy`); trains_A: whether agents train A
    locally (False: A is shared and frozen, only B travels); decentralized: True when an agent mixes with its
    graph neighbours by W, False when it needs every agent of the round (the runtime then gathers all members
    and W's values are not used); mixes_products: True when the strategy mixes the products B A rather than the
    factors (what :mod:`decaf_ext.robust` measures distances in).
    """

    name: str = ""
    trains_A: bool = True
    decentralized: bool = True
    mixes_products: bool = False

    @abstractmethod
    def communicate(self, groups: list[FactorGroup], extras: Extras, W: torch.Tensor
                    ) -> tuple[list[FactorGroup], Extras]:
        """New groups and extras of the N_out agents after one round (inputs untouched). W: [N_out, N_in]."""

    def consensus(self, groups: list[FactorGroup], extras: Extras) -> tuple[list[FactorGroup], Extras]:
        """The one model that stands for all N agents (the averaged model): this strategy's mix with the uniform
        row W = [1/N, ..., 1/N] ([1, N]). Returns groups A [M, 1, r, n], B [M, 1, m, r], extras [1, ...]."""
        n = groups[0].n_agents if groups else next(iter(extras.values())).shape[0]
        return self.communicate(groups, extras, torch.full((1, n), 1.0 / n, dtype=torch.float64))

    def bytes_per_message(self, groups: list[FactorGroup], extras: Extras) -> int:
        """Bytes of one agent's copy of everything it sends in a round: its trainable factors (B, and A
        when trains_A) plus its extras."""
        factors = [t for g in groups for t in ((g.A, g.B) if self.trains_A else (g.B,))]
        return _bytes_per_agent(factors, 1) + _bytes_per_agent(extras.values(), 0)

    def bytes_sent(self, groups: list[FactorGroup], extras: Extras, W: torch.Tensor,
                   message_bytes: int | torch.Tensor | None = None) -> torch.Tensor:
        """int64 [N_out]: bytes each output agent sends this round.

        Decentralized: the message times the number of agents it mixes with (nonzero entries of its row of W
        other than its own input). Otherwise: the message, uploaded once. The message is `message_bytes` (its
        encoded size, see :class:`~decaf_ext.comm.layout.MessageLayout`: one int, or int64 [N_out] when agents' messages
        differ), by default :meth:`bytes_per_message`; 0 when that is 0.
        """
        n_in = self.check_agents(groups, extras, W)
        n_out = W.shape[0]
        own_bytes = self.bytes_per_message(groups, extras)
        message = torch.as_tensor(own_bytes if message_bytes is None or own_bytes == 0 else message_bytes,
                                  dtype=torch.int64).expand(n_out)
        if not self.decentralized:
            return message.clone()
        others = (W != 0) & ~torch.eye(n_out, n_in, dtype=torch.bool, device=W.device)
        return others.sum(dim=1).cpu().to(torch.int64) * message

    @staticmethod
    def check_agents(groups: list[FactorGroup], extras: Extras, W: torch.Tensor) -> int:
        """N_in, checked to agree between the groups, the extras and W [N_out, N_in] (N_out <= N_in)."""
        counts = {g.n_agents for g in groups} | {x.shape[0] for x in extras.values()}
        if len(counts) > 1:
            raise ValueError(f"groups/extras: agent counts disagree ({sorted(counts)})")
        if W.dim() != 2:
            raise ValueError(f"W must be a [N_out, N_in] matrix, got shape {list(W.shape)}")
        n = counts.pop() if counts else W.shape[1]
        if W.shape[1] != n or not 1 <= W.shape[0] <= n:
            raise ValueError(f"W must have shape [N_out, {n}] with 1 <= N_out <= {n} for {n} agents, "
                             f"got {list(W.shape)}")
        return n


_REGISTRY: dict[str, type[Strategy]] = {}


def register_strategy(name: str) -> Callable[[S], S]:
    """Class decorator: register a :class:`Strategy` subclass under `name` (its ``name`` attribute is set).

    Options of the strategy are its dataclass fields (``get_strategy(name, **options)``). Registering a name
    twice replaces the earlier class.
    """
    if not name or not isinstance(name, str):
        raise ValueError(f"name must be a non-empty string, got {name!r}")

    def register(cls: S) -> S:
        if not (isinstance(cls, type) and issubclass(cls, Strategy)):
            raise ValueError(f"register_strategy({name!r}): {cls!r} is not a Strategy subclass")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return register


def strategy_names() -> tuple[str, ...]:
    """Names of every registered strategy (built-in first, then the user's, in registration order)."""
    return tuple(_REGISTRY)


def strategy_options(name: str) -> tuple[str, ...]:
    """Option names strategy `name` accepts (its dataclass fields)."""
    cls = _REGISTRY[name]
    return tuple(f.name for f in dataclasses.fields(cls)) if dataclasses.is_dataclass(cls) else ()


def get_strategy(name: str, **options) -> Strategy:
    """The strategy called `name` (one of :func:`strategy_names`) built with `options` (decaf: method,
    oversample, n_iter, seed, split). ValueError naming the argument for an unknown name or option."""
    if name not in _REGISTRY:
        raise ValueError(f"algorithm must be one of {', '.join(_REGISTRY)}; got {name!r}")
    unknown = sorted(set(options) - set(strategy_options(name)))
    if unknown:
        raise ValueError(f"algorithm {name!r} takes no option(s) {', '.join(unknown)}")
    return _REGISTRY[name](**options)


@register_strategy("local")
class Local(Strategy):
    """No communication: every agent keeps its own factors (its consensus model is the plain mean)."""

    decentralized = False

    def communicate(self, groups: list[FactorGroup], extras: Extras, W: torch.Tensor
                    ) -> tuple[list[FactorGroup], Extras]:
        self.check_agents(groups, extras, W)
        n_out = W.shape[0]
        return _each_tensor(groups, extras, lambda x, dim: _own(x, dim, n_out))

    def consensus(self, groups: list[FactorGroup], extras: Extras) -> tuple[list[FactorGroup], Extras]:
        return FedAvg().consensus(groups, extras)

    def bytes_per_message(self, groups: list[FactorGroup], extras: Extras) -> int:
        return 0


@register_strategy("fedavg")
class FedAvg(Strategy):
    """Server averaging: every output agent receives the plain mean of A, B and extras over all its inputs
    (W's values unused: the runtime hands over every agent of the round)."""

    decentralized = False

    def communicate(self, groups: list[FactorGroup], extras: Extras, W: torch.Tensor
                    ) -> tuple[list[FactorGroup], Extras]:
        self.check_agents(groups, extras, W)
        n_out = W.shape[0]
        return _each_tensor(groups, extras, lambda x, dim: _mean(x, dim, n_out))


@register_strategy("dlora")
class DLoRA(Strategy):
    """Gossip on each factor separately: A_i <- sum_j W_ij A_j, B_i <- sum_j W_ij B_j, extras likewise."""

    def communicate(self, groups: list[FactorGroup], extras: Extras, W: torch.Tensor
                    ) -> tuple[list[FactorGroup], Extras]:
        self.check_agents(groups, extras, W)
        return _each_tensor(groups, extras, lambda x, dim: mix(W, x, dim))


@register_strategy("decaf")
@dataclass
class DeCAF(Strategy):
    """Consensus on the products, then rank-r truncated SVD (``decaf_ext.consensus_tsvd``), per shape group.

    B_i A_i <- best rank-r approximation of sum_j W_ij B_j A_j, r = the adapter's rank; extras gossip-averaged
    with W. The fields are passed on to ``consensus_tsvd`` (method, oversample, n_iter, seed, split).
    """

    mixes_products = True

    method: str = "auto"
    oversample: int = 10
    n_iter: int = 2
    seed: int = 0
    split: str = "balanced"

    def __post_init__(self) -> None:
        if self.method not in DECAF_METHODS:
            raise ValueError(f"method must be one of {', '.join(DECAF_METHODS)}; got {self.method!r}")
        if self.split not in DECAF_SPLITS:
            raise ValueError(f"split must be one of {', '.join(DECAF_SPLITS)}; got {self.split!r}")
        for option in ("oversample", "n_iter", "seed"):
            if getattr(self, option) < 0:
                raise ValueError(f"{option} must be >= 0, got {getattr(self, option)}")

    def communicate(self, groups: list[FactorGroup], extras: Extras, W: torch.Tensor
                    ) -> tuple[list[FactorGroup], Extras]:
        from decaf_ext.ops import consensus_tsvd

        self.check_agents(groups, extras, W)
        new_groups = []
        for g in groups:
            A, B, _ = consensus_tsvd(g.A, g.B, W.to(dtype=g.A.dtype), rank=g.rank, method=self.method, split=self.split,
                                     oversample=self.oversample, n_iter=self.n_iter, seed=self.seed)
            new_groups.append(FactorGroup(list(g.names), A, B))
        return new_groups, {k: mix(W, x, 0) for k, x in extras.items()}


@register_strategy("dlora_fa")
class DLoRAFA(Strategy):
    """DLoRA with A frozen at an init shared by all agents: only B and extras are gossip-averaged.

    With unequal ranks (:class:`~decaf_ext.lora.RankPadding`) an agent's A holds the leading rows of the
    shared A and zero rows after them; every output agent gets the shared A (each row from the first agent
    that has it)."""

    trains_A = False

    def communicate(self, groups: list[FactorGroup], extras: Extras, W: torch.Tensor
                    ) -> tuple[list[FactorGroup], Extras]:
        self.check_agents(groups, extras, W)
        return ([FactorGroup(list(g.names), _shared_A(g.A, W.shape[0]), mix(W, g.B, 1)) for g in groups],
                {k: mix(W, x, 0) for k, x in extras.items()})


def _shared_A(A: torch.Tensor, n_out: int) -> torch.Tensor:
    """The one A that agents' A [M, N, r, n] are leading rows of (zero rows after an agent's rank), handed to
    `n_out` agents; ValueError unless every two agents agree on the rows both hold."""
    held = (A != 0).any(dim=-1, keepdim=True)  # [M, N, r, 1]
    low = torch.where(held, A, torch.inf).amin(dim=1)
    high = torch.where(held, A, -torch.inf).amax(dim=1)
    if not torch.equal(torch.where(held.any(dim=1), low, 0), torch.where(held.any(dim=1), high, 0)):
        raise ValueError("groups: dlora_fa needs the same A on every agent (call share_and_freeze_A)")
    first = held.to(torch.int8).argmax(dim=1, keepdim=True)  # [M, 1, r, 1]: the first agent holding each row
    shared = A.gather(1, first.expand(-1, -1, -1, A.shape[-1]))
    return shared.expand(-1, n_out, -1, -1).clone()


STRATEGIES: tuple[str, ...] = strategy_names()  # the built-in strategies; strategy_names() includes the user's
