"""The mechanism metrics: the mixing error of every strategy against dense float64 definitions, the effective rank
and top-k energy of each update against dense SVDs, and how both runtimes log them."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import ring_weights
from decaf_ext.lora import FactorGroup, mixing_error, mixing_residuals, update_spectrum
from decaf_ext.lora.spectrum import effective_rank, singular_values
from decaf_ext.sim.trainer import Trainer
from decaf_ext.strategies import get_strategy
from test_trainer import read_metrics, tiny_config, tiny_paths  # noqa: F401  (tiny_paths is a fixture)


def random_groups(n: int, r: int = 3, shapes=((7, 5), (6, 9)), seed: int = 0, modules: int = 2) -> list[FactorGroup]:
    """Random float32 factors: per (m, n) shape one group of `modules` modules (B nonzero, unlike a LoRA start)."""
    g = torch.Generator().manual_seed(seed)
    return [FactorGroup([f"g{k}.m{i}" for i in range(modules)], torch.randn(modules, n, r, cols, generator=g),
                        torch.randn(modules, n, rows, r, generator=g)) for k, (rows, cols) in enumerate(shapes)]


def products(group: FactorGroup) -> torch.Tensor:
    """float64 [M, N, m, n]: the dense B A of every module and agent."""
    return group.B.double() @ group.A.double()


def dense_mixing_error(inputs: list[FactorGroup], W: torch.Tensor, outputs: list[FactorGroup]) -> torch.Tensor:
    """The definition on dense float64 products: sqrt(sum_mod ||M_i - P_i||^2 / sum_mod ||M_i||^2)."""
    error = reference = 0
    for given, held in zip(inputs, outputs):
        M = torch.einsum("oj,mjab->moab", W.double(), products(given))
        error = error + (M - products(held)).square().sum(dim=(0, 2, 3))
        reference = reference + M.square().sum(dim=(0, 2, 3))
    return (error / reference).sqrt()


def test_mixing_error_matches_the_dense_definition_on_arbitrary_factors():
    inputs = random_groups(5)
    outputs = random_groups(3, r=2, seed=1)  # other agents count and another rank: any factors the agents hold
    W = torch.rand(3, 5, dtype=torch.float64)
    W /= W.sum(dim=1, keepdim=True)
    torch.testing.assert_close(mixing_error(inputs, W, outputs), dense_mixing_error(inputs, W, outputs),
                               rtol=1e-10, atol=0)
    error, reference = mixing_residuals(inputs, W, outputs)
    assert reference.shape == (3,) and bool((reference > 0).all())


@pytest.mark.parametrize("algorithm", ["dlora", "decaf", "fedavg", "dlora_fa"])
def test_mixing_error_of_each_strategy(algorithm):
    """Each strategy's error against its closed form: DLoRA's product of means, DeCAF's Eckart-Young tail, FedAvg's
    product of plain means, DLoRA-FA's exact consensus (A shared)."""
    n, r = 4, 2
    inputs = random_groups(n, r=r, shapes=((8, 6),))
    if algorithm == "dlora_fa":
        inputs = [FactorGroup(g.names, g.A[:, :1].expand_as(g.A).clone(), g.B) for g in inputs]
    W = ring_weights(n) if get_strategy(algorithm).decentralized else torch.full((n, n), 1.0 / n, dtype=torch.float64)
    strategy = get_strategy(algorithm, method="dense") if algorithm == "decaf" else get_strategy(algorithm)
    outputs, _ = strategy.communicate(inputs, {}, W)
    got = mixing_error(inputs, W, outputs)
    M = torch.einsum("oj,mjab->moab", W, products(inputs[0]))
    if algorithm == "decaf":  # the best rank-r approximation's error: the singular values beyond r
        sigma = torch.linalg.svdvals(M)
        expected = (sigma[..., r:].square().sum(dim=(0, -1)) / sigma.square().sum(dim=(0, -1))).sqrt()
    elif algorithm == "dlora_fa":
        expected = torch.zeros(n, dtype=torch.float64)
    else:
        B = torch.einsum("oj,mjab->moab", W, inputs[0].B.double())
        A = torch.einsum("oj,mjab->moab", W, inputs[0].A.double())
        expected = ((M - B @ A).square().sum(dim=(0, 2, 3)) / M.square().sum(dim=(0, 2, 3))).sqrt()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)  # outputs are float32
    if algorithm in ("dlora", "decaf"):
        assert bool((got > 0.05).all())  # four random rank-2 products: neither mixes them exactly


def test_mixing_error_of_zero_products_is_zero_and_of_nonzero_products_from_nothing_is_infinite():
    zero = [FactorGroup(["g0.m0"], torch.randn(1, 2, 2, 5), torch.zeros(1, 2, 4, 2))]  # LoRA's start: B = 0
    W = torch.full((2, 2), 0.5, dtype=torch.float64)
    assert mixing_error(zero, W, zero).tolist() == [0.0, 0.0]
    assert mixing_error(zero, W, random_groups(2, r=2, shapes=((4, 5),), modules=1)).tolist() == [math.inf] * 2


def test_mixing_error_refuses_mismatched_agents():
    with pytest.raises(ValueError, match="inputs/outputs"):
        mixing_residuals(random_groups(3), torch.eye(2, 3, dtype=torch.float64), random_groups(3))


def test_singular_values_and_spectrum_match_dense_svd():
    groups = random_groups(3, r=4)
    padded = [FactorGroup(g.names, torch.cat([g.A[:, :, :2], torch.zeros_like(g.A[:, :, 2:])], dim=2),
                          torch.cat([g.B[:, :, :, :2], torch.zeros_like(g.B[:, :, :, 2:])], dim=3)) for g in groups]
    for group in groups + padded:  # zero-padded to rank 4, of rank 2: two zero singular values
        dense = torch.linalg.svdvals(products(group))[..., :4]
        torch.testing.assert_close(singular_values(group), dense, rtol=1e-10, atol=1e-10)
    ranks, energy = update_spectrum(padded, top=1)
    sigmas = [torch.linalg.svdvals(products(g)) for g in padded]
    p = [s / s.sum(dim=-1, keepdim=True) for s in sigmas]
    entropy = [(-(q * q.clamp_min(1e-300).log()).sum(dim=-1)).exp() for q in p]  # [M, N] per group
    torch.testing.assert_close(ranks, torch.cat(entropy).mean(dim=0), rtol=1e-8, atol=1e-8)
    top = sum(s[..., :1].square().sum(dim=(0, 2)) for s in sigmas) / sum(s.square().sum(dim=(0, 2)) for s in sigmas)
    torch.testing.assert_close(energy, top, rtol=1e-10, atol=0)
    assert bool((ranks > 1).all() and (ranks <= 2 + 1e-9).all())


def test_effective_rank_by_hand():
    sigma = torch.tensor([[3.0, 3.0, 0.0], [5.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    assert effective_rank(sigma).tolist() == pytest.approx([2.0, 1.0, 0.0, 3.0])
    zero = [FactorGroup(["m"], torch.randn(1, 2, 2, 5), torch.zeros(1, 2, 4, 2))]
    ranks, energy = update_spectrum(zero, top=1)
    assert bool(ranks.isnan().all() and energy.isnan().all())  # B = 0: no update, no spectrum
    with pytest.raises(ValueError, match="top"):
        update_spectrum(zero, top=0)


@pytest.mark.parametrize("changes", [dict(algorithm="dlora"), dict(algorithm="fedavg", message_dtype="int8")])
def test_the_simulator_tallies_what_each_agent_mixed(tiny_paths, tmp_path, changes):
    """One round by hand: each agent's tally equals the mixing error of the factors before the round (decoded for
    the others' with lossy messages), the round's weights and the agents' factors after it."""
    trainer = Trainer(tiny_config(tiny_paths, tmp_path / "run", **changes))
    agents = trainer.agents
    agents.local_round(0)
    before = agents.collect(agents.models)
    trainer.communicate(0)
    after = agents.collect(agents.models)
    W = agents.schedule.at(0) if agents.strategy.decentralized else torch.full((4, 4), 0.25, dtype=torch.float64)
    expected = dense_mixing_error(before, W, after)
    tally = agents.counters["mixing"]
    assert [rounds for _, _, rounds in tally] == [1] * 4
    got = torch.tensor([math.sqrt(err / ref) for err, ref, _ in tally], dtype=torch.float64)
    if agents.layout.codec.lossless:
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)
        assert bool((got > 0).all())
    else:  # int8 messages: each agent mixed its own exact factors and the others' decoded, not `before`
        assert bool((got > 0).all()) and not torch.allclose(got, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("algorithm, message_dtype", [("local", "float32"), ("dlora_fa", "float32"),
                                                      ("dlora_fa", "int8"), ("decaf", "float32")])
def test_records_carry_the_mechanism(tiny_paths, tmp_path, algorithm, message_dtype):
    """With int8 messages each agent mixes what it decoded, and a dlora_fa receiver (which fills the senders' A from
    its own) still measures against their true products: the shared A's rows beyond its own rank included."""
    trainer = Trainer(tiny_config(tiny_paths, tmp_path / "run", algorithm=algorithm, rank="cycle:2,4",
                                  message_dtype=message_dtype))
    trainer.run()
    for record in read_metrics(trainer.run_dir):
        mixing, ranks, energy = (record[k] for k in ("mixing_error_agents", "effective_rank_agents",
                                                     "min_rank_energy_agents"))
        assert len(mixing) == len(ranks) == len(energy) == 4
        if algorithm == "local":  # nothing is mixed: absent, not 0
            assert mixing == [None] * 4 and record["mixing_error"] is None
        elif algorithm == "dlora_fa":  # A shared: B's mix is the products' mix (rank 4 agents, up to rounding),
            assert max(mixing[1::2]) < 1e-5  # but a rank-2 agent keeps only the mixed B's first 2 columns
            assert min(mixing[0::2]) > 0.01
        else:
            assert min(mixing) > 0 and record["mixing_error"] == pytest.approx(sum(mixing) / 4)
        assert all(0 < rank <= r + 1e-9 for rank, r in zip(ranks, [2, 4, 2, 4]))  # never above the agent's rank
        assert all(0 < e <= 1 + 1e-12 for e in energy)
        assert [e for e, r in zip(energy, [2, 4, 2, 4]) if r == 2] == pytest.approx([1.0, 1.0])  # top 2 of rank 2


def test_plot_of_the_mixing_error_draws_every_strategy(tiny_paths, tmp_path):
    from decaf_ext.cli.plot import plot_runs

    for algorithm in ("local", "decaf"):
        Trainer(tiny_config(tiny_paths, tmp_path / "cmp" / algorithm, algorithm=algorithm)).run()
    figure = plot_runs([str(tmp_path / "cmp")], str(tmp_path / "mixing.png"), metric="mixing_error")
    lines = {line.get_label(): list(line.get_ydata()) for line in figure.axes[0].get_lines()}
    assert lines["decaf ring (agents)"] == [r["mixing_error"] for r in read_metrics(str(tmp_path / "cmp" / "decaf"))]
    assert all(math.isnan(y) for y in lines["local ring (agents)"])  # nothing mixed: no point, not 0
