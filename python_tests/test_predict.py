"""Exported adapters of every task: their cards, loading with peft alone (the README snippet), ``load_predictor``
and ``decaf-train predict``, runs moved to another folder, and bad input."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import AutoPeftModel, AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification, LoraConfig, \
    get_peft_model
from PIL import Image
from transformers import AutoModelForSequenceClassification

from decaf_ext.cli.commands import main
from decaf_ext.cli.predict import load_predictor
from decaf_ext.data.images import ImageDataset
from decaf_ext.sim.trainer import Trainer
from decaf_ext.storage.adapter_card import AdapterCard
from decaf_ext.storage.export import save_adapter
from test_causal_lm import lm_config, tiny_lm  # noqa: F401  (tiny_lm is a fixture)
from test_clip import PROMPTS, clip_config, clip_paths  # noqa: F401  (clip_paths is a fixture)
from test_trainer import CLASSES, tiny_config, tiny_paths  # noqa: F401  (tiny_paths is a fixture)

README = Path(__file__).parents[1] / "README.md"
DOCS = Path(__file__).parents[1] / "docs" / "predict.md"
TEXTS = ["the cat and a dog", "red of blue", "rice with cheese and soup"]
LEAN = dict(agents=2, rounds=2, eval_every=2)


@pytest.fixture(scope="module")
def finished(tiny_paths, tmp_path_factory) -> Trainer:
    """A finished 2-round decaf run of text classification on the tiny model and data."""
    trainer = Trainer(tiny_config(tiny_paths, tmp_path_factory.mktemp("predict") / "run", **LEAN))
    trainer.run()
    return trainer


@pytest.fixture(scope="module")
def finished_lm(tiny_lm, tmp_path_factory) -> Trainer:
    """A finished 2-round decaf run of the causal_lm task (topic template) on the tiny Llama."""
    trainer = Trainer(lm_config(tiny_lm, tmp_path_factory.mktemp("predict_lm") / "run", **LEAN))
    trainer.run()
    return trainer


@pytest.fixture(scope="module")
def finished_clip(clip_paths, tmp_path_factory) -> Trainer:
    """A finished 2-round decaf run of the clip task on the tiny CLIP and digit images."""
    trainer = Trainer(clip_config(clip_paths, tmp_path_factory.mktemp("predict_clip") / "run", eval_at_start=False,
                                  **LEAN))
    trainer.run()
    return trainer


def adapter(trainer: Trainer, name: str = "average") -> str:
    return str(Path(trainer.run_dir, "adapters", name))


def images_of(clip_paths) -> list[str]:
    return sorted(str(p) for p in Path(clip_paths[1]).glob("*/0[01].png"))


def run_scores(trainer: Trainer, inputs, model=None) -> torch.Tensor:
    """The class scores [b, C] of `model` (default: the trainer's own averaged model, which every exported form
    must reproduce), computed by the run's task."""
    task, model = trainer.agents.task, (model or trainer.average_model()).eval()
    with torch.no_grad():
        if task.name == "text_classification":
            return model(**task.tokenizer(inputs, truncation=True, max_length=task.max_len, padding=True,
                                          return_tensors="pt")).logits
        if task.name == "causal_lm":
            ids = [task.prompt_ids({"text": text}) for text in inputs]
            tokens = task.tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")
            return task.label_scores(model, {k: tokens[k].long() for k in ("input_ids", "attention_mask")})
        images = ImageDataset(inputs, np.arange(len(inputs)), np.zeros(len(inputs)), trainer.agents.label_names)
        encoded = task.encode(images, np.arange(len(inputs)))
        pixels, _ = task.batch(encoded, torch.arange(len(inputs)), torch.device("cpu"))
        return task.logits(model, pixels["pixel_values"])


# ------------------------------------------------------------------------------------------ every task

TASK_RUNS = ["finished", "finished_lm", "finished_clip"]


def inputs_for(trainer: Trainer, clip_paths) -> list:
    return images_of(clip_paths) if trainer.config.task == "clip" else TEXTS


@pytest.mark.parametrize("run", TASK_RUNS)
def test_the_card_carries_what_the_adapter_needs(run, request):
    trainer = request.getfixturevalue(run)
    for name in ("agent_01", "average"):
        card = AdapterCard.read(adapter(trainer, name))
        assert card.task == trainer.config.task and card.label_names == trainer.agents.label_names
        assert card.model == trainer.config.model and card.options["max_len"] == trainer.config.max_len
        peft_config = json.loads(Path(adapter(trainer, name), "adapter_config.json").read_text())
        assert peft_config["r"] == trainer.config.rank
    described = AdapterCard.read(adapter(trainer)).described
    if run == "finished_lm":
        assert described == {"template": "Article: {text}\nTopic:", "label_words": trainer.agents.label_names}
    if run == "finished_clip":
        assert described == {"class_prompts": PROMPTS}
    assert not [p for p in Path(trainer.run_dir).rglob("*") if p.is_symlink()]  # nothing links out of the run


@pytest.mark.parametrize("run", TASK_RUNS)
def test_peft_alone_loads_every_tasks_adapter(run, request, clip_paths, tmp_path, monkeypatch):
    """AutoPeftModelFor... from the adapter folder alone (from another working directory) reproduces the run."""
    trainer = request.getfixturevalue(run)
    monkeypatch.chdir(tmp_path)
    auto = {"finished": AutoPeftModelForSequenceClassification, "finished_lm": AutoPeftModelForCausalLM,
            "finished_clip": AutoPeftModel}[run]
    model = auto.from_pretrained(adapter(trainer)).eval()
    inputs = inputs_for(trainer, clip_paths)
    if run == "finished":
        assert model.config.id2label == dict(enumerate(trainer.agents.label_names))
    torch.testing.assert_close(run_scores(trainer, inputs, model), run_scores(trainer, inputs))


@pytest.mark.parametrize("run", TASK_RUNS)
def test_load_predictor_reproduces_the_run(run, request, clip_paths):
    trainer = request.getfixturevalue(run)
    inputs = inputs_for(trainer, clip_paths)
    predictor = load_predictor(adapter(trainer), device="cpu")
    expected = torch.softmax(run_scores(trainer, inputs).float(), dim=-1)
    torch.testing.assert_close(predictor.probabilities(inputs, batch_size=2), expected)
    best, index = expected.max(dim=-1)
    assert [(p.label, round(p.score, 4)) for p in predictor.predict(inputs)] == \
        [(trainer.agents.label_names[i], round(s, 4)) for s, i in zip(best.tolist(), index.tolist())]


@pytest.mark.parametrize("run", TASK_RUNS)
def test_predict_command_prints_label_probability_and_input(run, request, clip_paths, tmp_path, capsys):
    trainer = request.getfixturevalue(run)
    inputs = inputs_for(trainer, clip_paths)
    expected = [f"{p.label}\t{p.score:.4f}\t{item}" for p, item in zip(load_predictor(adapter(trainer)).predict(inputs),
                                                                         inputs)]
    flag = "--image" if run == "finished_clip" else "--text"
    assert main(["predict", adapter(trainer), *(a for item in inputs for a in (flag, item))]) == 0
    assert capsys.readouterr().out.splitlines() == expected
    if run == "finished_clip":  # a folder: its image files in name order
        folder = tmp_path / "images"
        folder.mkdir()
        for k, image in enumerate(inputs):
            shutil.copy(image, folder / f"{k:02d}.png")
        assert main(["predict", adapter(trainer), "--image", str(folder)]) == 0
        out = capsys.readouterr().out.splitlines()
        assert [line.rsplit("\t", 1)[0] for line in out] == [line.rsplit("\t", 1)[0] for line in expected]
    else:
        listing = tmp_path / "inputs.txt"
        listing.write_text("\n".join(inputs) + "\n\n")
        assert main(["predict", adapter(trainer), "--file", str(listing)]) == 0
        assert capsys.readouterr().out.splitlines() == expected


def test_readme_snippet_loads_an_exported_adapter(finished):
    """The README's peft snippet, run as written with the adapter folder of this run."""
    block = next(b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
                 if "AutoPeftModelForSequenceClassification" in b)
    code = re.sub(r'adapter = "[^"]*"', f"adapter = {adapter(finished)!r}", block)
    code = re.sub(r"texts = \[.*?\]\n", f"texts = {TEXTS!r}\n", code, flags=re.S)
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        exec(code, {})
    expected = [finished.agents.label_names[i] for i in run_scores(finished, TEXTS).argmax(-1).tolist()]
    assert output.getvalue().strip() == repr(expected)


# ------------------------------------------------------------------------------------------ causal LM

def test_causal_lm_inputs_as_json_objects_and_generation(finished_lm, capsys):
    predictor = load_predictor(adapter(finished_lm))
    as_json = [json.dumps({"text": text}) for text in TEXTS]
    torch.testing.assert_close(predictor.probabilities(as_json), predictor.probabilities(TEXTS))
    generated = predictor.generate(TEXTS, 3)  # one batch, left-padded
    one_by_one = [predictor.generate([text], 3)[0] for text in TEXTS]
    assert generated == one_by_one and all(len(predictor.task.tokenizer(g, add_special_tokens=False)["input_ids"])
                                           <= 3 for g in generated)
    assert main(["predict", adapter(finished_lm), "--generate", "3", *(a for t in TEXTS for a in ("--text", t))]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{t}\t{g}" for t, g in zip(TEXTS, generated)]


def test_causal_lm_inputs_that_miss_a_field_are_one_line(finished_lm, capsys):
    assert main(["predict", adapter(finished_lm), "--text", '{"question": "x"}']) == 2
    assert capsys.readouterr().err.splitlines() == [
        "decaf-train predict: error: text: an input lacks the template's field text"]


# ------------------------------------------------------------------------------------------ own loop

def test_save_adapter_of_a_users_loop_loads_alone(tiny_paths, tmp_path):
    base = AutoModelForSequenceClassification.from_pretrained(tiny_paths[0], num_labels=3)
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS"))
    torch.nn.init.normal_(model.base_model.model.classifier.modules_to_save["default"].weight)
    save_adapter(model, str(tmp_path / "mine"), task="text_classification", label_names=["x", "y", "z"],
                 max_len=16)
    mine = str(tmp_path / "mine")  # absolute: peft looks a relative folder's tokenizer up on the hub
    loaded = AutoPeftModelForSequenceClassification.from_pretrained(mine).eval()
    assert loaded.config.id2label == {0: "x", 1: "y", 2: "z"}
    predictor = load_predictor(mine)
    assert predictor.task.max_len == 16 and AdapterCard.read(mine).model == tiny_paths[0]
    tokens = predictor.task.tokenizer(TEXTS, truncation=True, max_length=16, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = torch.softmax(model.eval()(**tokens).logits, dim=-1)
    torch.testing.assert_close(predictor.probabilities(TEXTS), expected)


# ------------------------------------------------------------------------------------------ moved runs

def test_a_moved_finished_run_predicts_and_resumes_from_its_new_place(finished, tmp_path, capsys):
    before = [(p.label, p.score) for p in load_predictor(adapter(finished)).predict(TEXTS)]
    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(finished.run_dir, tmp_path / "kept")  # the module's fixture stays usable
    shutil.move(finished.run_dir, moved)
    try:
        assert [(p.label, p.score) for p in load_predictor(str(moved / "adapters" / "average")).predict(TEXTS)] == \
            before
        loaded = AutoPeftModelForSequenceClassification.from_pretrained(str(moved / "adapters" / "average"))
        assert loaded.config.id2label == dict(enumerate(finished.agents.label_names))  # peft alone, too
        assert main(["--resume", str(moved), "--rounds", "3"]) == 0
        summary = json.loads((moved / "summary.json").read_text())
        assert summary["rounds"] == 3 and not Path(finished.run_dir).exists()
        assert main(["predict", str(moved / "adapters" / "average"), "--text", TEXTS[0]]) == 0
        assert capsys.readouterr().out.splitlines()[-1].endswith(f"\t{TEXTS[0]}")
    finally:
        shutil.move(tmp_path / "kept", finished.run_dir)


def test_a_moved_unfinished_run_resumes_from_its_new_place(tiny_paths, tmp_path, monkeypatch, capsys):
    config = tiny_config(tiny_paths, tmp_path / "run", agents=2, rounds=3, eval_every=1)
    crashing = Trainer(config)

    def crash(round_index: int) -> None:
        if round_index == 1:  # the second round, after the round-1 checkpoint
            raise KeyboardInterrupt
        Trainer.communicate(crashing, round_index)

    monkeypatch.setattr(crashing, "communicate", crash)
    with pytest.raises(KeyboardInterrupt):
        crashing.run()
    monkeypatch.undo()
    moved = tmp_path / "elsewhere"
    shutil.move(tmp_path / "run", moved)
    old = str(tmp_path / "run").encode()
    for path in moved.rglob("*"):  # nothing in the run links out of it or names its old place (but output_dir)
        assert not path.is_symlink(), path
        if path.name == "config.json" and path.parent == moved:
            assert json.loads(path.read_bytes())["output_dir"] == str(tmp_path / "run")  # resume replaces it
            assert old not in path.read_bytes().replace(b'"output_dir": "%s"' % old, b"")
        elif path.is_file():
            assert old not in path.read_bytes(), path
    assert main(["--resume", str(moved)]) == 0
    assert json.loads((moved / "summary.json").read_text())["final"]["round"] == 3
    assert main(["predict", str(moved / "adapters" / "average"), "--text", TEXTS[0]]) == 0
    assert capsys.readouterr().out.splitlines()[-1].split("\t")[0] in CLASSES


def test_a_moved_distributed_run_resumes_and_predicts_from_its_new_place(tiny_paths, tmp_path, monkeypatch):
    """One agent process (RANK 0 of 1) with its own folder under agents/: run, moved, extended by a round."""
    import dataclasses

    import torch.distributed as dist

    from decaf_ext.distributed import run_distributed

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    config = tiny_config(tiny_paths, tmp_path / "run", algorithm="local", agents=1, rounds=1)
    run_distributed(config, store=dist.HashStore())
    shutil.move(tmp_path / "run", tmp_path / "moved")
    assert not [p for p in (tmp_path / "moved").rglob("*") if p.is_symlink()]
    run_distributed(dataclasses.replace(config, output_dir=str(tmp_path / "moved"), rounds=2), resume=True,
                    store=dist.HashStore())
    assert json.loads((tmp_path / "moved" / "summary.json").read_text())["final"]["round"] == 2
    assert not (tmp_path / "run").exists()
    predictor = load_predictor(str(tmp_path / "moved" / "adapters" / "average"))
    assert [p.label in CLASSES for p in predictor.predict(TEXTS)] == [True] * len(TEXTS)


# ------------------------------------------------------------------------------------------ bad input

def damage(folder: Path, kind: str, tiny_paths) -> str:
    """A copy of an exported adapter folder, damaged as `kind` says; returns the argument to give predict."""
    if kind == "another library's adapter":
        (folder / "decaf_adapter.json").unlink()
    elif kind == "a model, not an adapter":
        return tiny_paths[0]
    elif kind == "a damaged card":
        (folder / "decaf_adapter.json").write_text('{"format": 1, "task": "text_cl')
    elif kind == "a card of the wrong shape":
        (folder / "decaf_adapter.json").write_text('{"format": 1, "task": "text_classification", "label_names": 3, '
                                                   '"model": null}')
    elif kind == "truncated weights":
        weights = folder / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    elif kind == "no weights":
        (folder / "adapter_model.safetensors").unlink()
    elif kind == "a base model that is gone":
        card = json.loads((folder / "decaf_adapter.json").read_text())
        (folder / "decaf_adapter.json").write_text(json.dumps({**card, "model": str(folder / "gone")}))
    return str(folder)


@pytest.mark.parametrize("kind, expected", [
    ("another library's adapter", "holds a peft adapter without decaf_adapter.json (exported by another library"),
    ("a model, not an adapter", "is not an exported adapter (no adapter_config.json)"),
    ("a damaged card", "its decaf_adapter.json is damaged (JSONDecodeError)"),
    ("a card of the wrong shape", "its decaf_adapter.json is damaged"),
    ("truncated weights", "cannot load the adapter onto its base model"),
    ("no weights", "cannot load the adapter onto its base model"),
    ("a base model that is gone", "cannot load the adapter onto its base model"),
])
def test_bad_adapter_folders_are_one_line(finished, tiny_paths, tmp_path, capsys, kind, expected):
    shutil.copytree(adapter(finished), tmp_path / "adapter")
    argument = damage(tmp_path / "adapter", kind, tiny_paths)
    assert main(["predict", argument, "--text", TEXTS[0]]) == 2
    captured = capsys.readouterr()
    assert len(captured.err.splitlines()) == 1 and expected in captured.err and not captured.out
    assert captured.err.startswith(f"decaf-train predict: error: adapter_dir: {argument!r}")


def test_bad_inputs_are_one_line(finished, finished_clip, clip_paths, tmp_path, capsys):
    empty, broken, no_images = tmp_path / "empty.txt", tmp_path / "broken.png", tmp_path / "none"
    empty.write_text("\n  \n")
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    no_images.mkdir()
    (no_images / "notes.txt").write_text("x")
    Image.new("RGB", (4, 4)).save(tmp_path / "fine.png")
    cases = [
        (["predict", adapter(finished), "--file", str(empty)], f"file: {str(empty)!r} holds no texts"),
        (["predict", adapter(finished_clip), "--image", str(broken)], f"image: cannot decode {str(broken)!r}"),
        (["predict", adapter(finished_clip), "--image", str(no_images)], "holds no image files"),
        (["predict", adapter(finished_clip), "--image", str(tmp_path / "nope.png")], "image: cannot decode"),
        (["predict", adapter(finished_clip), "--text", "x"], "reads images, not texts (give them with --image)"),
        (["predict", adapter(finished), "--image", str(tmp_path / "fine.png")], "reads texts, not images"),
        (["predict", adapter(finished), "--text", "x", "--generate", "2"], "not a causal language model's adapter"),
        (["predict", adapter(finished), "--text", "x", "--generate", "0"], "generate must be >= 1"),
        (["predict", adapter(finished)], "give texts with --text or --file, or images with --image"),
        (["predict", ".", "--text", "x"], "adapter_dir: '.' is not an exported adapter"),
        (["predict", ".", "--file", "/no/such/file"], "file: cannot read"),
    ]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        captured = capsys.readouterr()
        assert len(captured.err.splitlines()) == 1 and expected in captured.err, (argv, captured.err)
        assert captured.err.startswith("decaf-train predict: error: ") and not captured.out


@pytest.mark.parametrize("device", ["tpu", "cuda:x", *(() if torch.cuda.is_available() else ("cuda",))])
def test_predict_device_mistakes_are_one_line(finished, device, capsys):
    assert main(["predict", adapter(finished), "--text", TEXTS[0], "--device", device]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("decaf-train predict: error: device")
    assert "Traceback" not in captured.err + captured.out


def test_max_len_above_the_models_positions(finished, tmp_path, capsys):
    """The tiny BERT has 32 positions: a larger --max-len is one line; an adapter copied out of its run keeps the
    run's max_len (its card)."""
    long_text = " ".join(["cat"] * 60)
    assert main(["predict", adapter(finished), "--text", long_text, "--max-len", "100"]) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == ["decaf-train predict: error: max_len: 100 exceeds the model's 32 positions"]
    shutil.copytree(adapter(finished), tmp_path / "copied")
    predictor = load_predictor(str(tmp_path / "copied"))
    assert predictor.task.max_len == finished.config.max_len and predictor.predict([long_text])[0].label in CLASSES


HUB_RUN = """
import json, sys
from peft import AutoPeftModelForSequenceClassification
from decaf_ext.config import TrainConfig
from decaf_ext.sim.trainer import Trainer
from decaf_ext.cli.predict import load_predictor
Trainer(TrainConfig(**json.loads(sys.argv[1]))).run()
adapter = sys.argv[2]
model = AutoPeftModelForSequenceClassification.from_pretrained(adapter)
print(json.dumps([model.config.id2label[i] for i in range(model.config.num_labels)]))
print(json.dumps(load_predictor(adapter).label_names))
"""


def test_an_adapter_of_a_hub_model_names_its_labels(tiny_paths, tmp_path):
    """A model given by hub id (here from a local hub cache, offline) gets a labelled base too."""
    import os
    import subprocess
    import sys

    snapshot = tmp_path / "hub" / "models--decaf-test--tiny-bert" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_paths[0], snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    config = tiny_config(tiny_paths, tmp_path / "run", model="decaf-test/tiny-bert", **LEAN)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1",
           "DECAF_CACHE": str(tmp_path / "cache"), "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-c", HUB_RUN, json.dumps(config.to_dict()),
                             str(tmp_path / "run" / "adapters" / "average")], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    names = sorted(CLASSES)
    assert result.stdout.splitlines()[-2:] == [json.dumps(names)] * 2
    assert AdapterCard.read(str(tmp_path / "run" / "adapters" / "average")).model == "decaf-test/tiny-bert"
    assert len(list((tmp_path / "cache" / "labelled").iterdir())) == 1


def test_the_examples_of_docs_predict_run_as_written(finished, finished_lm, finished_clip, clip_paths, capsys):
    """docs/predict.md's Python examples, with this module's adapters and images in place of runs/... and photos/."""
    images = images_of(clip_paths)
    places = {"runs/x/adapters/average": adapter(finished), "runs/lm/adapters/average": adapter(finished_lm),
              "runs/clip/adapters/average": adapter(finished_clip), "photos/cat.png": images[0],
              "photos/dog.png": images[1]}
    blocks = [b for b in re.findall(r"```python\n(.*?)```", DOCS.read_text(), re.S) if "load_predictor(" in b]
    assert len(blocks) == 3
    for block in blocks:
        for place, here in places.items():
            block = block.replace(f'"{place}"', repr(here))
        exec(block, {})
    lines = capsys.readouterr().out.splitlines()
    text = load_predictor(adapter(finished)).predict(["Shares rose after the bank's results.",
                                                      "The striker scored twice."])
    lm = load_predictor(adapter(finished_lm))
    clip = load_predictor(adapter(finished_clip)).predict(images[:2])
    assert lines == [*(f"{p.label} {round(p.score, 3)}" for p in text),
                     repr([(p.label, round(p.score, 3)) for p in lm.predict(["Shares rose after the results."])]),
                     repr(lm.generate(["Shares rose after the results."], 5)),
                     *(f"{p.label} {round(p.score, 3)}" for p in clip)]


def test_an_offline_alias_in_the_card_resolves(finished_clip, clip_paths, tmp_path, monkeypatch):
    """A card naming the alias tiny-clip (seeded: the same weights as this module's tiny CLIP folder) loads the
    alias's own folder, built in the cache, and predicts as the original."""
    monkeypatch.setenv("DECAF_CACHE", str(tmp_path / "cache"))
    shutil.copytree(adapter(finished_clip), tmp_path / "adapter")
    card = json.loads((tmp_path / "adapter" / "decaf_adapter.json").read_text())
    (tmp_path / "adapter" / "decaf_adapter.json").write_text(json.dumps({**card, "model": "tiny-clip"}))
    images = images_of(clip_paths)
    torch.testing.assert_close(load_predictor(str(tmp_path / "adapter")).probabilities(images),
                               load_predictor(adapter(finished_clip)).probabilities(images))
    assert (tmp_path / "cache").is_dir() and any((tmp_path / "cache").iterdir())


def test_a_task_without_a_predictor_says_so_in_one_line():
    from decaf_ext.config import TrainConfig
    from decaf_ext.errors import ConfigError
    from decaf_ext.tasks import Task
    from decaf_ext.tasks.text_classification import TextClassification

    class Silent(TextClassification):
        name = "silent"
        predictor = Task.predictor  # the interface's default: no predictor of its own

    with pytest.raises(ConfigError, match=r"^adapter_dir: the silent task cannot predict yet$"):
        Silent(TrainConfig()).predictor(None, ["a", "b"], torch.device("cpu"))
