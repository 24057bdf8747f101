"""Typed Python entry points of the compiled operators (torch.ops.decaf_ext.*) and their fake
kernels for torch.compile. Structural argument errors are raised by the C++ side as ValueError;
the value checks here (finite factors, nonnegative finite weights) read the data and synchronize
with a GPU once per call: pass ``check_values=False`` for a sync-free call.
"""
from __future__ import annotations

import math
import operator
from typing import Literal

import torch

from decaf_ext import _C  # noqa: F401  (loads the operator library)
from decaf_ext.ops.reference import consensus_tsvd_dense

Method = Literal["auto", "exact", "randomized", "dense"]
Split = Literal["balanced", "left", "right"]

CUDA_COMPILED: bool = _C.cuda_compiled


def _dense_weights(W: torch.Tensor) -> torch.Tensor:
    if not isinstance(W, torch.Tensor):
        raise ValueError(f"W must be a torch.Tensor, got {type(W).__name__}")
    return W.to_dense() if W.layout != torch.strided else W


def _integer(name: str, value: object) -> int:
    """`value` as a 64-bit int (ints and integer scalars such as numpy's), else a one-line ValueError naming
    `name`."""
    try:
        number = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        number = None
    if number is None:
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not -2**63 <= number < 2**63:
        raise ValueError(f"{name} must be a 64-bit integer, got {number}")
    return number


def _check_dense_shapes(A: torch.Tensor, B: torch.Tensor, W: torch.Tensor, rank: int) -> None:
    """The dtype, shape and rank checks of the compiled op, for method="dense", which does not call it."""
    for name, tensor in (("A", A), ("B", B), ("W", W)):
        if not tensor.is_floating_point():
            raise ValueError(f"{name} must be a floating point tensor, got {tensor.dtype}")
    if A.dim() < 3:
        raise ValueError(f"A must have shape [..., N_in, r, n], got {list(A.shape)}")
    if B.dim() != A.dim() or B.shape[:-2] != A.shape[:-2] or B.shape[-1] != A.shape[-2]:
        raise ValueError(f"B must have shape [..., N_in, m, r] to match A {list(A.shape)}, got {list(B.shape)}")
    if W.dim() != 2 or W.shape[1] != A.shape[-3]:
        raise ValueError(f"W must have shape [N_out, N_in] with N_in = {A.shape[-3]} (the agents in A and B), "
                         f"got {list(W.shape)}")
    if not 1 <= rank <= min(B.shape[-2], A.shape[-1]):
        raise ValueError(f"rank must be in [1, min(m, n)] = [1, {min(B.shape[-2], A.shape[-1])}], got {rank}")


def _check_values(W: torch.Tensor | None = None, **tensors: torch.Tensor) -> None:
    """Rejects NaN/Inf in the floating point `tensors` and NaN, Inf or negative entries of W.

    Every check is reduced on the tensors' device and read back in ONE host transfer (one
    synchronization on a GPU). A tensor's float64 sum is finite unless it holds NaN/Inf (or its
    values overflow float64 when summed, which an exact second pass then tells apart).
    """
    named = {name: t for name, t in tensors.items() if isinstance(t, torch.Tensor) and t.is_floating_point()}
    stats = [t.sum(dtype=torch.float64) for t in named.values()]
    if W is not None and W.is_floating_point():
        stats += [W.isnan().any(), W.isinf().any(), (W < 0).any()]
    if not stats:
        return
    device = stats[0].device
    values = torch.stack([v.to(device=device, dtype=torch.float64) for v in stats]).tolist()
    for (name, t), total in zip(named.items(), values):
        if not math.isfinite(total) and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or Inf")
    if len(values) > len(named):
        has_nan, has_inf, negative = values[len(named):]
        if has_nan:
            raise ValueError("W contains NaN")
        if has_inf:
            raise ValueError("W contains Inf")
        if negative:
            raise ValueError("W must be nonnegative (mixing weights), got a negative entry")


def consensus_tsvd(A: torch.Tensor, B: torch.Tensor, W: torch.Tensor, rank: int, *,
                   method: Method = "auto", split: Split = "balanced", oversample: int = 10,
                   n_iter: int = 2, seed: int = 0,
                   check_values: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Neighbor-weighted consensus of LoRA products, truncated SVD and factor split, fused.

    For every receiving agent i (and every leading batch index, e.g. modules of one shape):
        M_i = sum_j W[i, j] B_j @ A_j,   B_new[i] @ A_new[i] = best rank-`rank` approximation of M_i.

    Args:
        A: [..., N_in, r, n] LoRA A factors of the sending agents.
        B: [..., N_in, m, r] LoRA B factors (same leading dims, dtype and device as A).
        W: [N_out, N_in] nonnegative mixing weights, dense or sparse (CSR/COO), on the CPU or on
           the device of A. Rows are used as given (no renormalization): M_i is linear in W[i]. An
           agent holding the factors of its k neighbors uses W of shape [1, k]. W on the CPU (also
           with factors on a GPU) is read to plan the call: zero entries are skipped (a row stacks
           the factors of its k nonzero weights) and identical rows are solved once. W on a GPU is
           not read on the host (no synchronization): every row stacks all N_in agents' factors.
        rank: target rank, 1 <= rank <= min(m, n).
        method: "exact" (a factorization R^T R of each neighbor set's stacked factors, once per
            distinct set: on the CPU a Cholesky factorization of their Gram matrix, falling back to
            a Householder QR when that Gram is rank-deficient or ill-conditioned; on CUDA a jittered
            Cholesky factorization of the float64 Gram (float32 inputs) or the QR (float64); then the
            top singular triplets of the small core R_B diag(W[i]) R_A^T per distinct row of W),
            "randomized" (range finder on the factored M_i with `oversample` extra columns and
            `n_iter` power iterations, test matrix from `seed`), "auto" (on the CPU exact while a row
            stacks k*r <= 128 factor columns, k = its nonzero weights, else randomized; on CUDA always
            exact, where randomized was measured slower at every k*r: bench/RESULTS.md), or "dense" (forms M_i and calls
            torch.linalg.svd: the reference, no zero-direction completion). k*r above 2048 raises
            ValueError.
        split: "balanced" (B = U sqrt(S), A = sqrt(S) V^T), "left" (B = U S, A = V^T) or
            "right" (B = U, A = S V^T).
        check_values: reject NaN/Inf factors and negative/NaN weights (reads the data).

    Returns:
        A_new [..., N_out, rank, n], B_new [..., N_out, m, rank], S [..., N_out, rank]
        (S descending). Directions beyond the numerical rank of M_i get S = 0, a zero B column
        and a unit-norm A row orthogonal to the rows above it, taken from the neighbors' own A
        row space (the agent's own factor first), else from the identity, so A is never zero.
        fp16/bf16 inputs are computed in float32 and returned in their dtype.
    """
    W = _dense_weights(W)
    rank = _integer("rank", rank)
    if check_values:
        _check_values(W, A=A, B=B)
    if split not in ("balanced", "left", "right"):
        raise ValueError(f"split must be 'balanced', 'left' or 'right', got {split!r}")
    if method == "dense":
        _check_dense_shapes(A, B, W, rank)
        A_new, B_new, S = consensus_tsvd_dense(A, B, W.to(A.device), rank, split)
        return A_new.to(A.dtype), B_new.to(A.dtype), S.to(A.dtype)
    return torch.ops.decaf_ext.consensus_tsvd.default(A, B, W, rank, method, split, _integer("oversample", oversample),
                                                      _integer("n_iter", n_iter), _integer("seed", seed))


def weighted_product_sum(A: torch.Tensor, B: torch.Tensor, W: torch.Tensor, *,
                         check_values: bool = True) -> torch.Tensor:
    """Dense consensus products M [..., N_out, m, n] = sum_j W[i, j] B_j @ A_j.

    A: [..., N_in, r, n], B: [..., N_in, m, r], W: [N_out, N_in] (dense or sparse).
    """
    W = _dense_weights(W)
    if check_values:
        _check_values(W, A=A, B=B)
    return torch.ops.decaf_ext.weighted_product_sum.default(A, B, W)


def tsvd(M: torch.Tensor, rank: int, *, oversample: int = 10, n_iter: int = 2, seed: int = 0,
         check_values: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched randomized truncated SVD of dense matrices M [..., m, n].

    Range finder with `rank + oversample` columns and `n_iter` power iterations (Halko, Martinsson
    & Tropp), then the exact SVD of the projected factors. Returns U [..., m, rank],
    S [..., rank] (descending), Vh [..., rank, n]; columns of U beyond the numerical rank are zero.
    """
    if check_values:
        _check_values(M=M)
    return torch.ops.decaf_ext.tsvd.default(M, _integer("rank", rank), _integer("oversample", oversample),
                                            _integer("n_iter", n_iter), _integer("seed", seed))


def _lead(t: torch.Tensor, drop: int) -> list[int]:
    return list(t.shape[: t.dim() - drop])


@torch.library.register_fake("decaf_ext::consensus_tsvd")
def _consensus_tsvd_fake(A, B, W, rank, method, split, oversample, n_iter, seed):
    lead, n_out, m, n = _lead(A, 3), W.shape[0], B.shape[-2], A.shape[-1]
    return (A.new_empty(lead + [n_out, rank, n]), A.new_empty(lead + [n_out, m, rank]),
            A.new_empty(lead + [n_out, rank]))


@torch.library.register_fake("decaf_ext::weighted_product_sum")
def _weighted_product_sum_fake(A, B, W):
    return A.new_empty(_lead(A, 3) + [W.shape[0], B.shape[-2], A.shape[-1]])


@torch.library.register_fake("decaf_ext::tsvd")
def _tsvd_fake(M, rank, oversample, n_iter, seed):
    lead, m, n = _lead(M, 2), M.shape[-2], M.shape[-1]
    return M.new_empty(lead + [m, rank]), M.new_empty(lead + [rank]), M.new_empty(lead + [rank, n])
