"""How far apart the agents' LoRA products are: consensus error, product norms and distances, computed in float64
on small cores of the stacked factors (no m x n product is ever formed).

Example::

    >>> consensus_error(collect_factors(models))    # 0.0 when every agent holds the same B A
"""

from __future__ import annotations

import torch

from decaf_ext.lora.factors import FactorGroup

CHUNK_BYTES = 1 << 25  # float64 bytes of factors converted at once by the product inner products (32 MiB)


def _centred_cores(group: FactorGroup) -> tuple[torch.Tensor, torch.Tensor]:
    """Agent 0's factors and every agent's offsets from them, in one orthonormal basis per module (float64).

    With [B_0, B_0 - B_0, B_1 - B_0, ..., B_{N-1} - B_0] = Q_B [F_0, F_1, ..., F_N] and likewise
    [A_0; A_0 - A_0; ...]^T = Q_A [G_0, ..., G_N] (QR), any sum of products of these factors is Q_B (core) Q_A^T with
    a core built from the F's and G's, of the same Frobenius norm: no m x n matrix is ever formed, and identical
    agents give exactly zero offsets. Returns F [M, N + 1, k, r] and G [M, N + 1, k', r] (k, k' <= (N + 1) r;
    index 0: agent 0's factors, index 1 + i: agent i's offsets).
    """
    A, B = group.A.double(), group.B.double()  # [M, N, r, n], [M, N, m, r]
    M, N, r = A.shape[:3]
    columns = torch.cat([B[:, :1], B - B[:, :1]], dim=1).permute(0, 2, 1, 3).reshape(M, B.shape[2], (N + 1) * r)
    rows = torch.cat([A[:, :1], A - A[:, :1]], dim=1).reshape(M, (N + 1) * r, A.shape[3]).transpose(1, 2)
    F = torch.linalg.qr(columns, mode="r")[1].unflatten(-1, (N + 1, r)).movedim(-2, 1)
    G = torch.linalg.qr(rows, mode="r")[1].unflatten(-1, (N + 1, r)).movedim(-2, 1)
    return F, G


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> float:
    """sum over modules of numerator / denominator, a module with denominator 0 counting 0."""
    return torch.where(denominator > 0, numerator / denominator, torch.zeros_like(numerator)).sum().item()


def consensus_error(groups: list[FactorGroup]) -> float:
    """Disagreement of the agents' LoRA products, summed over modules.

    Per module: mean_i ||B_i A_i - P̄||_F / ||P̄||_F with P̄ = mean_j B_j A_j (a module counts 0 when
    P̄ = 0). Computed in float64 on (N + 1) r-sized cores (:func:`_centred_cores`), never on m x n products, so it
    fits models whose dense products would not (LLaMA-2-7B with 10 agents: 86 GB).
    """
    total = 0.0
    for group in groups:
        F, G = _centred_cores(group)
        base, Gt = F[:, :1] @ G[:, :1].mT, G.mT
        offsets = F[:, 1:] @ Gt[:, :1] + F[:, :1] @ Gt[:, 1:] + F[:, 1:] @ Gt[:, 1:]  # B_i A_i - B_0 A_0
        mean_offset = offsets.mean(dim=1, keepdim=True)
        spread = torch.linalg.matrix_norm(offsets - mean_offset).mean(dim=1)
        total += _ratio(spread, torch.linalg.matrix_norm(base + mean_offset)[:, 0])
    return total


def _product_inner(left: list[FactorGroup], right: list[FactorGroup]) -> torch.Tensor:
    """float64 [N]: sum over modules of <B_i A_i, B'_i A'_i>_F per agent, from r x r matrices (no m x n product
    is formed): <B A, B' A'> = trace((B^T B') (A' A^T))."""
    total = torch.zeros((), dtype=torch.float64)
    for g, h in zip(left, right, strict=True):
        step = max(1, CHUNK_BYTES // (8 * (g.A[0].numel() + g.B[0].numel()) * (1 if g is h else 2)))
        for start in range(0, g.A.shape[0], step):  # a few modules at a time: float64 copies of bounded size
            A, B = g.A[start:start + step].double(), g.B[start:start + step].double()
            A2, B2 = (A, B) if h is g else (h.A[start:start + step].double(), h.B[start:start + step].double())
            total = total + ((B.transpose(-1, -2) @ B2) * (A @ A2.transpose(-1, -2))).sum(dim=(-1, -2)).sum(dim=0)
    return total


def product_norm(groups: list[FactorGroup]) -> torch.Tensor:
    """float64 [N]: sqrt(sum over modules ||B_i A_i||_F^2) per agent."""
    return _product_inner(groups, groups).clamp_min(0).sqrt()


def product_distance(left: list[FactorGroup], right: list[FactorGroup]) -> torch.Tensor:
    """float64 [N]: sqrt(sum over modules ||B_i A_i - B'_i A'_i||_F^2) per agent (same modules and agents)."""
    squared = _product_inner(left, left) + _product_inner(right, right) - 2 * _product_inner(left, right)
    return squared.clamp_min(0).sqrt()


def consensus_interference(groups: list[FactorGroup]) -> float:
    """How far averaging the factors separately is from averaging the products, summed over modules.

    Per module: ||mean_i B_i A_i - (mean_i B_i)(mean_i A_i)||_F / ||mean_i B_i A_i||_F (a module counts 0 when
    mean_i B_i A_i = 0): the error DLoRA's separate averaging of A [M, N, r, n] and B [M, N, m, r] would make
    on these factors, relative to the true mean product. With offsets b_i = B_i - B_0, a_i = A_i - A_0 the gap is
    mean_i b_i a_i - (mean_i b_i)(mean_i a_i); float64, on the cores of :func:`_centred_cores`.
    """
    total = 0.0
    for group in groups:
        F, G = _centred_cores(group)
        Gt = G.mT
        own = F[:, 1:] @ Gt[:, 1:]  # b_i a_i
        mean_product = F[:, 0] @ Gt[:, 0] + (F[:, 1:] @ Gt[:, :1] + F[:, :1] @ Gt[:, 1:] + own).mean(dim=1)
        gap = own.mean(dim=1) - F[:, 1:].mean(dim=1) @ Gt[:, 1:].mean(dim=1)
        total += _ratio(torch.linalg.matrix_norm(gap), torch.linalg.matrix_norm(mean_product))
    return total
