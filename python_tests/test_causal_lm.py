"""decaf_ext.tasks.causal_lm on a tiny random Llama and a word-level tokenizer built in the test (fast, CPU),
plus one slow run on the real Gemma 3 270M."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, \
    PreTrainedTokenizerFast

from decaf_ext.errors import ConfigError
from decaf_ext.strategies import STRATEGIES
from decaf_ext.tasks import classification_metrics
from decaf_ext.cli.commands import format_result, format_table
from decaf_ext.sim.trainer import Trainer
from test_trainer import CLASSES, FILLER, make_tiny_dataset, make_tiny_model, read_metrics, tiny_config

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
TEMPLATE_WORDS = ["Article", ":", "Topic", "?", "'", "Question", "Answer", "yes", "no", "big", "thing"]


def make_tiny_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """Word-level tokenizer (whitespace and punctuation split) that prepends <s>; pad id 0, bos id 2."""
    vocab = {w: i for i, w in enumerate(dict.fromkeys([*SPECIALS, *words]))}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def make_tiny_llama(root: Path, seed: int = 0) -> str:
    """A random 2-layer Llama (hidden 32, 2 heads, 1 KV head, untied head) over the tiny dataset's words."""
    tokenizer = make_tiny_tokenizer([*TEMPLATE_WORDS, *FILLER, *CLASSES, *(w for ws in CLASSES.values() for w in ws)])
    root.mkdir(parents=True)
    tokenizer.save_pretrained(root)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0,
                         bos_token_id=2, eos_token_id=3, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(root)
    return str(root)


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> tuple[str, str]:
    """(tiny Llama folder, tiny topic dataset folder: animals / colors / food)."""
    root = tmp_path_factory.mktemp("tiny_lm")
    return make_tiny_llama(root / "model"), make_tiny_dataset(root / "data")


def lm_config(paths: tuple[str, str], output_dir: Path, **changes):
    """tiny_config of test_trainer on the causal_lm task (topic template, 32 tokens)."""
    return tiny_config(paths, output_dir, **{"task": "causal_lm", "max_len": 32, "lr": 2e-2, **changes})


def plain_log_probs(model, ids: list[int]) -> torch.Tensor:
    """log-softmax [len(ids), V] of the full logits of one unpadded sequence (the reference computation)."""
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)


def hand_score(model, prompt: list[int], word: list[int]) -> float:
    """Summed log-likelihood of `word`'s tokens after `prompt`, from the full logits of prompt + word."""
    log_probs = plain_log_probs(model, prompt + word)
    return sum(log_probs[len(prompt) - 1 + k, token].item() for k, token in enumerate(word))


# ------------------------------------------------------------------------------------------ whole path


@pytest.mark.parametrize("algorithm", STRATEGIES)
def test_every_algorithm_runs_and_evaluates_at_start(tiny_lm, tmp_path, algorithm):
    trainer = Trainer(lm_config(tiny_lm, tmp_path / "run", algorithm=algorithm, eval_at_start=True))
    summary = trainer.run()
    history = read_metrics(trainer.run_dir)
    assert [r["round"] for r in history] == [0, 1, 2]
    assert history[0]["train_loss"] is None and history[0]["consensus_error"] == 0.0
    assert all(np.isfinite(r["train_loss"]) and r["train_loss"] > 0 for r in history[1:])
    assert all(0.0 <= r["macro_f1_mean"] <= 1.0 and 0.0 <= r["avg_model_macro_f1"] <= 1.0 for r in history)
    assert summary["task"] == "causal_lm" and summary["final"]["round"] == 2
    final = summary["final"]
    assert f"macro-F1 {final['macro_f1_mean']:.4f}, averaged model {final['avg_model_macro_f1']:.4f}" \
        in format_result(summary)
    header, row = format_table({algorithm: summary}).splitlines()
    assert "avg model F1" in header and f"{final['avg_model_macro_f1']:.4f}" in row
    # LoRA on the attention q/v projections of both layers, nothing else trainable (no head for this task)
    trainable = [n for n, p in trainer.agents.models[0].named_parameters() if p.requires_grad]
    assert len(trainable) == (2 * 2 * 2 if algorithm != "dlora_fa" else 2 * 2)
    assert all("q_proj" in n or "v_proj" in n for n in trainable)


# ---------------------------------------------------------------------------------- loss and scores


def test_prompt_and_padding_carry_no_loss(tiny_lm, tmp_path):
    """The loss of a padded batch equals the mean over the target tokens of -log p computed on each unpadded
    sequence alone: prompt tokens and padding add nothing."""
    trainer = Trainer(lm_config(tiny_lm, tmp_path / "run", label_words=["big thing", "red", "food"]))
    task, model = trainer.agents.task, trainer.agents.models[0].eval()
    batch = task.batch(trainer.agents.train_set, torch.arange(6), torch.device("cpu"))
    inputs, labels = batch
    assert (inputs["attention_mask"] == 0).any()  # prompts of different lengths: some padding is there
    words = [[task.tokenizer.convert_tokens_to_ids(w) for w in word.split()] for word in ["big thing", "red", "food"]]
    terms = []
    for ids, mask, label in zip(inputs["input_ids"], inputs["attention_mask"], labels):
        prompt, word = ids[mask.bool()].tolist(), words[label]
        log_probs = plain_log_probs(model, prompt + word)
        terms += [-log_probs[len(prompt) - 1 + k, token].item() for k, token in enumerate(word)]
    with torch.no_grad():
        loss = task.loss(model, batch)
    assert loss.item() == pytest.approx(np.mean(terms), rel=1e-5)
    assert len(set(labels.tolist())) > 1  # words of different lengths in one batch


@pytest.mark.parametrize("label_words", [None, ["big thing", "red apple", "food"]])
def test_label_scores_equal_a_hand_computation(tiny_lm, tmp_path, label_words):
    """One-token words (the label names) and multi-token words: scores [b, C] from the batched, padded
    path equal the summed log-likelihoods of each word computed from full logits, one sequence at a time."""
    trainer = Trainer(lm_config(tiny_lm, tmp_path / "run", label_words=label_words))
    task, model = trainer.agents.task, trainer.agents.models[0].eval()
    words = [task.tokenizer(" " + w, add_special_tokens=False)["input_ids"]
             for w in (label_words or trainer.agents.label_names)]
    inputs, _ = task.batch(trainer.agents.test_set, torch.arange(len(trainer.agents.test_set)), torch.device("cpu"))
    with torch.no_grad():
        scores = task.label_scores(model, inputs)
    expected = [[hand_score(model, ids[mask.bool()].tolist(), word) for word in words]
                for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"])]
    torch.testing.assert_close(scores, torch.tensor(expected), rtol=1e-5, atol=1e-5)


def test_metrics_are_accuracy_and_macro_f1_of_the_argmax(tiny_lm, tmp_path):
    trainer = Trainer(lm_config(tiny_lm, tmp_path / "run", rounds=1))
    trainer.run()
    inputs, labels = trainer.agents.task.batch(trainer.agents.test_set, torch.arange(len(trainer.agents.test_set)), torch.device("cpu"))
    with torch.no_grad():
        predicted = trainer.agents.task.label_scores(trainer.agents.models[2].eval(), inputs).argmax(-1).numpy()
    expected = classification_metrics(predicted, labels.numpy(), 3)
    assert trainer.history[-1]["acc_agents"][2] == pytest.approx(expected["accuracy"])
    f1 = []
    for c in range(3):
        tp, support, guessed = np.sum((predicted == c) & (labels.numpy() == c)), np.sum(labels.numpy() == c), \
            np.sum(predicted == c)
        if support + guessed:
            f1.append(2 * tp / (support + guessed))
    assert expected["macro_f1"] == pytest.approx(np.mean(f1))


def test_long_fields_are_cut_to_max_len(tiny_lm, tmp_path):
    trainer = Trainer(lm_config(tiny_lm, tmp_path / "run", max_len=12))
    ids = trainer.agents.task.prompt_ids({"text": " ".join(["cat"] * 40)})
    assert len(ids) == 12 - 1 and ids[0] == 2  # room for the one-token label word, <s> kept
    assert trainer.agents.task.tokenizer.decode(ids).endswith("Topic :")


# ---------------------------------------------------------------------------------- adapters, memory


def test_exported_adapters_reload_with_peft_and_score_identically(tiny_lm, tmp_path):
    trainer = Trainer(lm_config(tiny_lm, tmp_path / "run", algorithm="decaf"))
    trainer.run()
    inputs, _ = trainer.agents.task.batch(trainer.agents.test_set, torch.arange(len(trainer.agents.test_set)), torch.device("cpu"))
    for name, model in {"agent_01": trainer.agents.models[1], "average": trainer.average_model()}.items():
        base = AutoModelForCausalLM.from_pretrained(tiny_lm[0])
        loaded = PeftModel.from_pretrained(base, str(tmp_path / "run" / "adapters" / name)).eval()
        with torch.no_grad():
            torch.testing.assert_close(trainer.agents.task.label_scores(loaded, inputs),
                                       trainer.agents.task.label_scores(model.eval(), inputs), rtol=0, atol=0)


def test_agents_share_one_frozen_base(tiny_lm, tmp_path):
    """Bytes of all distinct tensors of the N agents + scratch model = one base + (N + 1) adapters."""
    trainer = Trainer(lm_config(tiny_lm, tmp_path / "run", agents=6))
    models = [*trainer.agents.models, trainer.agents.scratch]
    storages = {}
    for model in models:
        for tensor in [*model.parameters(), *model.buffers()]:
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    frozen = sum(p.numel() * p.element_size() for p in models[0].parameters() if not p.requires_grad)
    buffers = sum(b.numel() * b.element_size() for b in models[0].buffers())
    adapter = sum(p.numel() * p.element_size() for p in models[0].parameters() if p.requires_grad)
    assert sum(storages.values()) == frozen + buffers + len(models) * adapter
    assert frozen > 20 * adapter


def test_bfloat16_base_keeps_float32_adapters(tiny_lm, tmp_path):
    trainer = Trainer(lm_config(tiny_lm, tmp_path / "run", dtype="bfloat16", rounds=1,
                                gradient_checkpointing=True))
    trainer.run()
    dtypes = {p.dtype for p in trainer.agents.models[0].parameters() if not p.requires_grad}
    assert dtypes == {torch.bfloat16}
    assert {p.dtype for p in trainer.agents.models[0].parameters() if p.requires_grad} == {torch.float32}
    assert np.isfinite(trainer.history[-1]["train_loss"])


# ------------------------------------------------------------------------------------------ data


def test_template_fields_from_a_csv_with_a_column_mapping(tiny_lm, tmp_path):
    rows = [{"passage": f"the {w} is {c}", "question": f"is the {w} big", "answer": k % 2 == 0}
            for k, (w, c) in enumerate(zip(CLASSES["animals"] * 4, CLASSES["colors"] * 4))]
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    trainer = Trainer(lm_config(tiny_lm, tmp_path / "run", dataset=str(path), template="yesno_qa",
                                columns=["label=answer"], rounds=1))
    assert trainer.agents.label_names == ["False", "True"]
    assert trainer.agents.task.tokenizer.convert_ids_to_tokens(trainer.agents.task.target_ids[:, 0].tolist()) == ["no", "yes"]
    assert trainer.run()["final"]["round"] == 1


# ------------------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def other_models(tmp_path_factory) -> dict[str, str]:
    """A tiny BERT (not a causal LM) and a tiny GPT-2 (a causal LM without q_proj / v_proj)."""
    root = tmp_path_factory.mktemp("other")
    gpt2 = root / "gpt2"
    make_tiny_tokenizer([*TEMPLATE_WORDS, *FILLER, *CLASSES]).save_pretrained(gpt2)
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=64)).save_pretrained(gpt2)
    return {"bert": make_tiny_model(root / "bert"), "gpt2": str(gpt2)}


@pytest.mark.parametrize("changes, argument", [
    ({"template": "sentiment"}, "template"),
    ({"template": "yesno_qa"}, "template"),
    ({"template": "{text} {}"}, "template"),
    ({"label_words": ["big", "<unk-word>", "food"]}, "label_words"),
    ({"label_words": ["", "red", "food"]}, "label_words"),
    ({"label_words": ["red", "red", "food"]}, "label_words"),
    ({"label_words": ["red", "food"]}, "label_words"),
    ({"columns": ["label"]}, "columns"),
    ({"columns": ["txt=text"]}, "columns"),  # txt is no field of the topic template
    ({"model": "bert"}, "model"),
    ({"model": "gpt2"}, "target_modules"),
    ({"dtype": "int8"}, "dtype"),
    ({"dtype": "float16"}, "dtype"),
    ({"max_len": 5}, "max_len"),
])
def test_bad_input_is_one_line_naming_the_argument(tiny_lm, other_models, tmp_path, changes, argument):
    if "model" in changes:
        changes = {**changes, "model": other_models[changes["model"]]}
    with pytest.raises(ConfigError) as error:
        Trainer(lm_config(tiny_lm, tmp_path / "run", **changes))
    message = str(error.value)
    assert argument in message and "\n" not in message


def test_command_line_bad_input_exits_2(tiny_lm, tmp_path):
    result = subprocess.run([sys.executable, "-m", "decaf_ext.cli", "--task", "causal_lm", "--model", tiny_lm[0],
                             "--dataset", tiny_lm[1], "--template", "wic", "--device", "cpu",
                             "--output-dir", str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "template" in result.stderr and "sentence1" in result.stderr
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------- distributed


def test_two_process_run_matches_the_simulator(tiny_lm, tmp_path):
    config = lm_config(tiny_lm, tmp_path / "dist", agents=2, algorithm="decaf", lora_dropout=0.0)
    flags = [f"--{k.replace('_', '-')}={','.join(v) if isinstance(v, list) else v}"
             for k, v in config.to_dict().items() if v is not None and not isinstance(v, bool)]
    result = subprocess.run([sys.executable, "-m", "decaf_ext.distributed", "--nproc", "2", "--no-progress",
                             *flags], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    simulator = Trainer(dataclasses.replace(config, output_dir=str(tmp_path / "sim")))
    simulator.run()
    distributed = read_metrics(config.output_dir)
    assert [r["round"] for r in distributed] == [1, 2]
    for got, expected in zip(distributed, simulator.history):
        for key in ("acc_mean", "macro_f1_mean", "avg_model_acc", "avg_model_macro_f1", "acc_agents"):
            assert got[key] == expected[key], key
        assert got["train_loss"] == pytest.approx(expected["train_loss"], rel=1e-5)


# ------------------------------------------------------------------------------------------- slow


@pytest.mark.slow
def test_gemma_topic_run_of_the_readme_learns(tmp_path):
    """The README's offline causal-LM run: Gemma 3 270M (PyPI GGUF packages), BBC News topics, DeCAF, 4 agents.

    The averaged model's macro-F1 must end above its zero-shot round-0 value and far above the majority-class
    baseline (0.096 macro-F1, 0.317 accuracy on its 60 test documents). Seen once: 0.771 -> 0.864 macro-F1.
    """
    from decaf_ext.config import TrainConfig

    config = TrainConfig(task="causal_lm", model="gemma3-270m", template="topic", agents=4, rounds=3, local_steps=5,
                         batch_size=8, max_len=64, max_train=320, max_test=60, lr=3e-3, eval_at_start=True,
                         eval_every=3, device="cpu", output_dir=str(tmp_path / "run"), progress=False)
    trainer = Trainer(config)
    assert sum(p.numel() for p in trainer.agents.models[0].parameters() if not p.requires_grad) == 268_098_176
    trainer.run()
    start, end = trainer.history[0], trainer.history[-1]
    majority = np.bincount(trainer.agents.test_set.labels.numpy()).max() / len(trainer.agents.test_set)
    assert end["avg_model_macro_f1"] > start["avg_model_macro_f1"] + 0.05
    assert end["avg_model_acc"] > majority + 0.4
