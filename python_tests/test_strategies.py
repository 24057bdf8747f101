"""decaf_ext.strategies: each communication round against a hand computation on small stacked factors."""

from __future__ import annotations

import pytest
import torch

from decaf_ext.config import TrainConfig, build_config
from decaf_ext.errors import ConfigError
from decaf_ext.lora import FactorGroup, consensus_error
from decaf_ext.strategies import STRATEGIES, get_strategy, register_strategy, strategy_names, strategy_options
from user_strategy import NAME as USER_STRATEGY
from user_strategy import DampedDLoRA

N = 4


def ring_W(n: int = N) -> torch.Tensor:
    """Uniform ring mixing matrix: 1/3 on self and both neighbours."""
    W = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in (i - 1, i, i + 1):
            W[i, j % n] = 1 / 3
    return W


def lopsided_W() -> torch.Tensor:
    """Row-stochastic, not symmetric: tells sum_j W[i, j] x_j apart from sum_j W[j, i] x_j."""
    return torch.tensor([[0.7, 0.3, 0.0, 0.0], [0.0, 0.2, 0.8, 0.0], [0.1, 0.0, 0.4, 0.5], [0.6, 0.0, 0.0, 0.4]],
                        dtype=torch.float64)


def complete_W(n: int = N) -> torch.Tensor:
    return torch.full((n, n), 1 / n, dtype=torch.float64)


def make_state(dtype: torch.dtype = torch.float64, seed: int = 0) -> tuple[list[FactorGroup], dict[str, torch.Tensor]]:
    """Two shape groups (r=3: 2 modules 6x5 and 1 module 4x7) and one extra [N, 3, 2]."""
    g = torch.Generator().manual_seed(seed)
    groups = [
        FactorGroup(["q", "v"], torch.randn(2, N, 3, 5, generator=g, dtype=dtype),
                    torch.randn(2, N, 6, 3, generator=g, dtype=dtype)),
        FactorGroup(["ffn"], torch.randn(1, N, 3, 7, generator=g, dtype=dtype),
                    torch.randn(1, N, 4, 3, generator=g, dtype=dtype)),
    ]
    return groups, {"head.weight": torch.randn(N, 3, 2, generator=g, dtype=dtype)}


def hand_mix(W: torch.Tensor, x: torch.Tensor, dim: int) -> torch.Tensor:
    """sum_j W[i, j] x_j along agent axis `dim`, agent by agent."""
    parts = [sum(W[i, j].item() * x.select(dim, j) for j in range(W.shape[0])) for i in range(W.shape[0])]
    return torch.stack(parts, dim=dim)


def truncated_product(M: torch.Tensor, rank: int) -> torch.Tensor:
    """Best rank-`rank` approximation of M [m, n], float64 SVD."""
    U, S, Vh = torch.linalg.svd(M.double(), full_matrices=False)
    return U[:, :rank] @ torch.diag(S[:rank]) @ Vh[:rank]


def test_registry():
    assert STRATEGIES == ("local", "fedavg", "dlora", "decaf", "dlora_fa")
    for name in STRATEGIES:
        assert get_strategy(name).name == name
    assert [get_strategy(n).trains_A for n in STRATEGIES] == [True, True, True, True, False]
    assert [get_strategy(n).decentralized for n in STRATEGIES] == [False, False, True, True, True]


def test_unknown_algorithm_and_option_are_rejected():
    with pytest.raises(ValueError, match="algorithm.*'gossip'"):
        get_strategy("gossip")
    with pytest.raises(ValueError, match="n_iter"):
        get_strategy("dlora", n_iter=3)
    assert get_strategy("decaf", n_iter=3).n_iter == 3


def test_wrong_W_shape_is_rejected():
    groups, extras = make_state()
    with pytest.raises(ValueError, match="W"):
        get_strategy("dlora").communicate(groups, extras, ring_W(N + 1))
    with pytest.raises(ValueError, match="extras"):
        get_strategy("dlora").communicate(groups, {"x": torch.zeros(N + 1)}, ring_W())


def test_local_is_a_copy():
    groups, extras = make_state()
    new_groups, new_extras = get_strategy("local").communicate(groups, extras, ring_W())
    for old, new in zip(groups, new_groups):
        assert torch.equal(new.A, old.A) and torch.equal(new.B, old.B) and new.A.data_ptr() != old.A.data_ptr()
    assert torch.equal(new_extras["head.weight"], extras["head.weight"])


def test_fedavg_gives_every_agent_the_mean():
    groups, extras = make_state()
    new_groups, new_extras = get_strategy("fedavg").communicate(groups, extras, ring_W())
    for old, new in zip(groups, new_groups):
        for i in range(N):
            torch.testing.assert_close(new.A[:, i], sum(old.A[:, j] for j in range(N)) / N)
            torch.testing.assert_close(new.B[:, i], sum(old.B[:, j] for j in range(N)) / N)
    torch.testing.assert_close(new_extras["head.weight"][2], extras["head.weight"].sum(0) / N)


@pytest.mark.parametrize("W", [ring_W(), lopsided_W()], ids=["ring", "lopsided"])
def test_dlora_mixes_each_factor_with_W(W):
    groups, extras = make_state()
    new_groups, new_extras = get_strategy("dlora").communicate(groups, extras, W)
    for old, new in zip(groups, new_groups):
        assert new.names == old.names
        torch.testing.assert_close(new.A, hand_mix(W, old.A, 1))
        torch.testing.assert_close(new.B, hand_mix(W, old.B, 1))
    torch.testing.assert_close(new_extras["head.weight"], hand_mix(W, extras["head.weight"], 0))


def test_dlora_fa_mixes_B_and_keeps_the_shared_A():
    groups, extras = make_state()
    groups = [FactorGroup(g.names, g.A[:, :1].expand_as(g.A).clone(), g.B) for g in groups]
    W = lopsided_W()
    new_groups, new_extras = get_strategy("dlora_fa").communicate(groups, extras, W)
    for old, new in zip(groups, new_groups):
        assert torch.equal(new.A, old.A)
        torch.testing.assert_close(new.B, hand_mix(W, old.B, 1))
    torch.testing.assert_close(new_extras["head.weight"], hand_mix(W, extras["head.weight"], 0))
    with pytest.raises(ValueError, match="share_and_freeze_A"):
        get_strategy("dlora_fa").communicate(make_state()[0], extras, W)


@pytest.mark.parametrize("name", ["dlora", "dlora_fa"])
def test_doubly_stochastic_mixing_keeps_the_mean_of_B(name):
    groups, extras = make_state()
    groups = [FactorGroup(g.names, g.A[:, :1].expand_as(g.A).clone(), g.B) for g in groups]
    W = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.5, 0.25, 0.25, 0.0], [0.0, 0.25, 0.5, 0.25], [0.0, 0.0, 0.25, 0.75]],
                     dtype=torch.float64)
    new_groups, new_extras = get_strategy(name).communicate(groups, extras, W)
    for old, new in zip(groups, new_groups):
        torch.testing.assert_close(new.B.mean(1), old.B.mean(1))
        assert not torch.allclose(new.B, old.B)
    torch.testing.assert_close(new_extras["head.weight"].mean(0), extras["head.weight"].mean(0))


@pytest.mark.parametrize("name", STRATEGIES)
def test_communicate_leaves_its_inputs_untouched(name):
    groups, extras = make_state()
    if name == "dlora_fa":
        groups = [FactorGroup(g.names, g.A[:, :1].expand_as(g.A).clone(), g.B) for g in groups]
    saved = [(g.A.clone(), g.B.clone()) for g in groups], {k: x.clone() for k, x in extras.items()}
    get_strategy(name).communicate(groups, extras, ring_W())
    assert all(torch.equal(g.A, A) and torch.equal(g.B, B) for g, (A, B) in zip(groups, saved[0]))
    assert all(torch.equal(extras[k], x) for k, x in saved[1].items())


def test_bytes_sent_on_a_ring_of_four():
    g = torch.Generator().manual_seed(0)
    groups = [FactorGroup(["q", "v"], torch.randn(2, N, 3, 5, generator=g), torch.randn(2, N, 6, 3, generator=g)),
              FactorGroup(["ffn"], torch.randn(1, N, 3, 7, generator=g).half(),
                          torch.randn(1, N, 4, 3, generator=g).half())]
    extras = {"head.weight": torch.randn(N, 3, 2, generator=g, dtype=torch.float64)}
    a_bytes = 2 * 3 * 5 * 4 + 1 * 3 * 7 * 2       # float32 group + float16 group, one agent
    b_bytes = 2 * 6 * 3 * 4 + 1 * 4 * 3 * 2
    extra_bytes = 3 * 2 * 8
    expected = {
        "local": 0,
        "fedavg": a_bytes + b_bytes + extra_bytes,           # one upload to the server
        "dlora": 2 * (a_bytes + b_bytes + extra_bytes),      # two ring neighbours
        "decaf": 2 * (a_bytes + b_bytes + extra_bytes),
        "dlora_fa": 2 * (b_bytes + extra_bytes),
    }
    for name, per_agent in expected.items():
        sent = get_strategy(name).bytes_sent(groups, extras, ring_W())
        assert sent.dtype == torch.int64
        assert sent.tolist() == [per_agent] * N, name


def test_bytes_sent_counts_neighbours_per_agent():
    groups, extras = make_state(torch.float32)
    star = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.25, 0.75, 0, 0], [0.25, 0, 0.75, 0], [0.25, 0, 0, 0.75]],
                        dtype=torch.float64)
    message = get_strategy("dlora").bytes_sent(groups, extras, ring_W())[0].item() // 2
    assert get_strategy("dlora").bytes_sent(groups, extras, star).tolist() == [3 * message] + [message] * 3


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-4)], ids=["float64", "float32"])
def test_decaf_on_a_complete_graph_is_the_tsvd_of_the_global_mean(dtype, tol):
    groups, extras = make_state(dtype)
    new_groups, new_extras = get_strategy("decaf").communicate(groups, extras, complete_W())
    for old, new in zip(groups, new_groups):
        assert new.names == old.names and new.A.shape == old.A.shape and new.B.shape == old.B.shape
        assert new.A.dtype == dtype
        for k in range(len(old.names)):
            target = truncated_product(sum(old.B[k, j].double() @ old.A[k, j].double() for j in range(N)) / N, 3)
            for i in range(N):
                torch.testing.assert_close((new.B[k, i] @ new.A[k, i]).double(), target, rtol=tol, atol=tol)
    assert consensus_error(new_groups) < tol
    torch.testing.assert_close(new_extras["head.weight"], extras["head.weight"].mean(0).expand(N, 3, 2))


@pytest.mark.parametrize("W", [ring_W(), lopsided_W()], ids=["ring", "lopsided"])
def test_decaf_is_the_tsvd_of_each_neighbourhood_mix(W):
    groups, extras = make_state()
    new_groups, new_extras = get_strategy("decaf").communicate(groups, extras, W)
    for old, new in zip(groups, new_groups):
        for k in range(len(old.names)):
            for i in range(N):
                mix = sum(W[i, j] * old.B[k, j] @ old.A[k, j] for j in range(N))
                torch.testing.assert_close(new.B[k, i] @ new.A[k, i], truncated_product(mix, 3))
    torch.testing.assert_close(new_extras["head.weight"], hand_mix(W, extras["head.weight"], 0))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", STRATEGIES)
def test_cuda_factors_match_cpu(name):
    groups, extras = make_state(torch.float32)
    if name == "dlora_fa":
        groups = [FactorGroup(g.names, g.A[:, :1].expand_as(g.A).clone(), g.B) for g in groups]
    on_cuda = [FactorGroup(g.names, g.A.cuda(), g.B.cuda()) for g in groups]
    strategy = get_strategy(name)
    cpu_groups, cpu_extras = strategy.communicate(groups, extras, ring_W())
    cuda_groups, cuda_extras = strategy.communicate(on_cuda, {k: x.cuda() for k, x in extras.items()}, ring_W())
    for cpu, cuda in zip(cpu_groups, cuda_groups):
        assert cuda.A.is_cuda and cuda.B.is_cuda
        torch.testing.assert_close((cuda.B @ cuda.A).cpu(), cpu.B @ cpu.A, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cuda_extras["head.weight"].cpu(), cpu_extras["head.weight"])
    assert strategy.bytes_sent(on_cuda, extras, ring_W().cuda()).tolist() == strategy.bytes_sent(
        groups, extras, ring_W()).tolist()


def test_a_strategy_registered_from_user_code():
    assert USER_STRATEGY in strategy_names() and USER_STRATEGY not in STRATEGIES
    assert strategy_options(USER_STRATEGY) == ("step",)
    strategy = get_strategy(USER_STRATEGY, step=0.25)
    assert isinstance(strategy, DampedDLoRA) and strategy.name == USER_STRATEGY
    groups, extras = make_state()
    new_groups, new_extras = strategy.communicate(groups, extras, ring_W())
    for old, new in zip(groups, new_groups):
        torch.testing.assert_close(new.A, 0.75 * old.A + 0.25 * hand_mix(ring_W(), old.A, 1))
    torch.testing.assert_close(new_extras["head.weight"],
                               0.75 * extras["head.weight"] + 0.25 * hand_mix(ring_W(), extras["head.weight"], 0))
    with pytest.raises(ValueError, match="not a Strategy subclass"):
        register_strategy("broken")(object)
    assert "broken" not in strategy_names()


@pytest.mark.parametrize("name", STRATEGIES)
def test_consensus_is_one_agent_standing_for_all(name):
    """The averaged model: decaf the TSVD of the mean product, the others the plain means."""
    groups, extras = make_state()
    strategy = get_strategy(name)
    if not strategy.trains_A:
        groups = [FactorGroup(g.names, g.A[:, :1].expand_as(g.A).clone(), g.B) for g in groups]
    consensus_groups, consensus_extras = strategy.consensus(groups, extras)
    torch.testing.assert_close(consensus_extras["head.weight"], extras["head.weight"].mean(0, keepdim=True))
    for old, new in zip(groups, consensus_groups):
        assert new.A.shape[1] == new.B.shape[1] == 1
        if name == "decaf":
            mean = (old.B @ old.A).mean(1)
            for k in range(len(old.names)):
                torch.testing.assert_close(new.B[k, 0] @ new.A[k, 0], truncated_product(mean[k], 3))
        else:
            torch.testing.assert_close(new.B[:, 0], old.B.mean(1))


def test_decaf_options_come_from_the_config(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("algorithm: decaf\ndecaf_method: randomized\ndecaf_n_iter: 4\ndecaf_seed: 7\n")
    strategy = build_config(str(path), {"decaf_split": "left", "decaf_oversample": "3"}).strategy()
    assert (strategy.method, strategy.n_iter, strategy.seed, strategy.split, strategy.oversample) == (
        "randomized", 4, 7, "left", 3)
    for field, value in (("decaf_method", "svd"), ("decaf_split", "up"), ("decaf_n_iter", -1)):
        with pytest.raises(ConfigError, match=f"^{field} ") as error:
            build_config(None, {field: value})
        assert "\n" not in str(error.value)
    assert TrainConfig(algorithm="dlora", decaf_method="randomized").strategy().name == "dlora"
