"""The clip task (decaf_ext.tasks.clip) and image data (decaf_ext.data.images) on the tiny random CLIP and a
folder of scikit-learn digits written as PNG files (fast, CPU)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPModel, CLIPProcessor

from decaf_ext.config import TrainConfig
from decaf_ext.errors import ConfigError
from decaf_ext.distributed import launch
from decaf_ext.data.images import load_digits_dataset, read_image_folder, read_image_source, shots_per_class
from decaf_ext.lora import collect_factors
from decaf_ext.tasks.clip import TEMPLATES, build_tiny_clip, class_prompts, resolve_template
from decaf_ext.cli.commands import main
from decaf_ext.sim.trainer import Trainer
from test_trainer import read_metrics, without_times

# folder name -> digit; '_' and '-' become spaces in the prompts; classes are numbered by sorted folder name
CLASSES = {"digit-one": 1, "digit_zero": 0, "seven": 7}
PROMPTS = ["a photo of a digit one.", "a photo of a digit zero.", "a photo of a seven."]  # generic template
PER_CLASS = 16
AGENTS = 4
MODULES_PER_ENCODER = 6  # 2 layers x q/k/v
WIDTH = 64


def write_digit_folder(root: Path) -> str:
    """<root>/<class>/NN.png: the first PER_CLASS digits of each class of CLASSES, 8x8 grayscale."""
    digits = load_digits_dataset()
    for name, digit in CLASSES.items():
        (root / name).mkdir(parents=True)
        for k, row in enumerate(np.flatnonzero(digits.labels == digit)[:PER_CLASS]):
            Image.fromarray(digits.source[row]).save(root / name / f"{k:02d}.png")
    return str(root)


@pytest.fixture(scope="session")
def clip_paths(tmp_path_factory) -> tuple[str, str]:
    """(tiny CLIP folder, digit image folder), built once per test session."""
    root = tmp_path_factory.mktemp("clip")
    build_tiny_clip(root / "model")
    return str(root / "model"), write_digit_folder(root / "data")


def clip_config(paths: tuple[str, str], output_dir: Path, **changes) -> TrainConfig:
    """A 2-round, 4-agent ring run of the clip task on the tiny CLIP and the 48 digit images (38 train, 10 test)."""
    model, data = paths
    values = dict(task="clip", model=model, dataset=data, agents=AGENTS, rank=2, lora_alpha=4, max_len=32,
                  max_train=None, max_test=None, rounds=2, local_steps=2, batch_size=8, lr=3e-3, eval_every=1,
                  dirichlet_alpha=1.0, eval_at_start=True, device="cpu", output_dir=str(output_dir), progress=False)
    return TrainConfig(**{**values, **changes})


def all_test_inputs(trainer: Trainer) -> dict[str, torch.Tensor]:
    inputs, _ = trainer.agents.task.batch(trainer.agents.test_set, torch.arange(len(trainer.agents.test_set)), torch.device("cpu"))
    return inputs


# ------------------------------------------------------------------------------------------ training


@pytest.mark.parametrize("lora_on", ["vision", "text", "both"])
@pytest.mark.parametrize("algorithm", ["decaf", "dlora", "dlora_fa"])
def test_clip_trains_with_every_gossip_algorithm(clip_paths, tmp_path, algorithm, lora_on):
    trainer = Trainer(clip_config(clip_paths, tmp_path / "run", algorithm=algorithm, clip_lora_on=lora_on))
    encoders = {"vision": ["vision_model"], "text": ["text_model"], "both": ["vision_model", "text_model"]}[lora_on]
    (group,) = collect_factors(trainer.agents.models)  # every adapted module is 64 x 64 with rank 2
    assert sorted({name.split(".")[2] for name in group.names}) == sorted(encoders)  # base_model.model.<encoder>
    assert len(group.names) == MODULES_PER_ENCODER * len(encoders)
    assert all(name.endswith(("q_proj", "k_proj", "v_proj")) for name in group.names)
    factors = 1 if algorithm == "dlora_fa" else 2  # dlora_fa freezes A
    assert trainer.agents.trainable_params == len(group.names) * factors * 2 * WIDTH  # no head: LoRA factors only
    logits_before = trainer.agents.task.logits(trainer.agents.models[0].eval(), all_test_inputs(trainer)["pixel_values"])

    trainer.run()
    history = read_metrics(trainer.run_dir)
    assert [r["round"] for r in history] == [0, 1, 2]
    zero_shot = history[0]
    assert zero_shot["train_loss"] is None and zero_shot["bytes_sent"] == 0 and zero_shot["acc_std"] == 0.0
    assert zero_shot["avg_model_acc"] == zero_shot["acc_mean"]
    assert all(np.isfinite(r["train_loss"]) and r["train_loss"] > 0 for r in history[1:])
    # bytes per round by hand: each agent sends its payload to its 2 ring neighbours; float32 factors
    floats = len(group.names) * factors * WIDTH * 2
    assert [r["bytes_sent"] for r in history] == [0, AGENTS * 2 * floats * 4, 2 * AGENTS * 2 * floats * 4]
    # the trained adapters changed the scores
    logits_after = trainer.agents.task.logits(trainer.agents.models[0].eval(), all_test_inputs(trainer)["pixel_values"])
    assert not torch.allclose(logits_before, logits_after)


def test_clip_training_loss_falls(clip_paths, tmp_path):
    """FedAvg on the 38 training digits of 3 classes: the training loss falls from its start to below ln 3."""
    trainer = Trainer(clip_config(clip_paths, tmp_path / "run", algorithm="fedavg", rounds=6, local_steps=5,
                                  eval_every=1, eval_at_start=False))
    trainer.run()
    losses = [r["train_loss"] for r in trainer.history]
    assert losses[-1] < min(losses[0], np.log(3))


def test_zero_shot_evaluation_matches_clip_forward(clip_paths, tmp_path):
    """Round 0 equals CLIPModel's own forward (logits_per_image) on the processor's inputs, by hand."""
    model_path, data_path = clip_paths
    trainer = Trainer(clip_config(clip_paths, tmp_path / "run", rounds=1))
    _, test = trainer.agents.task.load_data(data_path, test_fraction=0.2, seed=0)
    images = [test.image(i) for i in range(len(test))]
    processor, model = CLIPProcessor.from_pretrained(model_path), CLIPModel.from_pretrained(model_path).eval()
    with torch.no_grad():
        expected = model(**processor(text=PROMPTS, images=images, return_tensors="pt", padding=True)).logits_per_image
        got = trainer.agents.task.logits(trainer.agents.models[2].eval(), all_test_inputs(trainer)["pixel_values"])
    torch.testing.assert_close(got[:5], expected[:5], rtol=1e-5, atol=1e-5)
    accuracy = float((expected.argmax(dim=1).numpy() == test.labels).mean())
    trainer.run()
    zero_shot = trainer.history[0]
    assert zero_shot["round"] == 0
    assert zero_shot["acc_agents"] == [accuracy] * AGENTS and zero_shot["avg_model_acc"] == accuracy


@pytest.mark.parametrize("lora_on, embeddings", [("vision", 1), ("both", AGENTS * 2 + AGENTS + 1)])
def test_prompts_are_embedded_once_unless_the_text_encoder_trains(clip_paths, tmp_path, monkeypatch, lora_on,
                                                                  embeddings):
    """vision only: once for the whole run; text LoRA: every local step (4 agents x 2) and once per evaluated
    model (4 agents + the averaged one)."""
    trainer = Trainer(clip_config(clip_paths, tmp_path / "run", clip_lora_on=lora_on, rounds=1,
                                  eval_at_start=False))
    calls = []
    embed = trainer.agents.task._embed_prompts
    monkeypatch.setattr(trainer.agents.task, "_embed_prompts", lambda model: calls.append(model) or embed(model))
    trainer.run()
    assert len(calls) == embeddings


def test_exported_adapters_reload_to_identical_logits(clip_paths, tmp_path):
    trainer = Trainer(clip_config(clip_paths, tmp_path / "run", algorithm="decaf", eval_at_start=False))
    trainer.run()
    pixels = all_test_inputs(trainer)["pixel_values"]
    for name, model in {"agent_01": trainer.agents.models[1], "average": trainer.average_model()}.items():
        folder = tmp_path / "run" / "adapters" / name
        loaded = PeftModel.from_pretrained(CLIPModel.from_pretrained(clip_paths[0]), str(folder)).eval()
        with torch.no_grad():
            torch.testing.assert_close(trainer.agents.task.logits(loaded, pixels), trainer.agents.task.logits(model.eval(), pixels),
                                       rtol=0, atol=0)
        saved = load_file(str(folder / "adapter_model.safetensors"))
        assert {k.split(".")[2] for k in saved if "lora_" in k} == {"vision_model", "text_model"}
        assert all("lora_" in k for k in saved)


def test_resume_matches_an_uninterrupted_run(clip_paths, tmp_path):
    straight = Trainer(clip_config(clip_paths, tmp_path / "straight", rounds=3))
    straight.run()
    Trainer(clip_config(clip_paths, tmp_path / "resumed", rounds=2)).run()
    resumed = Trainer(clip_config(clip_paths, tmp_path / "resumed", rounds=3))
    resumed.run(resume=True)
    assert without_times(resumed.history) == without_times(straight.history)
    assert resumed.history[0]["round"] == 0


def test_command_line_compare_plot_and_resume(clip_paths, tmp_path, capsys):
    model, data = clip_paths
    flags = ["--task", "clip", "--model", model, "--dataset", data, "--agents", "4", "--rank", "2", "--max-train",
             "none", "--max-test", "none", "--rounds", "1", "--local-steps", "2", "--batch-size", "8",
             "--eval-at-start", "--device", "cpu", "--no-progress", "--clip-lora-on", "vision",
             "--prompt-template", "a blurry photo of a {}.", "--output-dir", str(tmp_path / "cmp")]
    assert main([*flags, "--compare", "local,decaf"]) == 0
    compare = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert compare["runs"]["local"]["final"]["bytes_sent"] == 0 < compare["runs"]["decaf"]["final"]["bytes_sent"]
    assert main(["plot", str(tmp_path / "cmp"), "-o", str(tmp_path / "acc.png")]) == 0
    assert (tmp_path / "acc.png").stat().st_size > 0
    assert main(["--resume", str(tmp_path / "cmp" / "decaf"), "--rounds", "2", "--no-progress"]) == 0
    assert [r["round"] for r in read_metrics(str(tmp_path / "cmp" / "decaf"))] == [0, 1, 2]


def test_distributed_run_matches_the_simulator(clip_paths, tmp_path):
    """3 agent processes (gloo) running DeCAF on the tiny CLIP log what the simulator logs, zero-shot round 0
    included."""
    import test_distributed

    config = clip_config(clip_paths, tmp_path / "dist", agents=3)
    spec = {"runs": [(config.to_dict(), "")], "options": {"round_timeout": 30.0, "startup_timeout": 120.0}}
    assert launch([sys.executable, test_distributed.__file__, json.dumps(spec)], 3) == [0, 0, 0]
    simulator = Trainer(clip_config(clip_paths, tmp_path / "sim", agents=3))
    simulator.run()
    assert simulator.history[0]["round"] == 0
    for got, expected in zip(without_times(read_metrics(config.output_dir)), without_times(simulator.history),
                             strict=True):
        for key in test_distributed.EXACT:
            assert got[key] == expected[key], key
        assert got["train_loss"] == (None if expected["train_loss"] is None
                                     else pytest.approx(expected["train_loss"], rel=1e-5))


# ------------------------------------------------------------------------------------ prompts and data


def test_prompt_templates():
    names = ["globe_flower", "sweet-pea", "rose"]
    assert class_prompts("flowers", names) == ["a photo of a globe flower, a type of flower.",
                                               "a photo of a sweet pea, a type of flower.",
                                               "a photo of a rose, a type of flower."]
    assert class_prompts("food", ["pad_thai"]) == ["a photo of pad thai, a type of food."]
    assert class_prompts("actions", ["Apply_Eye_Makeup"]) == ["a photo of a person doing Apply Eye Makeup."]
    assert class_prompts("generic", ["t-shirt"]) == ["a photo of a t shirt."]
    assert class_prompts("{} in a garden", ["rose"]) == ["rose in a garden"]
    assert set(TEMPLATES) == {"flowers", "food", "actions", "generic"}
    for bad in ("flower", "a photo of a cat", "{} and {}", ""):
        with pytest.raises(ConfigError, match="^prompt_template") as error:
            resolve_template(bad)
        assert "\n" not in str(error.value)


def test_image_folder_reading(clip_paths):
    dataset = read_image_folder(clip_paths[1])
    assert dataset.label_names == sorted(CLASSES) and len(dataset) == 3 * PER_CLASS
    assert np.bincount(dataset.labels).tolist() == [PER_CLASS] * 3
    image = dataset.image(0)
    assert image.mode == "RGB" and image.size == (8, 8)


def test_hub_dataset_pools_splits_and_keeps_class_names(monkeypatch):
    """A hub dataset (datasets.load_dataset replaced by an in-memory one): Image and ClassLabel columns found,
    splits pooled, unlabelled rows (-1) dropped, images decoded on access."""
    import datasets

    features = datasets.Features({"label": datasets.ClassLabel(names=["pink_primrose", "sweet-pea"]),
                                  "picture": datasets.Image()})
    images = [Image.fromarray(np.full((4, 4), 40 * k, dtype=np.uint8)) for k in range(5)]
    splits = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"label": [0, 1, -1], "picture": images[:3]}, features=features),
        "test": datasets.Dataset.from_dict({"label": [1, 0], "picture": images[3:]}, features=features)})
    monkeypatch.setattr(datasets, "load_dataset", lambda source: splits)
    dataset = read_image_source("someone/flowers")
    assert dataset.label_names == ["pink_primrose", "sweet-pea"] and dataset.labels.tolist() == [0, 1, 1, 0]
    assert [np.asarray(dataset.image(i))[0, 0, 0] for i in range(4)] == [0, 40, 120, 160]
    assert class_prompts("flowers", dataset.label_names)[1] == "a photo of a sweet pea, a type of flower."


def test_shots_per_class_is_seeded_and_balanced():
    labels = np.repeat(np.arange(4), [10, 7, 12, 5])
    chosen = shots_per_class(labels, 5, seed=3)
    assert np.bincount(labels[chosen]).tolist() == [5, 5, 5, 5] and np.all(np.diff(chosen) > 0)
    assert np.array_equal(chosen, shots_per_class(labels, 5, seed=3))
    assert not np.array_equal(chosen, shots_per_class(labels, 5, seed=4))
    with pytest.raises(ValueError, match="class 3"):
        shots_per_class(labels, 6, seed=0)


@pytest.mark.parametrize("max_train", [None, 0, 24])  # none and 0 both mean all; 24 keeps every selected image
def test_shots_per_class_selects_the_training_set(clip_paths, tmp_path, max_train):
    trainer = Trainer(clip_config(clip_paths, tmp_path / "run", shots_per_class=8, max_train=max_train))
    assert np.bincount(trainer.agents.train_labels).tolist() == [8, 8, 8]


# ------------------------------------------------------------------------------------------ bad input


def bad_folder(root: Path, kind: str) -> str:
    """An image folder with one mistake."""
    root.mkdir()
    if kind == "empty":
        return str(root)
    pixels = np.zeros((8, 8), dtype=np.uint8)
    for name in (["only"] if kind == "one_class" else ["a", "b"]):
        (root / name).mkdir()
        Image.fromarray(pixels).save(root / name / "0.png")
    if kind == "text_file":
        (root / "a" / "notes.txt").write_text("not an image")
    if kind == "broken_png":
        (root / "b" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return str(root)


@pytest.mark.parametrize("kind", ["empty", "one_class", "text_file", "broken_png"])
def test_bad_image_folders_raise_one_line_errors(clip_paths, tmp_path, kind):
    with pytest.raises(ConfigError) as error:
        Trainer(clip_config((clip_paths[0], bad_folder(tmp_path / "data", kind)), tmp_path / "run"))
    assert str(error.value).startswith("dataset: ") and "\n" not in str(error.value)


@pytest.mark.parametrize("changes, argument", [
    ({"prompt_template": "flower"}, "prompt_template"),
    ({"prompt_template": "a photo"}, "prompt_template"),
    ({"clip_lora_on": "audio"}, "clip_lora_on"),
    ({"target_modules": ["fc9"]}, "target_modules"),
    ({"target_modules": ["visual_projection"]}, "target_modules"),  # a linear module outside both encoders
    ({"target_modules": ["token_embedding"]}, "target_modules"),
    ({"shots_per_class": 20}, "shots_per_class"),
    ({"shots_per_class": 10, "max_train": 20}, "max_train"),
    ({"max_len": 78}, "max_len"),
])
def test_bad_clip_options_raise_one_line_errors(clip_paths, tmp_path, changes, argument):
    with pytest.raises(ConfigError) as error:
        Trainer(clip_config(clip_paths, tmp_path / "run", **changes))
    assert str(error.value).startswith(argument) and "\n" not in str(error.value)


def test_bad_template_exits_with_status_2(clip_paths, tmp_path, capsys):
    model, data = clip_paths
    assert main(["--task", "clip", "--model", model, "--dataset", data, "--prompt-template", "no braces",
                 "--output-dir", str(tmp_path / "run"), "--no-progress"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("decaf-train: error: prompt_template")
