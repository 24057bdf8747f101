"""decaf_ext.sim.trainer on a tiny random BERT and a tiny synthetic text set built in the test (fast, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, BertConfig, BertModel, BertTokenizerFast

from decaf_ext.storage.checkpoint import latest_checkpoint
from decaf_ext.config import TrainConfig
from decaf_ext.errors import ConfigError
from decaf_ext.lora import collect_extras, collect_factors
from decaf_ext.strategies import STRATEGIES
from decaf_ext.tasks import classification_metrics
from decaf_ext.sim.trainer import Trainer

from conftest import files_of

CLASSES = {"animals": ["cat", "dog", "horse", "cow", "sheep", "goat"],
           "colors": ["red", "green", "blue", "yellow", "purple", "orange"],
           "food": ["bread", "rice", "apple", "cheese", "soup", "pasta"]}
FILLER = ["the", "a", "of", "and", "is", "was", "with", "near"]


def make_tiny_dataset(root: Path, per_class: int = 24, seed: int = 0) -> str:
    """Folder of <label>/NNN.txt: each text mixes 3-5 words of its class with 3-5 filler words."""
    rng = np.random.default_rng(seed)
    for label, words in CLASSES.items():
        (root / label).mkdir(parents=True)
        for k in range(per_class):
            tokens = list(rng.choice(words, rng.integers(3, 6))) + list(rng.choice(FILLER, rng.integers(3, 6)))
            (root / label / f"{k:03d}.txt").write_text(" ".join(rng.permutation(tokens)))
    return str(root)


def make_tiny_model(root: Path, seed: int = 0) -> str:
    """A random 2-layer BERT (hidden 32, 2 heads) with a WordPiece vocabulary of the tiny dataset's words."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *FILLER, *(w for ws in CLASSES.values() for w in ws)]
    root.mkdir(parents=True)
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(root / "vocab.txt")).save_pretrained(root)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32)
    BertModel(config).save_pretrained(root)
    return str(root)


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory) -> tuple[str, str]:
    """(model folder, dataset folder), built once per test session."""
    root = tmp_path_factory.mktemp("tiny")
    return make_tiny_model(root / "model"), make_tiny_dataset(root / "data")


def tiny_config(paths: tuple[str, str], output_dir: Path, **changes) -> TrainConfig:
    """A 2-round, 4-agent ring run on the tiny model and data (57 train / 15 test examples)."""
    model, data = paths
    values = dict(model=model, dataset=data, agents=4, rank=4, lora_alpha=8, max_len=16, max_train=None,
                  max_test=None, rounds=2, local_steps=2, batch_size=8, lr=1e-2, eval_every=1, dirichlet_alpha=1.0,
                  device="cpu", output_dir=str(output_dir), progress=False)
    return TrainConfig(**{**values, **changes})


def without_times(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if k != "time"} for record in history]


def read_metrics(run_dir: str) -> list[dict]:
    return [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("algorithm", STRATEGIES)
def test_every_algorithm_runs_and_logs(tiny_paths, tmp_path, algorithm):
    trainer = Trainer(tiny_config(tiny_paths, tmp_path / "run", algorithm=algorithm))
    summary = trainer.run()
    history = read_metrics(trainer.run_dir)
    assert [r["round"] for r in history] == [1, 2]
    for record in history:
        assert 0.0 <= record["acc_mean"] <= 1.0 and len(record["acc_agents"]) == 4
        assert record["acc_std"] == pytest.approx(np.std(record["acc_agents"]))
        assert np.isfinite(record["train_loss"]) and record["train_loss"] > 0
        assert set(record["time"]) == {"local", "comm", "eval"}
    assert summary["final"] == without_times(history)[-1]
    assert json.loads(Path(trainer.run_dir, "summary.json").read_text()) == summary
    # the bytes of one round: what strategy.bytes_sent counts on the final factors, per round (shapes are fixed)
    groups, extras = collect_factors(trainer.agents.models), collect_extras(trainer.agents.models)
    per_round = int(trainer.agents.strategy.bytes_sent(groups, extras, trainer.agents.schedule.at(0)).sum())
    assert [r["bytes_sent"] for r in history] == [per_round, 2 * per_round]
    assert (per_round == 0) == (algorithm == "local")


def test_fedavg_leaves_identical_agents_and_local_does_not(tiny_paths, tmp_path):
    fedavg = Trainer(tiny_config(tiny_paths, tmp_path / "fedavg", algorithm="fedavg"))
    final = fedavg.run()["final"]
    assert final["consensus_error"] == 0.0 and final["acc_std"] == pytest.approx(0.0, abs=1e-12)
    assert final["avg_model_acc"] == pytest.approx(final["acc_mean"], abs=1e-12)
    assert len(set(final["acc_agents"])) == 1
    local = Trainer(tiny_config(tiny_paths, tmp_path / "local", algorithm="local"))
    assert local.run()["final"]["consensus_error"] > 0.0


def test_mix_then_train_ends_on_local_steps(tiny_paths, tmp_path):
    trainer = Trainer(tiny_config(tiny_paths, tmp_path / "run", algorithm="fedavg", comm_order="mix_then_train"))
    assert trainer.run()["final"]["consensus_error"] > 0.0


def test_decaf_on_complete_graph_reaches_consensus(tiny_paths, tmp_path):
    trainer = Trainer(tiny_config(tiny_paths, tmp_path / "run", algorithm="decaf", topology="complete"))
    assert trainer.run()["final"]["consensus_error"] < 1e-5


def test_averaged_model_definitions(tiny_paths, tmp_path):
    """decaf: rank-r TSVD of the mean product; dlora: the plain mean of A and of B (float64 references)."""
    for algorithm in ("decaf", "dlora"):
        trainer = Trainer(tiny_config(tiny_paths, tmp_path / algorithm, algorithm=algorithm, rounds=1))
        trainer.run()
        (group,) = collect_factors(trainer.agents.models)
        (average,) = collect_factors([trainer.average_model()])
        extras, average_extras = collect_extras(trainer.agents.models), collect_extras([trainer.agents.scratch])
        for name, stacked in extras.items():
            torch.testing.assert_close(average_extras[name][0], stacked.double().mean(0).float())
        if algorithm == "dlora":
            torch.testing.assert_close(average.A[:, 0], group.A.double().mean(1).float())
            torch.testing.assert_close(average.B[:, 0], group.B.double().mean(1).float())
            continue
        mean_product = (group.B.double() @ group.A.double()).mean(1)
        U, S, Vh = torch.linalg.svd(mean_product)
        best = U[..., :4] @ torch.diag_embed(S[..., :4]) @ Vh[..., :4, :]
        got = average.B[:, 0].double() @ average.A[:, 0].double()
        torch.testing.assert_close(got, best, atol=1e-5, rtol=1e-4)


def test_identical_runs_are_bitwise_identical(tiny_paths, tmp_path):
    runs = []
    for name in ("a", "b"):
        trainer = Trainer(tiny_config(tiny_paths, tmp_path / name, algorithm="decaf"))
        trainer.run()
        runs.append((without_times(trainer.history), collect_factors(trainer.agents.models), collect_extras(trainer.agents.models)))
    (history_a, groups_a, extras_a), (history_b, groups_b, extras_b) = runs
    assert history_a == history_b
    assert all(torch.equal(a.A, b.A) and torch.equal(a.B, b.B) for a, b in zip(groups_a, groups_b))
    assert all(torch.equal(extras_a[k], extras_b[k]) for k in extras_a)


@pytest.mark.parametrize("algorithm", ["decaf", "dlora_fa"])
def test_resume_after_a_crash_matches_an_uninterrupted_run(tiny_paths, tmp_path, monkeypatch, algorithm):
    config = dict(algorithm=algorithm, rounds=4, eval_every=1, checkpoint_every=2)
    straight = Trainer(tiny_config(tiny_paths, tmp_path / "straight", **config))
    straight.run()

    crashing = Trainer(tiny_config(tiny_paths, tmp_path / "resumed", **config))
    calls = []

    def communicate_then_crash(round_index: int) -> None:
        calls.append(round_index)
        if round_index == 2:  # third round, after the round-2 checkpoint
            raise KeyboardInterrupt
        Trainer.communicate(crashing, round_index)

    monkeypatch.setattr(crashing, "communicate", communicate_then_crash)
    with pytest.raises(KeyboardInterrupt):
        crashing.run()
    assert calls == [0, 1, 2] and not (tmp_path / "resumed" / "summary.json").exists()

    resumed = Trainer(tiny_config(tiny_paths, tmp_path / "resumed", **config))
    resumed.run(resume=True)
    assert without_times(resumed.history) == without_times(straight.history)
    assert without_times(read_metrics(resumed.run_dir)) == without_times(straight.history)
    for a, b in zip(collect_factors(resumed.agents.models), collect_factors(straight.agents.models)):
        assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B)
    for optimizer_a, optimizer_b in zip(resumed.agents.optimizers, straight.agents.optimizers):
        for state_a, state_b in zip(optimizer_a.state.values(), optimizer_b.state.values()):
            assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_resume_extends_a_finished_run(tiny_paths, tmp_path):
    straight = Trainer(tiny_config(tiny_paths, tmp_path / "straight", rounds=3))
    straight.run()
    Trainer(tiny_config(tiny_paths, tmp_path / "extended", rounds=2)).run()
    extended = Trainer(tiny_config(tiny_paths, tmp_path / "extended", rounds=3))
    extended.run(resume=True)
    assert without_times(extended.history) == without_times(straight.history)


@pytest.mark.parametrize("changes, argument", [({"algorithm": "fedavg"}, "algorithm"), ({"rank": "2,4,4,4"}, "rank"),
                                               ({"message_dtype": "int8"}, "message_dtype")])
def test_resume_with_another_configuration_is_refused_and_leaves_the_run(tiny_paths, tmp_path, changes, argument):
    """Only config.RESUMABLE may change: another algorithm resumed and rewrote the finished run; unequal ranks removed
    its summary.json, rewrote its config.json and then crashed in the first round."""
    Trainer(tiny_config(tiny_paths, tmp_path / "run", rounds=1)).run()
    before = files_of(tmp_path / "run")
    with pytest.raises(ConfigError) as error:
        Trainer(tiny_config(tiny_paths, tmp_path / "run", rounds=2, **changes)).run(resume=True)
    assert str(error.value).startswith(f"{argument}: ") and "\n" not in str(error.value)
    assert files_of(tmp_path / "run") == before


@pytest.mark.parametrize("damaged", ["tensors.safetensors", "optimizers.pt", "state.json", "../../config.json"])
def test_resume_of_a_damaged_run_is_one_line_and_leaves_the_run(tiny_paths, tmp_path, damaged):
    Trainer(tiny_config(tiny_paths, tmp_path / "run", rounds=1)).run()
    path = Path(latest_checkpoint(str(tmp_path / "run")), damaged)
    path.write_bytes(path.read_bytes()[:20])
    before = files_of(tmp_path / "run")
    with pytest.raises(ConfigError, match="^resume: ") as error:
        Trainer(tiny_config(tiny_paths, tmp_path / "run", rounds=2)).run(resume=True)
    assert path.name in str(error.value) and "\n" not in str(error.value)
    assert files_of(tmp_path / "run") == before


def test_optimizer_state_policy(tiny_paths, tmp_path):
    runs = {}
    for policy in ("keep", "reset"):
        trainer = Trainer(tiny_config(tiny_paths, tmp_path / policy, optimizer_state=policy))
        trainer.run()
        runs[policy] = trainer
    # train_then_mix: the last action of the run is a communication, after which "reset" drops Adam's state
    assert all(len(o.state) == 0 for o in runs["reset"].agents.optimizers)
    assert all(len(o.state) > 0 for o in runs["keep"].agents.optimizers)
    assert without_times(runs["keep"].history)[0] == without_times(runs["reset"].history)[0]
    assert runs["keep"].history[1]["train_loss"] != runs["reset"].history[1]["train_loss"]


def test_exported_adapters_load_with_peft(tiny_paths, tmp_path):
    trainer = Trainer(tiny_config(tiny_paths, tmp_path / "run", algorithm="decaf"))
    trainer.run()
    inputs, _ = trainer.agents.task.batch(trainer.agents.test_set, torch.arange(len(trainer.agents.test_set)), torch.device("cpu"))
    expected = {"agent_01": trainer.agents.models[1], "average": trainer.average_model()}
    for name, model in expected.items():
        base = AutoModelForSequenceClassification.from_pretrained(tiny_paths[0], num_labels=3)
        loaded = PeftModel.from_pretrained(base, str(tmp_path / "run" / "adapters" / name)).eval()
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)
    saved = load_file(str(tmp_path / "run" / "adapters" / "agent_00" / "adapter_model.safetensors"))
    assert any("lora_A" in k for k in saved) and any("classifier" in k for k in saved)


def test_agents_share_the_frozen_base(tiny_paths, tmp_path):
    trainer = Trainer(tiny_config(tiny_paths, tmp_path / "run"))
    frozen = [{p.data_ptr() for p in m.parameters() if not p.requires_grad} for m in trainer.agents.models]
    trainable = [{p.data_ptr() for p in m.parameters() if p.requires_grad} for m in trainer.agents.models]
    assert all(f == frozen[0] for f in frozen) and frozen[0]
    assert all(trainable[0].isdisjoint(t) for t in trainable[1:])


def test_partition_and_subsets(tiny_paths, tmp_path):
    trainer = Trainer(tiny_config(tiny_paths, tmp_path / "run", max_train=40, max_test=9, agents=5))
    assert len(trainer.agents.train_set) == 40 and len(trainer.agents.test_set) == 9
    assert sorted(np.concatenate(trainer.agents.parts).tolist()) == list(range(40))


def test_classification_metrics_by_hand():
    labels = np.array([0, 0, 1, 1, 2])
    predicted = np.array([0, 1, 1, 1, 0])
    metrics = classification_metrics(predicted, labels, n_classes=4)
    # F1: class 0 = 2*1/(2+2) = 0.5, class 1 = 2*2/(2+3) = 0.8, class 2 = 0; class 3 absent -> skipped
    assert metrics["accuracy"] == pytest.approx(3 / 5)
    assert metrics["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)


@pytest.mark.parametrize("changes, argument", [
    ({"algorithm": "gossip"}, "algorithm"),
    ({"topology": "hypercube"}, "topology"),
    ({"agents": 1}, "agents"),
    ({"rank": 0}, "rank"),
    ({"rank": 33}, "rank"),
    ({"dirichlet_alpha": 0.0}, "dirichlet_alpha"),
    ({"max_train": 3}, "agents"),
    ({"model": "/no/such/model"}, "model"),
    ({"target_modules": ["no_such_module"]}, "target_modules"),
    ({"optimizer_state": "forget"}, "optimizer_state"),
    ({"max_len": 33}, "max_len"),
    ({"comm_order": "sometimes"}, "comm_order"),
])
def test_bad_configs_raise_one_line_errors(tiny_paths, tmp_path, changes, argument):
    with pytest.raises(ConfigError) as error:
        Trainer(tiny_config(tiny_paths, tmp_path / "run", **changes))
    message = str(error.value)
    assert argument in message and "\n" not in message


def test_local_runs_with_a_single_agent(tiny_paths, tmp_path):
    summary = Trainer(tiny_config(tiny_paths, tmp_path / "run", algorithm="local", agents=1)).run()
    assert summary["final"]["bytes_sent"] == 0 and summary["final"]["acc_std"] == 0.0


def test_refuses_to_overwrite_a_run(tiny_paths, tmp_path):
    Trainer(tiny_config(tiny_paths, tmp_path / "run", rounds=1)).run()
    with pytest.raises(ConfigError, match="output_dir"):
        Trainer(tiny_config(tiny_paths, tmp_path / "run", rounds=1)).run()


@pytest.mark.slow
def test_offline_default_learns(tmp_path):
    """The real offline default (MiniLM, BBC News, DeCAF, 10 agents, ring, Dirichlet 0.5) for 4 of its 10 rounds.

    Seen on 2 CPU cores: agents 0.7405 mean accuracy, averaged model 0.900; chance is 0.2 (5 classes).
    """
    config = TrainConfig(rounds=4, eval_every=4, device="cpu", output_dir=str(tmp_path / "run"), progress=False)
    final = Trainer(config).run()["final"]
    assert final["acc_mean"] > 0.6 and final["avg_model_acc"] > 0.8
