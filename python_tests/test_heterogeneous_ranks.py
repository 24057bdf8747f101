"""Agents with unequal LoRA ranks: the rank spec, RankPadding (zero-padding with alpha / r folded in), every
strategy checked on the products the agents end up applying, and whole runs (export, resume)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForSequenceClassification

from decaf_ext.cli.commands import main
from decaf_ext.config import TrainConfig, convert_value
from decaf_ext.errors import ConfigError
from decaf_ext.lora import RankPadding, collect_extras, collect_factors, lora_modules, share_and_freeze_A, \
    write_factors
from decaf_ext.comm.layout import MessageLayout
from decaf_ext.strategies import STRATEGIES, get_strategy
from decaf_ext.topology import make_schedule
from decaf_ext.sim.trainer import Trainer
from test_strategies import truncated_product
from test_trainer import make_tiny_dataset, make_tiny_model, tiny_config, without_times

RANKS = [2, 4, 8, 4]
ALPHA = 8.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("tiny")
    return make_tiny_model(root / "model"), make_tiny_dataset(root / "data")


def agents(model_dir: str, ranks: list[int], seed: int = 0) -> list[torch.nn.Module]:
    """One peft model per rank (LoRA on query/value, alpha 8), B drawn nonzero so every product is nonzero."""
    models = []
    for i, r in enumerate(ranks):
        torch.manual_seed(seed + i)
        base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=3)
        model = get_peft_model(base, LoraConfig(r=r, lora_alpha=ALPHA, target_modules=["query", "value"]))
        for module in lora_modules(model, "default"):
            torch.nn.init.normal_(module.lora_b.weight, std=0.1)
        models.append(model)
    return models


def products(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The update s * B @ A each adapted module applies, float64, by module name."""
    return {m.name: m.scale * m.lora_b.weight.double() @ m.lora_a.weight.double()
            for m in lora_modules(model, "default")}


# ------------------------------------------------------------------------------------------------ the spec


@pytest.mark.parametrize("spec,expected", [
    (8, [8] * 4), ("8", [8] * 4), ("2,4,8,16", [2, 4, 8, 16]), ("cycle:2,16", [2, 16, 2, 16]),
    ([2, 4, 4, 2], [2, 4, 4, 2]), ("cycle:3", [3] * 4),
])
def test_rank_spec(spec, expected):
    assert TrainConfig(agents=4, rank=convert_value("rank", spec)).agent_ranks() == expected


@pytest.mark.parametrize("spec,message", [
    ("2,4", "rank: 2 ranks listed for 4 agents"), ("four", "rank must be an integer"),
    ("ladder:2,4", "rank: unknown rule 'ladder'"), ("0", "rank must be >= 1"), ("2,0,2,2", "rank must be >= 1"),
    ("cycle:", "rank must be an integer"),
])
def test_bad_rank_specs_name_rank(spec, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(agents=4, rank=convert_value("rank", spec)).validate()


def test_a_rank_above_a_module_is_refused_naming_the_agent(tiny, tmp_path, capsys):
    model, data = tiny
    code = main(["--model", model, "--dataset", data, "--agents", "4", "--rank", "cycle:2,64", "--max-len", "16",
                 "--rounds", "1", "--device", "cpu", "--output-dir", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "rank: 64 (agent 1) exceeds min(in, out) = 32" in err[0]


def test_command_line_run_with_a_rank_per_agent(tiny, tmp_path, capsys):
    model, data = tiny
    code = main(["--model", model, "--dataset", data, "--agents", "4", "--rank", "2,4,4,4", "--max-len", "16",
                 "--rounds", "1", "--local-steps", "1", "--device", "cpu", "--output-dir", str(tmp_path / "run"),
                 "--no-progress"])
    assert code == 0
    counts = json.loads((tmp_path / "run" / "summary.json").read_text())["trainable_params_per_agent"]
    assert counts[0] < counts[1] == counts[2] == counts[3]
    assert f"; {counts[0]:,}-{counts[1]:,} trainable parameters per agent;" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- the glue


def test_padding_folds_each_agents_scale_into_padded_factors(tiny):
    models = agents(tiny[0], RANKS)
    padding = RankPadding(max(RANKS))
    groups = collect_factors(models, padding=padding)
    assert [g.rank for g in groups] == [8] and groups[0].n_agents == len(RANKS)
    (group,) = groups
    for i, (model, r) in enumerate(zip(models, RANKS)):
        assert not group.A[:, i, r:].any() and not group.B[:, i, :, r:].any()
        expected = products(model)
        for k, name in enumerate(group.names):  # the stacked product is the update the agent applies
            torch.testing.assert_close(group.B[k, i].double() @ group.A[k, i].double(), expected[name])
    before = [products(m) for m in models]
    write_factors(models, groups, padding=padding)
    for model, expected in zip(models, before):
        for name, product in products(model).items():
            torch.testing.assert_close(product, expected[name], rtol=1e-5, atol=1e-7)  # float32 round trip
    raw = RankPadding(max(RANKS), scaled=False)  # checkpoints: padding only, an exact round trip
    weights = [[m.lora_a.weight.clone() for m in lora_modules(model, "default")] for model in models]
    write_factors(models, collect_factors(models, padding=raw), padding=raw)
    for model, saved in zip(models, weights):
        for module, weight in zip(lora_modules(model, "default"), saved):
            assert torch.equal(module.lora_a.weight, weight)


def test_padding_refuses_a_rank_above_it(tiny):
    with pytest.raises(ValueError, match="agent 1's LoRA module .* rank 8 > the padded rank 4"):
        collect_factors(agents(tiny[0], [2, 8]), padding=RankPadding(4))


def ring(n: int) -> torch.Tensor:
    return make_schedule("ring", n).at(0).double()


def test_decaf_truncates_the_consensus_of_scaled_products_to_each_agents_rank(tiny):
    """M_i = sum_j W_ij s_j B_j A_j; agent i's new update s_i B_i A_i is M_i's best rank-r_i approximation."""
    models = agents(tiny[0], RANKS)
    W = ring(len(RANKS))
    before = [products(m) for m in models]
    padding = RankPadding(max(RANKS))
    groups, _ = get_strategy("decaf", method="exact").communicate(collect_factors(models, padding=padding), {}, W)
    write_factors(models, groups, padding=padding)
    for i, (model, r) in enumerate(zip(models, RANKS)):
        for name, product in products(model).items():
            M = sum(W[i, j] * before[j][name] for j in range(len(models)))
            torch.testing.assert_close(product, truncated_product(M, r), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("algorithm", ["dlora", "fedavg"])
def test_factor_averaging_pads_averages_and_truncates(tiny, algorithm):
    """DLoRA / FedAvg with unequal ranks (the baseline): average sqrt(s_j) B_j and sqrt(s_j) A_j zero-padded to
    the largest rank; agent i applies the leading r_i directions of that average."""
    models = agents(tiny[0], RANKS)
    W = ring(len(RANKS)) if algorithm == "dlora" else torch.full((4, 4), 0.25, dtype=torch.float64)
    padding = RankPadding(max(RANKS))
    (group,) = collect_factors(models, padding=padding)
    A, B = group.A.double(), group.B.double()
    groups, _ = get_strategy(algorithm).communicate(collect_factors(models, padding=padding), {}, W)
    write_factors(models, groups, padding=padding)
    for i, (model, r) in enumerate(zip(models, RANKS)):
        mixed_A, mixed_B = torch.einsum("j,kjrn->krn", W[i], A), torch.einsum("j,kjmr->kmr", W[i], B)
        for k, product in enumerate(products(model).values()):
            torch.testing.assert_close(product, mixed_B[k, :, :r] @ mixed_A[k, :r], rtol=1e-5, atol=1e-7)


def test_dlora_fa_shares_one_A_across_ranks_and_mixes_scaled_B(tiny):
    models = agents(tiny[0], RANKS)
    share_and_freeze_A(models, seed=3)
    widest = [m.lora_a.weight.clone() for m in lora_modules(models[2], "default")]  # the rank-8 agent
    for model, r in zip(models, RANKS):
        for module, shared in zip(lora_modules(model, "default"), widest):
            assert torch.equal(module.lora_a.weight, shared[:r]) and not module.lora_a.weight.requires_grad
    W = ring(len(RANKS))
    padding = RankPadding(max(RANKS), frozen_A=True)
    (group,) = collect_factors(models, padding=padding)
    (mixed,), _ = get_strategy("dlora_fa").communicate([group], {}, W)
    assert all(torch.equal(mixed.A[:, i], mixed.A[:, 2]) for i in range(len(RANKS)))  # the whole shared A
    write_factors(models, [mixed], padding=padding)
    for i, (model, r) in enumerate(zip(models, RANKS)):
        expected_B = torch.einsum("j,kjmr->kmr", W[i], group.B.double())[:, :, :r]
        for k, module in enumerate(lora_modules(model, "default")):
            assert torch.equal(module.lora_a.weight, widest[k][:r])
            torch.testing.assert_close(module.scale * module.lora_b.weight.double(), expected_B[k], rtol=1e-6,
                                       atol=1e-8)
    group.A[:, 1, 0, 0] += 1.0  # agents that disagree on a row both hold are refused
    with pytest.raises(ValueError, match="same A on every agent"):
        get_strategy("dlora_fa").communicate([group], {}, W)


# -------------------------------------------------------------------------------------------- messages


@pytest.mark.parametrize("message_dtype", ["float32", "int8"])
def test_each_agent_sends_only_its_own_rank(tiny, message_dtype):
    models = agents(tiny[0], RANKS)
    padding = RankPadding(max(RANKS))
    groups, extras = collect_factors(models, padding=padding), collect_extras(models)
    one = collect_factors(models[:1], padding=padding), collect_extras(models[:1])
    layout = MessageLayout(*one, trains_A=True, message_dtype=message_dtype, ranks=RANKS)
    equal = MessageLayout(*one, trains_A=True, message_dtype=message_dtype)
    assert layout.fingerprint != equal.fingerprint and layout.message_bytes == equal.message_bytes
    data = layout.pack_each(groups, extras)
    sizes = [layout.message_bytes_of(i) for i in range(len(RANKS))]
    assert sizes[0] < sizes[1] == sizes[3] < sizes[2] == layout.message_bytes
    per_direction = (sizes[1] - sizes[0]) / 2  # what one more rank direction of A and B costs
    entries = sum(g.A.shape[0] * (g.A.shape[-1] + g.B.shape[-2]) for g in groups)
    assert per_direction == entries * (4 if message_dtype == "float32" else 1) + (
        0 if message_dtype == "float32" else 4 * 2 * sum(g.A.shape[0] for g in groups))
    heard = layout.received(data)
    for i, r in enumerate(RANKS):
        wire = layout.encode(data[i], i)
        assert wire.numel() == layout.wire_numel_of(i) and wire.numel() * wire.element_size() == sizes[i]
        assert torch.equal(layout.decode(wire[None], i)[0], heard[i])
    if message_dtype == "float32":
        assert torch.equal(heard, data)  # the padding is zero: nothing is lost by not sending it
    else:
        torch.testing.assert_close(heard, data, rtol=0, atol=float(data.abs().max()) / 254 + 1e-7)
    with pytest.raises(ValueError, match="ranks"):
        MessageLayout(*one, trains_A=True, ranks=[2, 4])  # the largest rank must be the padded one


# -------------------------------------------------------------------------------------------- whole runs


@pytest.mark.parametrize("algorithm", STRATEGIES)
def test_runs_with_unequal_ranks_export_each_agent_at_its_rank(tiny, tmp_path, algorithm):
    trainer = Trainer(tiny_config(tiny, tmp_path / "run", algorithm=algorithm, rank="cycle:2,4"))
    summary = trainer.run()
    assert summary["trainable_params_per_agent"][0] < summary["trainable_params_per_agent"][1]
    adapters = Path(trainer.run_dir, "adapters")
    for i, r in enumerate([2, 4, 2, 4]):
        assert json.loads((adapters / f"agent_{i:02d}" / "adapter_config.json").read_text())["r"] == r
    base = AutoModelForSequenceClassification.from_pretrained(tiny[0], num_labels=3)
    loaded = PeftModel.from_pretrained(base, str(adapters / "agent_00"))
    for name, product in products(trainer.agents.models[0]).items():
        torch.testing.assert_close(products(loaded)[name], product)
    average = json.loads((adapters / "average" / "adapter_config.json").read_text())
    assert average["r"] == 4
    sizes = [trainer.agents.layout.message_bytes_of(i) for i in range(4)]
    per_round = {"local": 0, "fedavg": 4 * max(sizes)}.get(algorithm, 2 * sum(sizes))  # ring: 2 neighbours each
    assert summary["final"]["bytes_sent"] == per_round * trainer.config.rounds


def test_resume_with_unequal_ranks_matches_an_uninterrupted_run(tiny, tmp_path, monkeypatch):
    config = dict(algorithm="decaf", rank="2,4,4,2", rounds=3, checkpoint_every=1)
    straight = Trainer(tiny_config(tiny, tmp_path / "straight", **config))
    straight.run()
    crashing = Trainer(tiny_config(tiny, tmp_path / "resumed", **config))
    original = crashing.agents.local_round

    def crash_in_round_two(round_index: int) -> None:
        if round_index == 2:
            raise KeyboardInterrupt
        original(round_index)

    monkeypatch.setattr(crashing.agents, "local_round", crash_in_round_two)
    with pytest.raises(KeyboardInterrupt):
        crashing.run()
    resumed = Trainer(tiny_config(tiny, tmp_path / "resumed", **config))
    resumed.run(resume=True)
    assert without_times(resumed.history) == without_times(straight.history)
    for a, b in zip(resumed.agents.models, straight.agents.models):
        for x, y in zip(lora_modules(a, "default"), lora_modules(b, "default")):
            assert torch.equal(x.lora_a.weight, y.lora_a.weight) and torch.equal(x.lora_b.weight, y.lora_b.weight)
