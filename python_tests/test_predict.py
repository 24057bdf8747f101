"""Exported adapters: label names, loading with peft alone (the README snippet), ``decaf-train predict``."""

from __future__ import annotations

import contextlib
import io
import re
import shutil
from pathlib import Path

import pytest
import torch
from peft import AutoPeftModelForSequenceClassification

from decaf_ext.cli.commands import main
from decaf_ext.cli.predict import Classifier
from decaf_ext.sim.trainer import Trainer
from test_trainer import CLASSES, tiny_config, tiny_paths  # noqa: F401  (tiny_paths is a fixture)

README = Path(__file__).parents[1] / "README.md"
TEXTS = ["the cat and a dog", "red of blue", "rice with cheese and soup"]


@pytest.fixture(scope="module")
def finished(tiny_paths, tmp_path_factory) -> Trainer:
    """A finished 2-round decaf run on the tiny model and data."""
    trainer = Trainer(tiny_config(tiny_paths, tmp_path_factory.mktemp("predict") / "run"))
    trainer.run()
    return trainer


def expected_names(trainer: Trainer, texts: list[str]) -> list[str]:
    """What the trainer's own averaged model predicts for `texts` (max_len of the run)."""
    model = trainer.average_model().eval()
    inputs = trainer.agents.task.tokenizer(texts, truncation=True, max_length=trainer.config.max_len, padding=True,
                                    return_tensors="pt")
    with torch.no_grad():
        return [trainer.agents.label_names[i] for i in model(**inputs).logits.argmax(-1).tolist()]


def test_label_names_travel_with_the_run_and_the_adapters(finished, tmp_path, monkeypatch):
    import json

    summary = json.loads(Path(finished.run_dir, "summary.json").read_text())
    assert summary["label_names"] == sorted(CLASSES)
    monkeypatch.chdir(tmp_path)  # the adapter names its base by an absolute path
    model = AutoPeftModelForSequenceClassification.from_pretrained(str(Path(finished.run_dir, "adapters", "average")))
    assert model.config.id2label == dict(enumerate(sorted(CLASSES))) and model.config.num_labels == 3
    assert model.config.label2id == {name: i for i, name in enumerate(sorted(CLASSES))}
    inputs = finished.agents.task.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**inputs).logits, finished.average_model().eval()(**inputs).logits)


def test_readme_snippet_loads_an_exported_adapter(finished):
    """The README's peft snippet, run as written with the adapter folder of this run."""
    block = next(b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
                 if "AutoPeftModelForSequenceClassification" in b)
    code = re.sub(r'adapter = "[^"]*"', f'adapter = {str(Path(finished.run_dir, "adapters", "average"))!r}', block)
    code = re.sub(r"texts = \[.*?\]\n", f"texts = {TEXTS!r}\n", code, flags=re.S)
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        exec(code, {})
    assert output.getvalue().strip() == repr(expected_names(finished, TEXTS))


def test_predict_command_prints_label_names(finished, tmp_path, capsys):
    adapter = str(Path(finished.run_dir, "adapters", "average"))
    assert main(["predict", adapter, *(a for t in TEXTS for a in ("--text", t))]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"{name}\t{text}" for name, text in zip(expected_names(finished, TEXTS), TEXTS)]
    listing = tmp_path / "texts.txt"
    listing.write_text("\n".join(TEXTS) + "\n\n")
    assert main(["predict", adapter, "--file", str(listing)]) == 0
    assert capsys.readouterr().out.splitlines() == lines
    assert Classifier.load(adapter).max_len == finished.config.max_len  # from the run's config.json


@pytest.mark.parametrize("argv, expected", [
    (["predict", "."], "--text or a file with --file"),
    (["predict", ".", "--text", "x"], "adapter_dir: '.' is not an exported adapter"),
    (["predict", ".", "--file", "/no/such/file"], "file: cannot read"),
])
def test_predict_mistakes_are_one_line(argv, expected, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("decaf-train predict: error: ") and expected in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("device", ["tpu", "cuda:x", *(() if torch.cuda.is_available() else ("cuda",))])
def test_predict_device_mistakes_are_one_line(finished, device, capsys):
    adapter = str(Path(finished.run_dir, "adapters", "average"))
    assert main(["predict", adapter, "--text", TEXTS[0], "--device", device]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("decaf-train predict: error: device")
    assert "Traceback" not in captured.err + captured.out


def test_max_len_above_the_models_positions(finished, tmp_path, capsys):
    """The tiny BERT has 32 positions: a larger --max-len is one line; without a run's max_len (an adapter copied
    out of its run) the default 128 is cut to the model's 32."""
    adapter = Path(finished.run_dir, "adapters", "average")
    long_text = " ".join(["cat"] * 60)
    assert main(["predict", str(adapter), "--text", long_text, "--max-len", "100"]) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == ["decaf-train predict: error: max_len: 100 exceeds the model's 32 positions"]
    shutil.copytree(adapter, tmp_path / "copied")
    classifier = Classifier.load(str(tmp_path / "copied"))
    assert classifier.max_len == 32 and classifier.predict([long_text])[0] in CLASSES
