"""Byzantine-robust mixing around any strategy: ClippedGossip (He, Karimireddy, Jaggi, 2022).

Agent i moves toward each input j by at most tau_i: j's contribution is pulled to within tau_i of i's own model,
x_j -> x_i + c_ij (x_j - x_i) with c_ij = min(1, tau_i / ||x_j - x_i||) (c_ij = 1 when the distance is 0). What
"x" is depends on the strategy (its ``mixes_products`` attribute):

- product space (decaf): x = (every module's B A, every extra), the distance from r x r Grams of the factors
  (``||BA||^2 = tr((B^T B)(A A^T))``, cross terms ``tr((B_i^T B_j)(A_j A_i^T))``; no m x n product is formed).
  The clipped mix sum_j W_ij [(1 - c_ij) x_i + c_ij x_j] is a weighted sum of the x_j, so the weights fold into
  W's row: W'_ij = W_ij c_ij (j != i), W'_ii = W_ii + sum_{j != i} W_ij (1 - c_ij), and the strategy (one
  ``consensus_tsvd`` call per shape group) runs unchanged on W'.
- factor space (dlora, dlora_fa, fedavg, local, user strategies by default): x = (every factor the strategy
  sends: A when it trains A, B; every extra). A decentralized strategy gets the folded W' as above (exactly
  ClippedGossip on each factor when it mixes by ``mix(W, x)``); a server strategy (``decentralized`` False: W's
  values unused) is called once per output agent on the inputs pulled toward that agent.

One c_ij per (agent, input) pair clips the whole message, so one W' serves every tensor. W' is row-stochastic
whenever W is, but no longer symmetric (each row is clipped around its own agent): the doubly-stochastic
assumption of DeCAF's and DLoRA's convergence proofs no longer holds; ClippedGossip's analysis, which accounts for
the clipping, is the one that applies.

Per round, while sum_j W_ij = 1: ||x_i' - x_i|| <= tau_i * sum_{j != i} W_ij for the mixed x (dlora, dlora_fa, a
user strategy linear in the mix; fedavg: tau_i (k - 1) / k); for decaf the mixed product is then truncated to rank
r, which at most doubles the move. tau: a fixed number (``clipped_gossip:TAU``), or automatic (``clipped_gossip``):
tau_i = the weighted lower median of agent i's distances to its inputs j != i this round (weights W_ij; uniform
for a server strategy). Stateless (nothing to checkpoint, the same in every runtime); while Byzantine inputs hold
at most half of i's weight on others, tau_i is at most the largest honest distance.

Example::

    >>> robust = with_robust(get_strategy("decaf"), "clipped_gossip:0.5")
    >>> groups, extras = robust.communicate(groups, extras, W)   # agent i moves <= 2 * 0.5 * (1 - W_ii)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from decaf_ext.lora import Extras, FactorGroup, select_agent, stack_agents
from decaf_ext.strategies import Strategy

ROBUST_RULES: tuple[str, ...] = ("clipped_gossip",)


@dataclass(frozen=True)
class RobustRule:
    """A parsed ``--robust`` spec: the rule's name and tau (None: automatic, see the module docstring)."""

    name: str
    tau: float | None = None


def parse_robust(spec: str) -> RobustRule:
    """'clipped_gossip' or 'clipped_gossip:TAU' (TAU > 0; 'inf' clips nothing) -> RobustRule; ValueError
    (one line, starting "robust:") for anything else."""
    name, colon, value = str(spec).strip().partition(":")
    if name not in ROBUST_RULES:
        raise ValueError(f"robust: unknown rule {name!r} in {spec!r} (expected clipped_gossip or clipped_gossip:TAU)")
    if not colon:
        return RobustRule(name)
    try:
        tau = float(value)
    except ValueError:
        raise ValueError(f"robust: TAU must be a number > 0, got {value!r} in {spec!r}") from None
    if not tau > 0:  # NaN too
        raise ValueError(f"robust: TAU must be > 0, got {value!r} in {spec!r}")
    return RobustRule(name, tau)


def _sent(strategy: Strategy, groups: list[FactorGroup], extras: Extras) -> list[torch.Tensor]:
    """The factor-space tensors, agent axis first: A [N, M, r, n] when trained, B [N, M, m, r], extras [N, ...]."""
    factors = [t.movedim(1, 0) for g in groups for t in ((g.A, g.B) if strategy.trains_A else (g.B,))]
    return factors + list(extras.values())


def product_kernel(group: FactorGroup) -> torch.Tensor:
    """float64 [N, N]: K_ij = sum over modules <B_i A_i, B_j A_j>_F = tr((B_i^T B_j)(A_j A_i^T)), from r x r Grams
    of A [M, N, r, n], B [M, N, m, r] (zero-padded ranks contribute nothing)."""
    A, B = group.A.double(), group.B.double()
    BtB = torch.einsum("mipr,mjps->mijrs", B, B)  # B_i^T B_j
    AAt = torch.einsum("mirn,mjsn->mijrs", A, A)  # A_i A_j^T, whose transpose pairs with B_i^T B_j in the trace
    return (BtB * AAt).sum(dim=(0, 3, 4))


def _flat_kernel(x: torch.Tensor) -> torch.Tensor:
    """float64 [N, N]: Gram matrix of x [N, ...] flattened per agent."""
    flat = x.reshape(x.shape[0], -1).double()
    return flat @ flat.T


def distances(strategy: Strategy, groups: list[FactorGroup], extras: Extras, n_out: int) -> torch.Tensor:
    """float64 [n_out, N_in] on the CPU: ||x_j - x_i|| in the strategy's space (see the module docstring), from the
    Gram matrix of the agents' messages, computed in float64 where the factors live."""
    if strategy.mixes_products:
        kernels = [product_kernel(g) for g in groups] + [_flat_kernel(x) for x in extras.values()]
    else:
        kernels = [_flat_kernel(x) for x in _sent(strategy, groups, extras)]
    K = torch.stack(kernels).sum(dim=0)
    diagonal = K.diagonal()
    squared = diagonal[:n_out, None] + diagonal[None, :] - 2 * K[:n_out]
    squared.diagonal().zero_()
    return squared.clamp_min(0).sqrt().cpu()


def automatic_tau(D: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """float64 [n_out]: per output agent i, the weighted lower median of D[i, j] over inputs j != i with
    weights[i, j] > 0 (inf when there is none). D, weights: [n_out, N_in]."""
    tau = torch.full((D.shape[0],), math.inf, dtype=torch.float64)
    for i in range(D.shape[0]):
        chosen = weights[i] > 0
        chosen[i] = False
        if not chosen.any():
            continue
        d, order = D[i][chosen].sort()
        cumulative = weights[i][chosen].double()[order].cumsum(0)
        half = 0.5 * cumulative[-1] * (1 - 1e-9)  # a tie at exactly half takes the lower distance
        tau[i] = d[int(torch.searchsorted(cumulative, half))]
    return tau


def clip_coefficients(D: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """float64 [n_out, N_in]: c_ij = min(1, tau_i / D_ij), 1 where D_ij = 0 (own input included). tau: [n_out]."""
    tau = tau.to(torch.float64)[:, None].expand_as(D)
    return torch.where(D > tau, tau / D, torch.ones_like(D))


def fold(W: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """float64 [n_out, N_in]: W'_ij = W_ij c_ij off the diagonal, W'_ii = W_ii + sum_{j != i} W_ij (1 - c_ij)
    (output agent i's own input is input i)."""
    W = W.to(dtype=torch.float64, device="cpu")
    folded = W * C
    kept = (W * (1 - C)).sum(dim=1)
    index = torch.arange(W.shape[0])
    folded[index, index] += kept
    return folded


def _pulled(strategy: Strategy, groups: list[FactorGroup], extras: Extras, i: int, c: torch.Tensor
            ) -> tuple[list[FactorGroup], Extras]:
    """Inputs pulled toward agent i: every sent tensor x_j -> x_i + c_j (x_j - x_i) (c: float64 [N_in])."""

    def pull(x: torch.Tensor, dim: int) -> torch.Tensor:
        shape = [1] * x.dim()
        shape[dim] = -1
        own = x.narrow(dim, i, 1).double()
        weight = c.to(x.device).reshape(shape)
        return (own + weight * (x.double() - own)).to(x.dtype)

    return ([FactorGroup(list(g.names), pull(g.A, 1) if strategy.trains_A else g.A, pull(g.B, 1)) for g in groups],
            {k: pull(x, 0) for k, x in extras.items()})


class ClippedGossip(Strategy):
    """`inner` with every agent's move toward each input clipped to tau (None: automatic); see the module
    docstring. name, trains_A, decentralized and mixes_products are the inner strategy's; consensus (the averaged
    model) and the bytes sent are the inner strategy's too."""

    def __init__(self, inner: Strategy, tau: float | None = None) -> None:
        if isinstance(inner, ClippedGossip):
            raise ValueError("robust: the strategy is already clipped")
        if not inner.decentralized and inner.mixes_products:
            raise ValueError(f"robust: clipped_gossip cannot clip {inner.name!r}, a server strategy that mixes "
                             "products")
        if tau is not None and not tau > 0:
            raise ValueError(f"robust: tau must be > 0, got {tau}")
        self.inner, self.tau = inner, tau
        self.name, self.trains_A = inner.name, inner.trains_A
        self.decentralized, self.mixes_products = inner.decentralized, inner.mixes_products

    def __repr__(self) -> str:
        return f"ClippedGossip({self.inner!r}, tau={'auto' if self.tau is None else self.tau})"

    def coefficients(self, groups: list[FactorGroup], extras: Extras, W: torch.Tensor) -> torch.Tensor:
        """float64 [N_out, N_in]: this round's c_ij (1 on the diagonal)."""
        n_out = W.shape[0]
        D = distances(self.inner, groups, extras, n_out)
        weights = W.to(dtype=torch.float64, device="cpu") if self.decentralized else torch.ones_like(D)
        tau = automatic_tau(D, weights) if self.tau is None else torch.full((n_out,), self.tau, dtype=torch.float64)
        return clip_coefficients(D, tau)

    def communicate(self, groups: list[FactorGroup], extras: Extras, W: torch.Tensor
                    ) -> tuple[list[FactorGroup], Extras]:
        self.check_agents(groups, extras, W)
        if self.inner.bytes_per_message(groups, extras) == 0:  # local: nothing is heard, nothing to clip
            return self.inner.communicate(groups, extras, W)
        C = self.coefficients(groups, extras, W)
        if bool((C == 1).all()):
            return self.inner.communicate(groups, extras, W)
        if self.decentralized:
            return self.inner.communicate(groups, extras, fold(W, C).to(W.device))
        rows = [select_agent(*self.inner.communicate(*_pulled(self.inner, groups, extras, i, C[i]), W), i)
                for i in range(W.shape[0])]
        return stack_agents(rows)

    def consensus(self, groups: list[FactorGroup], extras: Extras) -> tuple[list[FactorGroup], Extras]:
        return self.inner.consensus(groups, extras)

    def bytes_per_message(self, groups: list[FactorGroup], extras: Extras) -> int:
        return self.inner.bytes_per_message(groups, extras)

    def bytes_sent(self, groups: list[FactorGroup], extras: Extras, W: torch.Tensor,
                   message_bytes: int | torch.Tensor | None = None) -> torch.Tensor:
        return self.inner.bytes_sent(groups, extras, W, message_bytes)


def with_robust(strategy: Strategy, spec: str | None) -> Strategy:
    """`strategy` under the ``--robust`` rule `spec` (None or '': unchanged). ValueError starting "robust:"."""
    if not spec:
        return strategy
    rule = parse_robust(spec)
    return ClippedGossip(strategy, rule.tau)
