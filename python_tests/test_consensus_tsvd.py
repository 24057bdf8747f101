"""consensus_tsvd against the float64 dense reference (form M_i, torch.linalg.svd)."""
import pytest
import torch

import decaf_ext
from decaf_ext.ops.reference import consensus_tsvd_dense, weighted_product_sum_dense

from conftest import complete_weights, ring_weights

# Stated tolerances (relative to sigma_1 / ||M_i||) for well-conditioned random factors.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def factors(lead, n_agents, r, m, n, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(*lead, n_agents, r, n, generator=g, dtype=torch.float64)
    B = torch.randn(*lead, n_agents, m, r, generator=g, dtype=torch.float64)
    return A.to(device=device, dtype=dtype), B.to(device=device, dtype=dtype)


def assert_matches_reference(A, B, W, rank, out, tol):
    """Singular values match; the product is the best rank-`rank` approximation of M_i."""
    A_new, B_new, S = (t.double().cpu() for t in out)
    A, B, W = A.cpu(), B.cpu(), W.cpu()
    M = weighted_product_sum_dense(A, B, W)
    full = torch.linalg.svdvals(M)
    scale = full[..., :1].clamp_min(1e-300)
    assert ((S - full[..., :rank]).abs() / scale).max() <= tol
    P = B_new @ A_new
    # ||P - M|| equals the optimal error sqrt(sum_{k > rank} sigma_k^2) ...
    opt = full[..., rank:].pow(2).sum(-1).sqrt()
    err = torch.linalg.matrix_norm(P - M)
    assert ((err - opt).abs() / full.pow(2).sum(-1).sqrt().clamp_min(1e-300)).max() <= 10 * tol
    # ... and where the rank-th gap is clear, P equals the reference product.
    A_ref, B_ref, _ = consensus_tsvd_dense(A, B, W, rank)
    gap = (full[..., rank - 1] - (full[..., rank] if full.shape[-1] > rank else 0)) / scale[..., 0]
    clear = gap > 1e-3
    diff = torch.linalg.matrix_norm(P - B_ref @ A_ref) / torch.linalg.matrix_norm(M).clamp_min(1e-300)
    assert (diff[clear] <= 10 * tol / gap[clear]).all()


@pytest.mark.parametrize("method", ["exact", "auto"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("topology", ["ring", "complete"])
@pytest.mark.parametrize("n_agents,r,m,n,rank", [
    (1, 1, 7, 5, 1), (2, 3, 9, 14, 2), (4, 8, 40, 24, 8), (6, 16, 20, 33, 5),
    (8, 2, 64, 48, 3), (16, 4, 24, 40, 12), (16, 1, 50, 30, 1), (5, 16, 128, 96, 16),
    (32, 3, 37, 41, 3),  # ring: per-support Grams and write-back on rows in place, partial tiles
])
def test_matches_dense_reference(device, method, dtype, topology, n_agents, r, m, n, rank):
    A, B = factors((3,), n_agents, r, m, n, dtype, device)
    W = (ring_weights if topology == "ring" else complete_weights)(n_agents).to(device=device, dtype=dtype)
    out = decaf_ext.consensus_tsvd(A, B, W, rank, method=method)
    assert out[0].shape == (3, n_agents, rank, n) and out[1].shape == (3, n_agents, m, rank)
    assert out[2].shape == (3, n_agents, rank) and all(t.dtype == dtype for t in out)
    assert_matches_reference(A, B, W, rank, out, TOL[dtype])


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8])
def test_neighbor_count_and_single_agent_form(device, k):
    """Every k from 1 to N, and the [1, k] form equals the matching row of the [N, N] form."""
    n_agents = 8
    A, B = factors((2,), n_agents, 4, 30, 26, device=device, seed=k)
    W = torch.zeros(n_agents, n_agents, dtype=torch.float64)
    for i in range(n_agents):
        for d in range(k):
            W[i, (i + d) % n_agents] = 1.0 / k
    W = W.to(device)
    out = decaf_ext.consensus_tsvd(A, B, W, 4)
    assert_matches_reference(A, B, W, 4, out, TOL[torch.float64])
    nbrs = [(3 + d) % n_agents for d in range(k)]
    single = decaf_ext.consensus_tsvd(A[:, nbrs], B[:, nbrs], W[3:4, nbrs], 4)
    for got, full in zip(single, out):
        torch.testing.assert_close(got[:, 0], full[:, 3], rtol=1e-9, atol=1e-9)


def test_batch_dims_and_signs(device):
    """Two leading batch dims; with clear gaps the factors themselves equal the reference (sign rule)."""
    A, B = factors((2, 3), 4, 3, 20, 15, device=device, seed=3)
    W = ring_weights(4).to(device)
    A_new, B_new, S = decaf_ext.consensus_tsvd(A, B, W, 3)
    A_ref, B_ref, S_ref = consensus_tsvd_dense(A, B, W, 3)
    torch.testing.assert_close(S, S_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(B_new, B_ref, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(A_new, A_ref, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("split", ["balanced", "left", "right"])
def test_splits(device, split):
    A, B = factors((2,), 4, 3, 20, 15, device=device, seed=4)
    W = ring_weights(4).to(device)
    A_new, B_new, S = decaf_ext.consensus_tsvd(A, B, W, 3, split=split)
    A_ref, B_ref, _ = consensus_tsvd_dense(A, B, W, 3, split=split)
    torch.testing.assert_close(B_new, B_ref, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(A_new, A_ref, rtol=1e-7, atol=1e-7)
    rows = A_new.norm(dim=-1)
    if split == "left":
        torch.testing.assert_close(rows, torch.ones_like(rows))
    if split == "right":
        torch.testing.assert_close(B_new.norm(dim=-2), torch.ones_like(rows))


def test_randomized_is_near_optimal_and_exact_on_low_rank(device):
    # N_in r = 160 > 128: on the CPU "auto" takes the randomized path too (on CUDA the exact one).
    A, B = factors((2,), 16, 10, 200, 150, device=device, seed=5)
    W = complete_weights(16).to(device)
    M = weighted_product_sum_dense(A.cpu(), B.cpu(), W.cpu())
    full = torch.linalg.svdvals(M)
    # Flat spectrum (the hard case): HMT's bound is loose, so only near-optimality is checked.
    for method in ("randomized", "auto"):
        A_new, B_new, S = decaf_ext.consensus_tsvd(A, B, W, 4, method=method, oversample=10, n_iter=3)
        opt = full[..., 4:].pow(2).sum(-1).sqrt()
        err = torch.linalg.matrix_norm((B_new @ A_new).cpu() - M)
        assert (err <= opt * 1.01).all()
        assert ((S.cpu() - full[..., :4]).abs() / full[..., :1]).max() < 5e-2
    # Decaying spectrum (agents near consensus): as accurate as the exact method.
    A2 = A[:, :1] + 1e-3 * A
    B2 = B[:, :1] + 1e-3 * B
    out = decaf_ext.consensus_tsvd(A2, B2, W, 10, method="randomized")
    assert_matches_reference(A2, B2, W, 10, out, 1e-9)
    # Exactly low rank: M_i has rank 10 <= rank + oversample.
    A1, B1 = A[:, :1].expand_as(A).contiguous(), B[:, :1].expand_as(B).contiguous()
    out = decaf_ext.consensus_tsvd(A1, B1, W, 6, method="randomized", oversample=4)
    assert_matches_reference(A1, B1, W, 6, out, 1e-9)


@pytest.mark.parametrize("method", ["exact", "randomized"])
@pytest.mark.parametrize("heavier_neighbor", [False, True])
def test_zero_products_complete_A_from_own_factor(device, method, heavier_neighbor):
    """Standard LoRA init (B = 0): S = 0, B_new = 0, and A_new[i] is an orthonormal basis of A_i's rows,
    also where a neighbor weighs more than the agent itself (the own factor comes first)."""
    A, B = factors((2,), 5, 4, 12, 10, device=device, seed=6)
    B = torch.zeros_like(B)
    W = ring_weights(5)
    if heavier_neighbor:  # self 0.2, the next agent 0.6, the previous 0.2
        W = 0.2 * torch.eye(5, dtype=W.dtype) + 0.6 * torch.roll(torch.eye(5, dtype=W.dtype), 1, 1) + \
            0.2 * torch.roll(torch.eye(5, dtype=W.dtype), -1, 1)
    A_new, B_new, S = decaf_ext.consensus_tsvd(A, B, W.to(device), 4, method=method)
    assert torch.equal(S, torch.zeros_like(S)) and torch.equal(B_new, torch.zeros_like(B_new))
    gram = A_new @ A_new.transpose(-1, -2)
    torch.testing.assert_close(gram, torch.eye(4, dtype=gram.dtype, device=device).expand_as(gram))
    proj = A_new @ torch.linalg.pinv(A) @ A  # projection onto the row space of the agent's own A
    torch.testing.assert_close(proj, A_new)


@pytest.mark.parametrize("side", ["A", "B"])
@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e-21), (torch.float32, 1e-22), (torch.float64, 1e-158),
                                         (torch.float64, 1e-161)])
def test_factors_whose_grams_underflow(device, side, dtype, scale):
    """Normal factors whose squared column norms are subnormal in the Gram's precision (float32 ~1e-43,
    float64 ~1e-320): the Gram path would lose digits to underflow (1e-3 to 1e-2 before), so such
    supports take the Householder path; the bounds are relative to sigma_1, whatever the scale."""
    A, B = factors((), 1, 2, 8, 6, seed=30)
    A, B = (A * scale, B) if side == "A" else (A, B * scale)
    A, B = A.to(device, dtype), B.to(device, dtype)
    out = decaf_ext.consensus_tsvd(A, B, torch.ones(1, 1, dtype=dtype, device=device), 2, method="exact")
    assert_matches_reference(A.double(), B.double(), torch.ones(1, 1, dtype=torch.float64), 2, out, TOL[dtype])


def test_all_zero_factors_complete_with_identity(device):
    A = torch.zeros(3, 2, 6, dtype=torch.float32, device=device)
    B = torch.zeros(3, 5, 2, dtype=torch.float32, device=device)
    A_new, B_new, S = decaf_ext.consensus_tsvd(A, B, ring_weights(3).to(device).float(), 2)
    assert torch.isfinite(A_new).all() and torch.equal(S, torch.zeros_like(S))
    torch.testing.assert_close(A_new, torch.eye(2, 6, device=device).expand(3, 2, 6))


def test_rank_deficient_and_duplicated_neighbors(device):
    A, B = factors((), 4, 3, 15, 12, device=device, seed=7)
    # Every agent holds the same factors: M_i = B_0 A_0 (rank 3) whatever W is.
    A, B = A[:1].expand(4, 3, 12).contiguous(), B[:1].expand(4, 15, 3).contiguous()
    W = ring_weights(4).to(device)
    A_new, B_new, S = decaf_ext.consensus_tsvd(A, B, W, 5)
    assert_matches_reference(A, B, W, 5, (A_new, B_new, S), 1e-9)
    assert torch.equal(S[:, 3:], torch.zeros_like(S[:, 3:]))
    assert torch.equal(B_new[..., 3:], torch.zeros_like(B_new[..., 3:]))
    # Completed rows are unit vectors orthogonal to the kept directions.
    rows = A_new / A_new.norm(dim=-1, keepdim=True)
    gram = rows @ rows.transpose(-1, -2)
    torch.testing.assert_close(gram, torch.eye(5, dtype=gram.dtype, device=device).expand_as(gram),
                               atol=1e-7, rtol=0)


def test_zero_weights_are_skipped(device):
    A, B = factors((), 4, 3, 15, 12, device=device, seed=8)
    W = torch.tensor([[0.5, 0.5, 0.0, 0.0]], dtype=torch.float64, device=device)
    base = decaf_ext.consensus_tsvd(A, B, W, 3)
    A2, B2 = A.clone(), B.clone()
    A2[2:] *= 1e6
    B2[2:] = torch.randn_like(B2[2:])
    other = decaf_ext.consensus_tsvd(A2, B2, W, 3)
    for x, y in zip(base, other):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


def test_rows_of_W_are_used_as_given(device):
    A, B = factors((), 3, 2, 10, 9, device=device, seed=9)
    W = ring_weights(3).to(device)
    _, _, S1 = decaf_ext.consensus_tsvd(A, B, W, 2)
    _, _, S2 = decaf_ext.consensus_tsvd(A, B, 2.5 * W, 2)
    torch.testing.assert_close(S2, 2.5 * S1)


def test_sparse_W_and_noncontiguous_inputs(device):
    A, B = factors((2,), 6, 3, 14, 11, device=device, seed=10)
    W = ring_weights(6).to(device)
    dense = decaf_ext.consensus_tsvd(A, B, W, 3)
    # Non-contiguous views holding the same values.
    A_nc = A.transpose(-1, -2).contiguous().transpose(-1, -2)
    B_nc = torch.stack([B, B], dim=-1)[..., 0]
    assert not A_nc.is_contiguous() and not B_nc.is_contiguous()
    layouts = [W.to_sparse_csr(), W.to_sparse()] if device == "cpu" else [W.to_sparse()]
    for Ws in layouts:
        for got, want in zip(decaf_ext.consensus_tsvd(A_nc, B_nc, Ws, 3), dense):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("topology", ["ring", "complete"])
@pytest.mark.parametrize("spread", [1e-1, 1e-2, 1e-3, 1e-5, 0.0])
def test_exact_near_consensus(device, dtype, topology, spread):
    """Agents near consensus (common factors + spread x own): the stacked neighbor factors go from
    well-conditioned to rank-deficient (on the CPU: from the Gram path to its Householder fallback)."""
    A, B = factors((2,), 6, 4, 48, 40, device=device, seed=19)
    A, B = A[:, :1] + spread * A, B[:, :1] + spread * B
    W = (ring_weights if topology == "ring" else complete_weights)(6).to(device)
    out = decaf_ext.consensus_tsvd(A.to(dtype), B.to(dtype), W.to(dtype), 4, method="exact")
    assert all(torch.isfinite(t).all() for t in out)
    assert_matches_reference(A.to(dtype).double(), B.to(dtype).double(), W.double(), 4, out, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_computed_in_float32(device, dtype):
    A, B = factors((2,), 4, 2, 16, 12, device=device, seed=11)
    A, B = A.to(dtype), B.to(dtype)
    W = ring_weights(4).to(device=device, dtype=dtype)
    out = decaf_ext.consensus_tsvd(A, B, W, 2)
    assert all(t.dtype == dtype for t in out)
    # Reference on the same (rounded) inputs; the only extra error is rounding the outputs.
    assert_matches_reference(A.double(), B.double(), W.double(), 2, out, 2e-2)


def test_repeated_calls_are_bitwise_equal_on_cpu():
    A, B = factors((4,), 10, 4, 64, 48, torch.float32, seed=12)
    W = ring_weights(10).float()
    for method in ("exact", "randomized"):
        first = decaf_ext.consensus_tsvd(A, B, W, 4, method=method)
        for _ in range(3):
            again = decaf_ext.consensus_tsvd(A, B, W, 4, method=method)
            assert all(torch.equal(x, y) for x, y in zip(first, again))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_call_larger_than_a_cache_chunk_equals_calls_per_module(dtype):
    # 12 MiB of factors in float32 (the compute dtype): the CPU solves them in two chunks of 6 modules
    # (at most 8 MiB each), one module per call here; the exact method gives the same bits either way.
    A, B = factors((12,), 16, 8, 1024, 1024, dtype, seed=14)
    W = ring_weights(16)
    whole = decaf_ext.consensus_tsvd(A, B, W, 8, method="exact")
    single = [decaf_ext.consensus_tsvd(A[b:b + 1], B[b:b + 1], W, 8, method="exact") for b in range(12)]
    for k, x in enumerate(whole):
        assert torch.equal(x, torch.cat([s[k] for s in single]))


def test_dense_method_is_the_reference(device):
    A, B = factors((2,), 4, 3, 15, 12, device=device, seed=13)
    W = ring_weights(4).to(device)
    got = decaf_ext.consensus_tsvd(A, B, W, 3, method="dense")
    for x, y in zip(got, consensus_tsvd_dense(A, B, W, 3)):
        torch.testing.assert_close(x, y.to(x.device))


def test_never_nan_on_extreme_scales(device):
    A, B = factors((2,), 5, 4, 20, 18, device=device, seed=14)
    for scale in (1e-150, 1e-30, 1.0, 1e30, 1e150):
        out = decaf_ext.consensus_tsvd(A * scale, B, ring_weights(5).to(device), 4)
        assert all(torch.isfinite(t).all() for t in out)
    # Nearly rank-deficient stack: B_1 = B_0 + tiny noise.
    B2 = B.clone()
    B2[:, 1] = B2[:, 0] + 1e-9 * torch.randn_like(B2[:, 0])
    out = decaf_ext.consensus_tsvd(A, B2, ring_weights(5).to(device), 4)
    assert all(torch.isfinite(t).all() for t in out)
    assert_matches_reference(A, B2, ring_weights(5).to(device), 4, out, 1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_auto_is_exact():
    """On CUDA "auto" takes the exact path at every k*r, also above the CPU's randomized threshold."""
    A, B = factors((2,), 40, 8, 96, 80, torch.float32, "cuda", seed=21)  # k*r = 320
    W = complete_weights(40).to("cuda", torch.float32)
    auto = decaf_ext.consensus_tsvd(A, B, W, 4, method="auto")
    for x, y in zip(auto, decaf_ext.consensus_tsvd(A, B, W, 4, method="exact")):
        assert torch.equal(x, y)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    """Same factors (same sign rule) on both devices, each as accurate as float32 allows; the two take
    different routes to them (the CPU's Cholesky Gram path, CUDA's batched jittered-Cholesky path), so
    entries agree to float32 accuracy on O(1) factors, not bitwise."""
    A, B = factors((3,), 8, 4, 96, 80, torch.float32, seed=15)
    W = ring_weights(8).float()
    for method in ("exact", "randomized"):
        cpu = decaf_ext.consensus_tsvd(A, B, W, 4, method=method)
        gpu = decaf_ext.consensus_tsvd(A.cuda(), B.cuda(), W.cuda(), 4, method=method)
        if method == "exact":
            assert_matches_reference(A, B, W, 4, gpu, TOL[torch.float32])
        for x, y in zip(cpu, gpu):
            torch.testing.assert_close(y.cpu(), x, rtol=1e-4, atol=1e-4)


def test_randomized_with_rank_deficient_core(device):
    """All agents share A (rank 4) but not B: the sketch loses columns, the result stays exact."""
    A, B = factors((2,), 16, 4, 40, 30, device=device, seed=16)
    A = A[:, :1].expand_as(A).contiguous()
    W = ring_weights(16).to(device)
    for rank in (2, 4, 6):
        out = decaf_ext.consensus_tsvd(A, B, W, rank, method="randomized", oversample=10)
        assert all(torch.isfinite(t).all() for t in out)
        kept = min(rank, 4)
        assert_matches_reference(A, B, W, kept, (out[0][..., :kept, :], out[1][..., :kept], out[2][..., :kept]), 1e-9)
        assert torch.equal(out[2][..., 4:], torch.zeros_like(out[2][..., 4:]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("n_agents", [8, 16, 32])
def test_cuda_complete_graph_accurate_with_tf32_on(n_agents):
    """k*r = 64 (one Jacobi eigensolve of 64 x 64 per core), 128 and 256 (subspace iteration) on the
    GPU; a global TF32 setting does not degrade the float32 result."""
    A, B = factors((2,), n_agents, 8, 300, 280, torch.float32, "cuda", seed=17)
    W = complete_weights(n_agents).to("cuda", torch.float32)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        out = decaf_ext.consensus_tsvd(A, B, W, 8, method="exact")
        assert torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert_matches_reference(A, B, W, 8, out, TOL[torch.float32])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("graph", ["ring", "complete"])
def test_cuda_factors_with_weights_on_the_cpu(graph):
    """W on the CPU is read to plan the call (a ring row stacks 3 agents, not all 32); the result
    matches the call with W on the GPU."""
    A, B = factors((2,), 32, 4, 96, 80, torch.float32, "cuda", seed=20)
    W = (ring_weights if graph == "ring" else complete_weights)(32).float()
    out = decaf_ext.consensus_tsvd(A, B, W, 4, method="exact")
    assert all(t.is_cuda for t in out)
    assert_matches_reference(A, B, W, 4, out, TOL[torch.float32])
    for x, y in zip(out, decaf_ext.consensus_tsvd(A, B, W.cuda(), 4, method="exact")):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("weights_on", ["cuda", "cpu"])
@pytest.mark.parametrize("n_agents", [8, 16, 32])
def test_cuda_call_without_checks_does_not_synchronize(n_agents, weights_on):
    """k*r = 32 and 64 (one batched eigh of the cores) and 128 (subspace iteration) with W on the GPU;
    with W on the CPU a ring row stacks k*r = 12 and the plan's index and weight tensors travel through
    pinned memory asynchronously."""
    A, B = factors((2,), n_agents, 4, 64, 48, torch.float32, "cuda", seed=18)
    W = ring_weights(n_agents).to(weights_on, torch.float32)
    decaf_ext.consensus_tsvd(A, B, W, 4, check_values=False)  # warm up (library handles, caches)
    torch.cuda.set_sync_debug_mode("error")
    try:
        decaf_ext.consensus_tsvd(A, B, W, 4, check_values=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("weights_on", ["cuda", "cpu"])
@pytest.mark.parametrize("graph", ["ring", "complete"])
@pytest.mark.parametrize("n_agents", [8, 16, 32])
def test_cuda_fused_path_matches_reference(n_agents, graph, weights_on):
    """The fused path (csrc/solve_fused.cpp) at the GPU preset's k*r: 24 (a ring with W on the CPU), 64
    (Jacobi), 128 and 256 (block Krylov), r = rank = 8, against the float64 reference; bfloat16 factors
    against the reference of their float32 call."""
    A, B = factors((2,), n_agents, 8, 300, 280, torch.float32, "cuda", seed=22)
    W = (ring_weights if graph == "ring" else complete_weights)(n_agents).to(weights_on, torch.float32)
    out = decaf_ext.consensus_tsvd(A, B, W, 8, method="exact", check_values=False)
    assert_matches_reference(A, B, W, 8, out, TOL[torch.float32])
    half = decaf_ext.consensus_tsvd(A.bfloat16(), B.bfloat16(), W, 8, method="exact", check_values=False)
    assert all(t.dtype == torch.bfloat16 for t in half)
    assert_matches_reference(A.bfloat16().float(), B.bfloat16().float(), W, 8, half, 1e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("rank", [16, 32])
def test_cuda_many_triplets_above_64_columns_match_reference(rank):
    """k*r = 256 (complete graph, W on the GPU) with rank 16 and 32 (both declined by the fused path: its block
    Krylov method stops above its tolerance from rank 12 up) against the float64 reference."""
    A, B = factors((2,), 32, 8, 300, 280, torch.float32, "cuda", seed=25)
    W = complete_weights(32).to("cuda", torch.float32)
    out = decaf_ext.consensus_tsvd(A, B, W, rank, method="exact", check_values=False)
    assert_matches_reference(A, B, W, rank, out, TOL[torch.float32])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("n_agents,dtype", [(8, torch.float32), (16, torch.float32), (32, torch.float32),
                                            (16, torch.bfloat16)])
def test_cuda_graph_capture_replays_the_eager_call(n_agents, dtype):
    """With W on the GPU and check_values=False a call (the fused path: k*r = 64, 128, 256) is captured
    in a CUDA graph; replayed on other factors copied into the captured inputs, it gives the eager call's
    result (and, float32, the float64 reference's)."""
    A, B = factors((2,), n_agents, 8, 96, 80, dtype, "cuda", seed=23)
    W = ring_weights(n_agents).to("cuda", torch.float32)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        decaf_ext.consensus_tsvd(A, B, W, 8, check_values=False)  # warm-up: handles, device attributes
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = decaf_ext.consensus_tsvd(A, B, W, 8, check_values=False)
    A2, B2 = factors((2,), n_agents, 8, 96, 80, dtype, "cuda", seed=24)
    A.copy_(A2)
    B.copy_(B2)
    graph.replay()
    torch.cuda.synchronize()
    eager = decaf_ext.consensus_tsvd(A2, B2, W, 8, check_values=False)
    for x, y in zip(captured, eager):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    if dtype == torch.float32:
        assert_matches_reference(A2, B2, W, 8, captured, TOL[torch.float32])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_value_checks_synchronize_once():
    A, B = factors((2,), 8, 4, 64, 48, torch.float32, "cuda", seed=19)
    W = ring_weights(8).to("cuda", torch.float32)
    decaf_ext.consensus_tsvd(A, B, W, 4)  # warm up
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with pytest.warns(UserWarning, match="synchroniz") as record:
            decaf_ext.consensus_tsvd(A, B, W, 4)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len([w for w in record if "synchroniz" in str(w.message)]) == 1
