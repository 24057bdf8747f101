"""Byzantine-robust mixing (decaf_ext.robust, ``--robust``): the folded W against clipping written out in float64,
the per-round bound on how far a Byzantine neighbour moves an honest agent, the Gram distances, tau = inf, the
automatic tau, bad specs, and the runtimes (simulator, the agents' own rounds over gloo) with the rule on."""

from __future__ import annotations

import math

import pytest
import torch

import user_strategy
from attacker import Ring
from conftest import ring_weights
from faults import BYZANTINE_KINDS, ByzantineAgents, Faults, byzantine
from decaf_ext.cli.commands import main
from decaf_ext.comm.layout import MessageLayout
from decaf_ext.config import TrainConfig
from decaf_ext.errors import ConfigError
from decaf_ext.lora import FactorGroup, product_norm, select_agent
from decaf_ext.robust import ClippedGossip, automatic_tau, distances, fold, parse_robust, with_robust
from decaf_ext.sim.trainer import Trainer
from decaf_ext.strategies import get_strategy
from test_cli import tiny_flags
from test_trainer import tiny_config, tiny_paths  # noqa: F401  (tiny_paths is a fixture)

STRATEGIES = ("decaf", "dlora", "dlora_fa", "fedavg", "local", user_strategy.NAME)
MOVING = ("decaf", "dlora", "dlora_fa", "fedavg", user_strategy.NAME)  # the ones that send something


def make_agents(n: int, ranks: list[int] | None = None, *, spread: float = 1.0, seed: int = 0,
                shared_A: bool = False) -> tuple[list[FactorGroup], dict[str, torch.Tensor]]:
    """float64 factors of n agents: one group of two modules (A [2, n, r, 7], B [2, n, 6, r], r = max rank; agent
    j's directions beyond ranks[j] are zero) and a head [n, 3, 4]; agents = a common point + spread * noise."""
    g = torch.Generator().manual_seed(seed)
    ranks = ranks or [3] * n
    r = max(ranks)

    def near(*shape: int) -> torch.Tensor:
        common = torch.randn(*shape[:1], 1, *shape[2:], generator=g, dtype=torch.float64)
        return common + spread * torch.randn(*shape, generator=g, dtype=torch.float64)

    A, B = near(2, n, r, 7), near(2, n, 6, r)
    if shared_A:
        A = A[:, :1].expand_as(A).clone()
    for j, rank in enumerate(ranks):
        A[:, j, rank:] = 0
        B[:, j, :, rank:] = 0
    return [FactorGroup(["q", "v"], A, B)], {"head": near(n, 3, 4)}


def strategy_of(name: str):
    return get_strategy(name, method="exact") if name == "decaf" else get_strategy(name)


def dense(strategy, groups, extras) -> torch.Tensor:
    """float64 [N, D]: each agent's point in the strategy's space, written out (products formed)."""
    if strategy.mixes_products:
        parts = [torch.einsum("mjpr,mjrq->jmpq", g.B, g.A) for g in groups]
    else:
        parts = [t.movedim(1, 0) for g in groups for t in ((g.A, g.B) if strategy.trains_A else (g.B,))]
    parts += list(extras.values())
    return torch.cat([p.reshape(p.shape[0], -1).double() for p in parts], dim=1)


def dense_distances(strategy, groups, extras) -> torch.Tensor:
    x = dense(strategy, groups, extras)
    return (x[:, None] - x[None]).norm(dim=-1)


def coefficients(D: torch.Tensor, tau: float) -> torch.Tensor:
    return torch.where(D > tau, tau / D.clamp_min(1e-300), torch.ones_like(D))


def byzantine_agents(name: str, kind: str, n: int = 6, bad: tuple[int, ...] = (0,), ranks=None):
    """n agents of which `bad` send byzantine(kind) of their factors (float64, packed as a message would be)."""
    strategy = strategy_of(name)
    groups, extras = make_agents(n, ranks, spread=0.1, shared_A=not strategy.trains_A)
    layout = MessageLayout(*select_agent(groups, extras, 0), trains_A=strategy.trains_A)
    data = layout.pack_each(groups, extras)
    for j in bad:
        data[j] = byzantine(kind, data[j], layout)
    return strategy, layout.unpack(data, *select_agent(groups, extras, 0))


@pytest.mark.parametrize("ranks", [None, [1, 3, 2, 3, 1]], ids=["equal", "unequal"])
@pytest.mark.parametrize("products", [True, False], ids=["products", "factors"])
def test_gram_distances_equal_the_dense_distances(ranks, products):
    groups, extras = make_agents(5, ranks)
    strategy = get_strategy("decaf" if products else "dlora")
    got = distances(strategy, groups, extras, 5)
    torch.testing.assert_close(got, dense_distances(strategy, groups, extras), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(distances(strategy, groups, extras, 2), got[:2])


def test_product_distances_with_unequal_ranks_ignore_the_zero_padding():
    """Agent 1 holds rank 1 padded to 3: its distance is the one of its unpadded product, and padding every agent
    further changes nothing."""
    groups, extras = make_agents(3, [3, 1, 2])
    decaf = get_strategy("decaf")
    wider = [FactorGroup(g.names, torch.cat([g.A, torch.zeros_like(g.A[:, :, :2])], dim=2),
                         torch.cat([g.B, torch.zeros_like(g.B[:, :, :, :2])], dim=3)) for g in groups]
    torch.testing.assert_close(distances(decaf, wider, extras, 3), distances(decaf, groups, extras, 3))
    g = groups[0]
    own = g.B[:, 1, :, :1] @ g.A[:, 1, :1]
    expected = ((g.B[:, 0] @ g.A[:, 0] - own).square().sum() + (extras["head"][0] - extras["head"][1]).square().sum())
    torch.testing.assert_close(distances(decaf, groups, extras, 3)[0, 1], expected.sqrt())


@pytest.mark.parametrize("auto", [False, True], ids=["tau", "auto"])
@pytest.mark.parametrize("ranks", [None, [1, 3, 2, 3, 1, 2]], ids=["equal", "unequal"])
@pytest.mark.parametrize("name", MOVING)
def test_the_folded_W_equals_clipping_written_out(name, ranks, auto):
    """Every output agent's result equals ClippedGossip written out in float64: decaf: the rank-r truncated SVD of
    sum_j W_ij [(1 - c_ij) B_iA_i + c_ij B_jA_j] (products formed); the others: the strategy on every input
    pulled to within tau of the agent's own factors, x_i + c_ij (x_j - x_i) (a server strategy: uniform weights)."""
    strategy = strategy_of(name)
    if name == "dlora_fa" and ranks is not None:
        ranks = None  # dlora_fa's shared A has one rank; its unequal ranks sit in B (covered by the simulator)
    groups, extras = make_agents(6, ranks, shared_A=not strategy.trains_A)
    W = ring_weights(6)
    D = dense_distances(strategy, groups, extras)
    weights = W if strategy.decentralized else torch.ones_like(W)
    if auto:
        tau = automatic_tau(D, weights)
    else:
        tau = torch.full((6,), D[D > 0].median().item(), dtype=torch.float64)
    C = torch.stack([coefficients(D[i], tau[i].item()) for i in range(6)])
    assert 0 < int(((C < 1) & (weights > 0)).sum()) < int(((weights > 0) & (D > 0)).sum())  # some clipped, not all
    robust = ClippedGossip(strategy, None if auto else tau[0].item())
    got_groups, got_extras = robust.communicate(groups, extras, W)
    for i in range(6):
        if strategy.mixes_products:
            P = torch.einsum("mjpr,mjrq->mjpq", groups[0].B, groups[0].A)
            M = torch.einsum("j,mjpq->mpq", W[i] * C[i], P) + (W[i] * (1 - C[i])).sum() * P[:, i]
            U, S, Vh = torch.linalg.svd(M)
            r = groups[0].rank
            expected_product = U[..., :r] @ torch.diag_embed(S[..., :r]) @ Vh[..., :r, :]
            torch.testing.assert_close(got_groups[0].B[:, i] @ got_groups[0].A[:, i], expected_product)
            head = extras["head"]
            expected_head = torch.einsum("j,jab->ab", W[i] * C[i], head) + (W[i] * (1 - C[i])).sum() * head[i]
            torch.testing.assert_close(got_extras["head"][i], expected_head)
            continue
        pull = lambda x, dim: x.narrow(dim, i, 1) + C[i].reshape([-1 if d == dim else 1 for d in range(x.dim())]) * (
            x - x.narrow(dim, i, 1))
        pulled = [FactorGroup(g.names, pull(g.A, 1) if strategy.trains_A else g.A, pull(g.B, 1)) for g in groups]
        want_groups, want_extras = strategy.communicate(pulled, {k: pull(x, 0) for k, x in extras.items()}, W)
        torch.testing.assert_close(got_groups[0].A[:, i], want_groups[0].A[:, i])
        torch.testing.assert_close(got_groups[0].B[:, i], want_groups[0].B[:, i])
        torch.testing.assert_close(got_extras["head"][i], want_extras["head"][i])


def move(strategy, before, after, i: int) -> float:
    """||x_i' - x_i|| of agent i in the strategy's space."""
    return (dense(strategy, *select_agent(*after, i)) - dense(strategy, *select_agent(*before, i))).norm().item()


@pytest.mark.parametrize("kind", BYZANTINE_KINDS)
@pytest.mark.parametrize("name", MOVING)
def test_a_byzantine_neighbour_moves_an_honest_agent_at_most_tau_per_round(name, kind):
    """Agent 0 sends its factors x1e3, sign-flipped or random. Unclipped, it drags its neighbours far (the attack
    works); clipped, no honest agent moves more than tau * sum_{j != i} W_ij (fedavg: tau (N - 1) / N), decaf
    twice that (the truncation to rank r after the clipped mix)."""
    strategy, inputs = byzantine_agents(name, kind)
    W, tau = ring_weights(6), 0.05
    others = (1 - W.diagonal()) if strategy.decentralized else torch.full((6,), 5 / 6)
    bound = (2 if strategy.mixes_products else 1) * tau * others
    plain = strategy.communicate(*inputs, W)
    clipped = with_robust(strategy, f"clipped_gossip:{tau}").communicate(*inputs, W)
    for i in range(1, 6):
        assert move(strategy, inputs, clipped, i) <= bound[i] * (1 + 1e-9) + 1e-12
    victim = 1  # a ring neighbour of agent 0 (every agent hears it under a server strategy)
    assert move(strategy, inputs, plain, victim) > 20 * bound[victim]
    if strategy.mixes_products:  # before the truncation: ||M_i - B_iA_i|| <= tau sum_{j != i} W_ij itself
        robust = with_robust(strategy, f"clipped_gossip:{tau}")
        folded = fold(W, robust.coefficients(*inputs, W))
        x = dense(strategy, *inputs)
        for i in range(1, 6):
            assert (folded[i] @ x - x[i]).norm() <= tau * others[i] * (1 + 1e-9)


@pytest.mark.parametrize("name", ["decaf", "dlora"])
def test_the_automatic_tau_stays_at_the_honest_distances(name):
    """With the automatic tau (the weighted lower median of an agent's distances), a Byzantine neighbour holding
    half of an agent's weight on others sets no tau above the agent's largest honest distance."""
    strategy, inputs = byzantine_agents(name, "scale", n=6, bad=(0,))
    W = ring_weights(6)
    D = dense_distances(strategy, *inputs)
    tau = automatic_tau(D, W)
    after = with_robust(strategy, "clipped_gossip").communicate(*inputs, W)
    for i in range(1, 6):
        honest = [j for j in ((i - 1) % 6, (i + 1) % 6) if j != 0]
        assert tau[i] <= max(D[i, honest]) * (1 + 1e-12)
        bound = (2 if strategy.mixes_products else 1) * tau[i] * (1 - W[i, i])
        assert move(strategy, inputs, after, i) <= bound * (1 + 1e-9)


@pytest.mark.parametrize("name", ["decaf", "dlora", "fedavg"])
def test_robust_mixing_runs_where_the_factors_live(name, device):
    """Factors on `device` (W on the CPU, as the runtimes pass it): the same result as on the CPU."""
    strategy, inputs = byzantine_agents(name, "random")
    robust, W = with_robust(strategy, "clipped_gossip"), ring_weights(6)
    expected = robust.communicate(*inputs, W)
    moved = ([FactorGroup(g.names, g.A.to(device), g.B.to(device)) for g in inputs[0]],
             {k: x.to(device) for k, x in inputs[1].items()})
    got = robust.communicate(*moved, W)
    torch.testing.assert_close((got[0][0].B @ got[0][0].A).cpu(), expected[0][0].B @ expected[0][0].A)
    torch.testing.assert_close(got[1]["head"].cpu(), expected[1]["head"])


def test_a_strategy_cannot_be_clipped_twice_nor_a_server_strategy_in_product_space():
    with pytest.raises(ValueError, match="^robust: "):
        with_robust(with_robust(get_strategy("dlora"), "clipped_gossip"), "clipped_gossip")

    class ServerProducts(type(get_strategy("fedavg"))):
        mixes_products = True

    with pytest.raises(ValueError, match="^robust: .*server strategy"):
        with_robust(ServerProducts(), "clipped_gossip")


def test_automatic_tau_is_the_weighted_lower_median():
    D = torch.tensor([[0.0, 5.0, 1.0, 3.0]], dtype=torch.float64)
    assert automatic_tau(D, torch.tensor([[0.25, 0.25, 0.25, 0.25]])).item() == 3.0
    assert automatic_tau(D, torch.tensor([[0.5, 0.1, 0.1, 0.3]])).item() == 3.0
    assert automatic_tau(D, torch.tensor([[0.4, 0.3, 0.3, 0.0]])).item() == 1.0  # a tie at half: the lower
    assert automatic_tau(D, torch.tensor([[1.0, 0.0, 0.0, 0.0]])).item() == math.inf  # nobody heard


@pytest.mark.parametrize("name", STRATEGIES)
def test_infinite_tau_is_the_unclipped_strategy(name):
    strategy = strategy_of(name)
    groups, extras = make_agents(5, shared_A=not strategy.trains_A)
    W = ring_weights(5)
    expected = strategy.communicate(groups, extras, W)
    got = with_robust(strategy, "clipped_gossip:inf").communicate(groups, extras, W)
    for g, e in zip(got[0], expected[0]):
        assert torch.equal(g.A, e.A) and torch.equal(g.B, e.B)
    assert torch.equal(got[1]["head"], expected[1]["head"])


def test_the_row_form_of_one_agent_equals_its_row_of_the_full_round():
    """What an agent in its own process computes ([1, k] row, own first) is its row of the simulator's round."""
    strategy, inputs = byzantine_agents("dlora", "random")
    robust = with_robust(strategy, "clipped_gossip:0.05")
    W = ring_weights(6)
    full = robust.communicate(*inputs, W)
    heard = [2, 1, 3]
    row = robust.communicate(*select_agent_many(*inputs, heard), W[2, heard][None])
    torch.testing.assert_close(row[0][0].B[:, 0], full[0][0].B[:, 2])
    torch.testing.assert_close(row[1]["head"][0], full[1]["head"][2])


def select_agent_many(groups, extras, agents):
    return ([FactorGroup(g.names, g.A[:, agents], g.B[:, agents]) for g in groups],
            {k: x[agents] for k, x in extras.items()})


@pytest.mark.parametrize("spec", ["clipped_gossip:0", "clipped_gossip:-1", "clipped_gossip:nan", "clipped_gossip:x",
                                  "clipped_gossip:", "median", "krum:1"])
def test_bad_specs_are_one_line_naming_robust(spec):
    with pytest.raises(ValueError, match=r"^robust: "):
        parse_robust(spec)
    with pytest.raises(ConfigError, match=r"^robust: ") as error:
        TrainConfig(robust=spec).validate()
    assert "\n" not in str(error.value)


def test_good_specs_and_what_they_wrap():
    assert parse_robust("clipped_gossip").tau is None and parse_robust("clipped_gossip:0.5").tau == 0.5
    robust = TrainConfig(algorithm="dlora_fa", robust="clipped_gossip:2").strategy()
    assert isinstance(robust, ClippedGossip) and robust.name == "dlora_fa" and not robust.trains_A
    assert not isinstance(TrainConfig().strategy(), ClippedGossip)


def test_the_faults_harness_sends_byzantine_messages():
    groups, extras = make_agents(2)
    layout = MessageLayout(*select_agent(groups, extras, 0), trains_A=True)
    data = layout.pack(*select_agent(groups, extras, 0))
    faults = Faults.parse("0:flip@1,0:random@2,0:scale@3=1000", 0, restarted=False)
    faults.layout = layout
    seal = lambda sent: sent  # noqa: E731  (the key's tag is added by the real seal)
    assert torch.equal(faults.outgoing(0, data, seal), data)
    flipped = layout.unpack(faults.outgoing(1, data, seal)[None], *select_agent(groups, extras, 0))
    assert torch.equal(flipped[0][0].A[:, 0], groups[0].A[:, 0])
    assert torch.equal(flipped[0][0].B[:, 0], -groups[0].B[:, 0])
    assert torch.equal(flipped[1]["head"][0], -extras["head"][0])
    noise = faults.outgoing(2, data, seal)
    assert torch.equal(noise, faults.outgoing(2, data, seal)) and abs(noise.std().item() - 1) < 0.3
    assert torch.equal(faults.outgoing(3, data, seal), data * 1000)


@pytest.mark.parametrize("algorithm", ["decaf", "dlora"])
def test_over_gloo_a_keyed_byzantine_agent_moves_its_neighbours_at_most_tau(algorithm):
    """Six agents as threads over real gloo with the run key; agent 0 sends x1e3 factors with a valid tag. Clipped,
    every honest agent's product moves at most tau * 2/3 per round (decaf: twice that); unclipped, far more."""
    tau = 0.05
    groups, extras = make_agents(6, spread=0.1)
    groups = [FactorGroup(g.names, g.A.float(), g.B.float()) for g in groups]
    extras = {k: x.float() for k, x in extras.items()}
    strategy = get_strategy(algorithm)
    bound = (2 if strategy.mixes_products else 1) * tau * 2 / 3
    attack = {0: lambda comm, r, data, seal: seal(byzantine("scale", data, comm.layout))}
    moved = {}
    for robust in (None, f"clipped_gossip:{tau}"):
        ring = Ring(6, algorithm=algorithm, attackers=attack, factors=(groups, extras), robust=robust)
        try:
            ring.round()
            moved[robust] = [move(strategy, (groups, extras), (ring.groups, ring.extras), i) for i in range(1, 6)]
        finally:
            ring.close()
    assert max(moved[f"clipped_gossip:{tau}"]) <= bound * (1 + 1e-4)
    assert max(moved[None]) > 20 * bound


def test_byzantine_agents_keep_their_own_factors_in_the_simulator():
    strategy = get_strategy("dlora")
    groups, extras = make_agents(4)
    layout = MessageLayout(*select_agent(groups, extras, 0), trains_A=True)
    faulty = ByzantineAgents(strategy, [1], "flip", layout)
    got = faulty.communicate(groups, extras, ring_weights(4))
    assert torch.equal(got[0][0].A[:, 1], groups[0].A[:, 1])
    flipped = [FactorGroup(g.names, g.A, torch.cat([g.B[:, :1], -g.B[:, 1:2], g.B[:, 2:]], dim=1)) for g in groups]
    head = extras["head"].clone()
    head[1] = -head[1]
    expected = strategy.communicate(flipped, {"head": head}, ring_weights(4))
    torch.testing.assert_close(got[0][0].B[:, 0], expected[0][0].B[:, 0])


@pytest.mark.parametrize("spec", ["clipped_gossip:0", "clipped_gossip:-2", "clipped_gossip:two", "trimmed_mean"])
def test_a_bad_robust_flag_is_one_line_and_status_2_before_training(tiny_paths, tmp_path, capsys, spec):
    assert main(tiny_flags(tiny_paths, tmp_path / "run", "--robust", spec)) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("decaf-train: error: robust: ")
    assert "Traceback" not in captured.err + captured.out and not (tmp_path / "run").exists()


@pytest.mark.parametrize("algorithm, changes", [
    ("decaf", {"message_dtype": "int8", "rank": "2,4,4,2"}),
    ("dlora_fa", {"message_dtype": "bfloat16", "rank": "cycle:2,4"}),
])
def test_the_simulator_runs_robust_with_ranks_and_compressed_messages(tiny_paths, tmp_path, algorithm, changes):
    """--robust composes with unequal ranks and int8 / bfloat16 messages (each agent's own call on what it decodes)."""
    summary = Trainer(tiny_config(tiny_paths, tmp_path / "run", algorithm=algorithm, robust="clipped_gossip",
                                  **changes)).run()
    assert 0 <= summary["final"]["acc_mean"] <= 1 and math.isfinite(summary["final"]["consensus_error"])


def test_a_byzantine_agent_in_the_simulator_is_held_by_robust(tiny_paths, tmp_path):
    """The experiments' fault (ByzantineAgents: agent 0 sends its factors x1e3 every round): unclipped, the honest
    agents' LoRA products blow up; with --robust (automatic tau) they stay a thousand times smaller."""
    norms = {}
    for robust in (None, "clipped_gossip"):
        trainer = Trainer(tiny_config(tiny_paths, tmp_path / str(robust), algorithm="decaf", robust=robust))
        agents = trainer.agents
        agents.strategy = ByzantineAgents(agents.strategy, [0], "scale", agents.layout)
        trainer.run()
        norms[robust] = product_norm(agents.collect(agents.models[1:])).max().item()
    assert math.isfinite(norms["clipped_gossip"]) and norms[None] > 1000 * norms["clipped_gossip"]
