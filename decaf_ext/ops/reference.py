"""Plain float64 PyTorch references for the compiled ops (what the tests and benchmarks compare to).

These form the dense consensus matrices M_i = sum_j W[i, j] B_j @ A_j and call torch.linalg.svd:
exact, simple and O(m n min(m, n)) per matrix.
"""
from __future__ import annotations

import torch

SPLIT_EXPONENTS = {"balanced": (0.5, 0.5), "left": (1.0, 0.0), "right": (0.0, 1.0)}


def weighted_product_sum_dense(A: torch.Tensor, B: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """M [..., N_out, m, n] = sum_j W[i, j] B[..., j] @ A[..., j] in float64.

    A: [..., N_in, r, n], B: [..., N_in, m, r], W: [N_out, N_in] (dense or sparse).
    """
    W = W.to_dense() if W.layout != torch.strided else W
    return torch.einsum("ij,...jmr,...jrn->...imn", W.double(), B.double(), A.double())


def signed_svd(M: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-`rank` truncated SVD of M [..., m, n] with the library's sign rule.

    Returns U [..., m, rank], S [..., rank], Vh [..., rank, n]. Each pair (u_k, v_k) is signed so
    that sum(u_k) > 0 (when |sum(u_k)| is negligible: sum(v_k) > 0).
    """
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    U, S, Vh = U[..., :rank], S[..., :rank], Vh[..., :rank, :]
    su, sv = U.sum(-2), Vh.sum(-1)
    tie = su.abs() <= 1e-10 * U.abs().sum(-2)
    flip = torch.where(tie, sv < 0, su < 0)
    sign = 1.0 - 2.0 * flip.to(U.dtype)
    return U * sign.unsqueeze(-2), S, Vh * sign.unsqueeze(-1)


def split_factors(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor,
                  split: str = "balanced") -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with B @ A = U diag(S) Vh: A [..., rank, n], B [..., m, rank]."""
    eb, ea = SPLIT_EXPONENTS[split]
    return S.pow(ea).unsqueeze(-1) * Vh, U * S.pow(eb).unsqueeze(-2)


def consensus_tsvd_dense(A: torch.Tensor, B: torch.Tensor, W: torch.Tensor, rank: int,
                         split: str = "balanced") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float64 reference of consensus_tsvd: form every M_i, SVD it, truncate, split.

    Returns A_new [..., N_out, rank, n], B_new [..., N_out, m, rank], S [..., N_out, rank] (float64).
    Zero singular values give zero rows/columns here (no completion).
    """
    U, S, Vh = signed_svd(weighted_product_sum_dense(A, B, W), rank)
    A_new, B_new = split_factors(U, S, Vh, split)
    return A_new, B_new, S
