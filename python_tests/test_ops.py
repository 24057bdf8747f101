"""weighted_product_sum and tsvd against float64 references; bad input; torch.library.opcheck."""
import pytest
import torch

import decaf_ext
from decaf_ext.ops.reference import weighted_product_sum_dense

from conftest import ring_weights


def test_weighted_product_sum_matches_reference(device):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(2, 5, 3, 11, generator=g)
    B = torch.randn(2, 5, 13, 3, generator=g)
    W = torch.rand(4, 5, generator=g)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        got = decaf_ext.weighted_product_sum(A.to(device, dtype), B.to(device, dtype), W.to(device, dtype))
        want = weighted_product_sum_dense(A, B, W)
        assert got.shape == (2, 4, 13, 11) and got.dtype == dtype
        torch.testing.assert_close(got.double().cpu(), want, rtol=tol, atol=tol)


def test_tsvd_matches_svd(device):
    g = torch.Generator().manual_seed(1)
    # Decaying spectrum: sigma_k = 0.7^k.
    U0 = torch.linalg.qr(torch.randn(3, 60, 40, generator=g, dtype=torch.float64))[0]
    V0 = torch.linalg.qr(torch.randn(3, 50, 40, generator=g, dtype=torch.float64))[0]
    s0 = 0.7 ** torch.arange(40, dtype=torch.float64)
    M = (U0 * s0) @ V0.transpose(-1, -2)
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-5)):
        U, S, Vh = decaf_ext.tsvd(M.to(device, dtype), 6, oversample=10, n_iter=2)
        assert U.shape == (3, 60, 6) and S.shape == (3, 6) and Vh.shape == (3, 6, 50)
        torch.testing.assert_close(S.double().cpu(), s0[:6].expand(3, 6), rtol=tol, atol=tol)
        best = (U0[..., :6] * s0[:6]) @ V0[..., :6].transpose(-1, -2)
        approx = (U.double() * S.double().unsqueeze(-2)) @ Vh.double()
        torch.testing.assert_close(approx.cpu(), best, rtol=0, atol=10 * tol)
        eye = torch.eye(6, dtype=torch.float64)
        torch.testing.assert_close((U.double().mT @ U.double()).cpu(), eye.expand(3, 6, 6), rtol=0, atol=10 * tol)


def test_tsvd_rank_deficient_has_zero_tail(device):
    g = torch.Generator().manual_seed(2)
    M = (torch.randn(30, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 20, generator=g, dtype=torch.float64))
    U, S, Vh = decaf_ext.tsvd(M.to(device), 4)
    assert torch.isfinite(U).all() and torch.isfinite(Vh).all()
    torch.testing.assert_close(S[2:].cpu(), torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(((U * S) @ Vh).cpu(), M, rtol=1e-10, atol=1e-10)


def _args(**over):
    g = torch.Generator().manual_seed(3)
    args = dict(A=torch.randn(4, 2, 6, generator=g), B=torch.randn(4, 5, 2, generator=g), W=ring_weights(4).float())
    args.update(over)
    return args


@pytest.mark.parametrize("over,rank,pattern", [
    (dict(B=torch.randn(4, 5, 3)), 2, "B must have shape"),
    (dict(B=torch.randn(3, 5, 2)), 2, "B must have shape"),
    (dict(B=torch.randn(4, 5, 2, dtype=torch.float64)), 2, "B must have the dtype of A"),
    (dict(A=torch.randn(2, 6)), 2, "A must have shape"),
    (dict(W=torch.full((4, 3), 0.25)), 2, "W must have shape"),
    (dict(W=torch.full((4,), 0.25)), 2, "W must have shape"),
    (dict(A=torch.randint(0, 3, (4, 2, 6))), 2, "A must be a floating point tensor"),
    ({}, 0, "rank must be in"),
    ({}, 6, "rank must be in"),
    (dict(W=ring_weights(4).float() * torch.tensor([1.0, -1, 1, 1])), 2, "W must be nonnegative"),
    (dict(W=torch.full((4, 4), float("nan"))), 2, "W contains NaN"),
    (dict(A=torch.full((4, 2, 6), float("inf"))), 2, "A contains NaN or Inf"),
    (dict(B=torch.full((4, 5, 2), float("nan"))), 2, "B contains NaN or Inf"),
    (dict(W=ring_weights(4).float().index_put((torch.tensor(1), torch.tensor(2)), torch.tensor(float("inf")))),
     2, "W contains Inf"),
])
def test_bad_input_names_the_argument(over, rank, pattern):
    args = _args(**over)
    with pytest.raises(ValueError, match=pattern) as info:
        decaf_ext.consensus_tsvd(args["A"], args["B"], args["W"], rank)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("method", ["auto", "dense"])
@pytest.mark.parametrize("over,rank,pattern", [
    ({}, 0, "rank must be in"),
    ({}, -1, "rank must be in"),
    ({}, 6, "rank must be in"),
    ({}, 2.5, "rank must be an integer"),
    ({}, "2", "rank must be an integer"),
    ({}, None, "rank must be an integer"),
    (dict(W=torch.full((4, 3), 0.25)), 2, "W must have shape"),
    (dict(B=torch.randn(4, 5, 3)), 2, "B must have shape"),
    (dict(W=torch.ones(4, 4, dtype=torch.int64)), 2, "W must be a floating point tensor"),
])
def test_rank_and_shapes_are_checked_for_every_method(method, over, rank, pattern):
    """The dense reference method checks rank, dtypes and shapes like the compiled ones; a rank is never truncated."""
    args = _args(**over)
    with pytest.raises(ValueError, match=pattern) as info:
        decaf_ext.consensus_tsvd(args["A"], args["B"], args["W"], rank, method=method)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["rank", "oversample", "n_iter", "seed"])
@pytest.mark.parametrize("value", [2**63, -2**63 - 1])
def test_integer_options_beyond_64_bits_are_one_line(name, value):
    """The op's schema takes 64-bit integers; a larger Python int is refused naming its argument."""
    args = _args()
    options = {"rank": 2, "method": "randomized", name: value}
    with pytest.raises(ValueError, match=f"{name} must be a 64-bit integer") as info:
        decaf_ext.consensus_tsvd(args["A"], args["B"], args["W"], **options)
    assert "\n" not in str(info.value)


def test_value_checks_find_one_bad_entry_and_accept_sums_that_overflow():
    """One NaN among finite factors is found; finite float64 factors whose sum overflows are accepted."""
    args = _args()
    B = args["B"].clone()
    B[2, 3, 1] = float("nan")
    with pytest.raises(ValueError, match="B contains NaN or Inf"):
        decaf_ext.consensus_tsvd(args["A"], B, args["W"], 2)
    huge = torch.full((4, 2, 6), 1e308, dtype=torch.float64)
    assert not torch.isfinite(huge.sum())
    decaf_ext.ops.consensus._check_values(args["W"], A=huge)  # finite entries: no error


def test_too_many_stacked_columns_names_W_and_the_limit():
    """k * r above 2048 (here one receiving agent with 257 neighbors of rank 8) is a one-line error."""
    A, B = torch.randn(257, 8, 9), torch.randn(257, 10, 8)
    with pytest.raises(ValueError, match=r"W: .*k\*r = 257\*8 = 2056.* at most 2048") as info:
        decaf_ext.consensus_tsvd(A, B, torch.full((1, 257), 1.0 / 257), 2)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(method="svd"), "method must be"),
    (dict(split="middle"), "split must be"),
    (dict(oversample=-1), "oversample must be"),
    (dict(n_iter=-1), "n_iter must be"),
])
def test_bad_options(kwargs, pattern):
    args = _args()
    with pytest.raises(ValueError, match=pattern):
        decaf_ext.consensus_tsvd(args["A"], args["B"], args["W"], 2, **kwargs)


def test_bad_input_other_ops():
    args = _args()
    with pytest.raises(ValueError, match="W must have shape"):
        decaf_ext.weighted_product_sum(args["A"], args["B"], torch.ones(4, 3))
    with pytest.raises(ValueError, match="rank must be in"):
        decaf_ext.tsvd(torch.randn(5, 4), 5)
    with pytest.raises(ValueError, match="M contains NaN or Inf"):
        decaf_ext.tsvd(torch.full((5, 4), float("nan")), 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_mismatch():
    args = _args()
    with pytest.raises(ValueError, match="B must be on the device of A"):
        decaf_ext.consensus_tsvd(args["A"].cuda(), args["B"], args["W"], 2)
    with pytest.raises(ValueError, match="W must be on the CPU or on the device of A"):
        decaf_ext.consensus_tsvd(args["A"], args["B"], args["W"].cuda(), 2)


def test_opcheck(device):
    args = _args()
    A, B, W = args["A"].to(device), args["B"].to(device), args["W"].to(device)
    torch.library.opcheck(torch.ops.decaf_ext.consensus_tsvd.default, (A, B, W, 2, "exact", "balanced", 10, 2, 0))
    torch.library.opcheck(torch.ops.decaf_ext.consensus_tsvd.default, (A, B, W, 2, "randomized", "left", 2, 1, 7))
    torch.library.opcheck(torch.ops.decaf_ext.weighted_product_sum.default, (A, B, W))
    torch.library.opcheck(torch.ops.decaf_ext.tsvd.default, (torch.randn(2, 9, 7, device=device), 3, 2, 1, 0))


def test_torch_compile_traces_the_op():
    args = _args()

    @torch.compile(fullgraph=True, backend="eager")
    def step(A, B, W):
        A_new, B_new, S = torch.ops.decaf_ext.consensus_tsvd.default(A, B, W, 2, "exact", "balanced", 10, 2, 0)
        return B_new @ A_new

    want = decaf_ext.consensus_tsvd(args["A"], args["B"], args["W"], 2)
    torch.testing.assert_close(step(args["A"], args["B"], args["W"]), want[1] @ want[0])
