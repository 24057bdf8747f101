"""decaf_ext.lora.factors: stacking peft LoRA factors and extras of several agents, and writing them back."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import BertConfig, BertForSequenceClassification

from decaf_ext.lora import (
    FactorGroup,
    collect_extras,
    collect_factors,
    consensus_error,
    consensus_interference,
    share_and_freeze_A,
    write_extras,
    write_factors,
)

N_AGENTS = 3


def tiny_peft_bert(seed: int, target_modules: tuple[str, ...] = ("query", "value")) -> torch.nn.Module:
    """A random 2-layer BERT classifier with LoRA r=4; B randomized so that every factor is nonzero."""
    torch.manual_seed(seed)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        vocab_size=100)
    model = get_peft_model(BertForSequenceClassification(config),
                           LoraConfig(r=4, lora_alpha=8, target_modules=list(target_modules), task_type="SEQ_CLS"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_()
    return model


@pytest.fixture
def models() -> list[torch.nn.Module]:
    return [tiny_peft_bert(seed) for seed in range(N_AGENTS)]


def lora_weight(model: torch.nn.Module, module_name: str, factor: str) -> torch.Tensor:
    return getattr(model.get_submodule(module_name), factor)["default"].weight


def test_collect_matches_model_weights(models):
    (group,) = collect_factors(models)
    assert group.names == [f"base_model.model.bert.encoder.layer.{layer}.attention.self.{proj}"
                           for layer in range(2) for proj in ("query", "value")]
    assert group.A.shape == (4, N_AGENTS, 4, 32) and group.B.shape == (4, N_AGENTS, 32, 4)
    for k, name in enumerate(group.names):
        for i, model in enumerate(models):
            assert torch.equal(group.A[k, i], lora_weight(model, name, "lora_A"))
            assert torch.equal(group.B[k, i], lora_weight(model, name, "lora_B"))
    assert not group.A.requires_grad and group.n_agents == N_AGENTS and group.rank == 4


def test_collect_write_round_trip_is_bitwise(models):
    before = collect_factors(models)
    scrambled = [FactorGroup(g.names, torch.randn_like(g.A), torch.randn_like(g.B)) for g in before]
    write_factors(models, scrambled)
    assert torch.equal(collect_factors(models)[0].A, scrambled[0].A)
    write_factors(models, before)
    after = collect_factors(models)
    assert torch.equal(after[0].A, before[0].A) and torch.equal(after[0].B, before[0].B)


def test_collect_returns_a_snapshot(models):
    (group,) = collect_factors(models)
    saved = group.A.clone()
    with torch.no_grad():
        lora_weight(models[0], group.names[0], "lora_A").add_(1.0)
    assert torch.equal(group.A, saved)


def test_modules_are_grouped_by_shape():
    models = [tiny_peft_bert(seed, ("query", "value", "intermediate.dense")) for seed in range(2)]
    groups = collect_factors(models)
    assert [len(g.names) for g in groups] == [4, 2]
    assert groups[1].names == [f"base_model.model.bert.encoder.layer.{layer}.intermediate.dense" for layer in range(2)]
    assert groups[0].A.shape == (4, 2, 4, 32) and groups[0].B.shape == (4, 2, 32, 4)
    assert groups[1].A.shape == (2, 2, 4, 32) and groups[1].B.shape == (2, 2, 64, 4)


def test_extras_hold_the_head_and_no_lora_or_frozen_weight(models):
    extras = collect_extras(models)
    assert sorted(extras) == ["base_model.model.classifier.modules_to_save.default.bias",
                              "base_model.model.classifier.modules_to_save.default.weight"]
    trainable = {n for n, p in models[0].named_parameters() if p.requires_grad}
    factors = {n for n in trainable if ".lora_A." in n or ".lora_B." in n}
    assert factors and set(extras) == trainable - factors
    weight = extras["base_model.model.classifier.modules_to_save.default.weight"]
    assert weight.shape == (N_AGENTS, 2, 32)
    for i, model in enumerate(models):
        assert torch.equal(weight[i], model.get_submodule("base_model.model.classifier.modules_to_save.default").weight)


def test_extras_round_trip_is_bitwise(models):
    before = collect_extras(models)
    write_extras(models, {k: torch.randn_like(x) for k, x in before.items()})
    assert not torch.equal(collect_extras(models)["base_model.model.classifier.modules_to_save.default.bias"],
                           before["base_model.model.classifier.modules_to_save.default.bias"])
    write_extras(models, before)
    after = collect_extras(models)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_write_extras_rejects_unknown_names_and_shapes(models):
    extras = collect_extras(models)
    with pytest.raises(ValueError, match="extras"):
        write_extras(models, {"nope": torch.zeros(N_AGENTS)})
    name = next(iter(extras))
    with pytest.raises(ValueError, match="extras"):
        write_extras(models, {name: extras[name][:2]})


def test_share_and_freeze_A(models):
    share_and_freeze_A(models, seed=7)
    (group,) = collect_factors(models)
    assert torch.equal(group.A, group.A[:, :1].expand_as(group.A))
    assert not torch.equal(group.A[0, 0], group.A[1, 0])
    assert group.A.abs().max() <= 1 / math.sqrt(32)  # peft's Kaiming-uniform bound, a = sqrt(5)
    assert all(not lora_weight(m, name, "lora_A").requires_grad for m in models for name in group.names)
    assert all(lora_weight(m, name, "lora_B").requires_grad for m in models for name in group.names)
    assert all(".lora_A." not in name for name in collect_extras(models))

    others = [tiny_peft_bert(seed) for seed in range(10, 12)]
    share_and_freeze_A(others, seed=7)
    assert torch.equal(collect_factors(others)[0].A[:, 0], group.A[:, 0])
    share_and_freeze_A(others, seed=8)
    assert not torch.equal(collect_factors(others)[0].A[:, 0], group.A[:, 0])


def test_mismatched_models_and_adapters_are_rejected(models):
    with pytest.raises(ValueError, match="agent 1"):
        collect_factors([models[0], tiny_peft_bert(0, ("query",))])
    with pytest.raises(ValueError, match="adapter_name"):
        collect_factors(models, adapter_name="other")
    with pytest.raises(ValueError, match="models"):
        collect_factors([])
    groups = collect_factors(models)
    with pytest.raises(ValueError, match="groups"):
        write_factors(models[:2], groups)


def test_consensus_error_by_hand():
    A = torch.ones(1, 2, 1, 1)
    assert consensus_error([FactorGroup(["m"], A, torch.tensor([1.0, 3.0]).reshape(1, 2, 1, 1))]) == pytest.approx(0.5)
    # mean product is zero -> the module counts 0
    assert consensus_error([FactorGroup(["m"], A, torch.tensor([1.0, -1.0]).reshape(1, 2, 1, 1))]) == 0.0


def test_consensus_error_zero_for_identical_agents_and_positive_otherwise(models):
    groups = collect_factors(models)
    assert consensus_error(groups) > 0
    same = [FactorGroup(g.names, g.A[:, :1].expand_as(g.A), g.B[:, :1].expand_as(g.B)) for g in groups]
    assert consensus_error(same) == 0.0


def test_consensus_interference_by_hand():
    # two agents, one 1x1 module: mean B_i A_i = (3 + 3) / 2 = 3, mean B * mean A = 2 * 2 = 4 -> |3 - 4| / 3
    A = torch.tensor([1.0, 3.0]).reshape(1, 2, 1, 1)
    B = torch.tensor([3.0, 1.0]).reshape(1, 2, 1, 1)
    assert consensus_interference([FactorGroup(["m"], A, B)]) == pytest.approx(1 / 3)
    # summed over modules and groups; a module whose mean product is zero counts 0
    zero = FactorGroup(["z"], A, torch.tensor([3.0, -1.0]).reshape(1, 2, 1, 1))
    assert consensus_interference([FactorGroup(["m", "k"], A.repeat(2, 1, 1, 1), B.repeat(2, 1, 1, 1)), zero]) \
        == pytest.approx(2 / 3)


def test_consensus_interference_vanishes_with_a_shared_factor_but_not_across_gauges(models):
    groups = collect_factors(models)
    shared_A = [FactorGroup(g.names, g.A[:, :1].expand_as(g.A), g.B) for g in groups]
    assert consensus_interference(shared_A) == pytest.approx(0.0, abs=1e-12)
    # identical products in different gauges (B_i R_i, R_i^-1 A_i): no consensus error, yet interference
    torch.manual_seed(0)
    same = []
    for g in groups:
        R = torch.eye(g.rank, dtype=torch.float64) + 0.5 * torch.randn(g.n_agents, g.rank, g.rank,
                                                                        dtype=torch.float64)
        A0, B0 = g.A[:, :1].double(), g.B[:, :1].double()
        same.append(FactorGroup(g.names, torch.linalg.solve(R, A0), B0 @ R))
    assert consensus_error(same) < 1e-9
    assert consensus_interference(same) > 0.1


@pytest.mark.parametrize("M,N,r,m,n", [(3, 5, 4, 30, 20), (2, 10, 8, 6, 40), (1, 3, 2, 2, 2), (2, 4, 3, 50, 5)])
def test_metrics_match_their_dense_float64_definitions(M, N, r, m, n):
    """consensus_error / consensus_interference work on small cores; the definitions on dense products."""
    g = torch.Generator().manual_seed(M * N + m)
    groups = [FactorGroup(["x"] * M, torch.randn(M, N, r, n, generator=g), torch.randn(M, N, m, r, generator=g))]
    A, B = groups[0].A.double(), groups[0].B.double()
    products = B @ A
    mean = products.mean(dim=1)
    error = (torch.linalg.matrix_norm(products - mean[:, None]).mean(dim=1) / torch.linalg.matrix_norm(mean)).sum()
    interference = (torch.linalg.matrix_norm(mean - B.mean(dim=1) @ A.mean(dim=1))
                    / torch.linalg.matrix_norm(mean)).sum()
    assert consensus_error(groups) == pytest.approx(error.item(), rel=1e-10)
    assert consensus_interference(groups) == pytest.approx(interference.item(), rel=1e-10)


@pytest.mark.parametrize("chunk", [1, 1 << 25])  # one module at a time, every module at once
def test_product_norms_and_distances_equal_the_formed_products_in_float64(monkeypatch, chunk):
    from decaf_ext.lora import metrics
    monkeypatch.setattr(metrics, "CHUNK_BYTES", chunk)
    g = torch.Generator().manual_seed(0)
    left, right = ([FactorGroup(["a", "b", "c"], torch.randn(3, N_AGENTS, 2, 5, generator=g),
                                torch.randn(3, N_AGENTS, 4, 2, generator=g))] for _ in range(2))
    products = [(group.B.double() @ group.A.double()) for group in (left[0], right[0])]
    expected_norm = products[0].pow(2).sum(dim=(0, 2, 3)).sqrt()
    expected_distance = (products[0] - products[1]).pow(2).sum(dim=(0, 2, 3)).sqrt()
    torch.testing.assert_close(metrics.product_norm(left), expected_norm, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(metrics.product_distance(left, right), expected_distance, rtol=1e-12, atol=1e-12)
