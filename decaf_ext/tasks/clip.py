"""Few-shot image classification with CLIP: class scores are the model's logit scale times the cosine similarity
between an image's embedding and the embedding of each class's name prompt ("a photo of a {}.").

LoRA goes on the query/key/value projections of the vision encoder, the text encoder or both
(``clip_lora_on``). When the text encoder carries LoRA, the prompts are embedded again at every training
step (their embeddings train) and once per evaluation; when it does not, they are embedded once and cached.
There is no new head: every trainable parameter is a LoRA factor.

No pretrained CLIP ships offline: the model alias ``tiny-clip`` is a small randomly initialized CLIP with a
character-level tokenizer, built in code, that checks the pipeline (not CLIP's accuracy), e.g. on
scikit-learn's digits (``--dataset digits``).
"""

from __future__ import annotations

import os
import re
import shutil
import string
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from peft import LoraConfig
from torch import nn
from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer

try:  # newer transformers name the Pillow backend (no torchvision needed, no fallback warning at import)
    from transformers import CLIPImageProcessorPil as CLIPImageProcessor
except ImportError:
    from transformers import CLIPImageProcessor

from decaf_ext.errors import ConfigError
from decaf_ext.data.images import ImageDataset, load_image_dataset, shots_per_class
from decaf_ext.tasks.base import Batch, Encoded, Task
from decaf_ext.tasks.predictor import ImagePredictor

TEMPLATES: dict[str, str] = {
    "flowers": "a photo of a {}, a type of flower.",
    "food": "a photo of {}, a type of food.",
    "actions": "a photo of a person doing {}.",
    "generic": "a photo of a {}.",
}
#: submodule of CLIPModel holding each encoder
ENCODER_MODULES: dict[str, str] = {"vision": "vision_model", "text": "text_model"}
ENCODE_CHUNK = 256  # images decoded and preprocessed at a time by encode()


def resolve_template(template: str) -> str:
    """A built-in template by name, or `template` itself if it holds exactly one '{}'; ConfigError otherwise."""
    if template in TEMPLATES:
        return TEMPLATES[template]
    if template.count("{}") != 1:
        raise ConfigError(f"prompt_template must be one of {', '.join(TEMPLATES)} or a string with one {{}} for "
                          f"the class name; got {template!r}")
    return template


def class_prompts(template: str, label_names: list[str]) -> list[str]:
    """One prompt per class: `template` (resolved) with '{}' replaced by the label name, '_' and '-' as spaces."""
    resolved = resolve_template(template)
    return [resolved.replace("{}", re.sub(r"[_-]+", " ", name).strip()) for name in label_names]


# -------------------------------------------------------------------------------------- tiny offline model

TINY_SEED = 0
TINY_IMAGE_SIZE = 32


def build_tiny_clip(folder: str | Path) -> None:
    """Save a small randomly initialized CLIP (2 layers, width 64, 32x32 images in 8x8 patches; seeded) and its
    processor (a character-level CLIPTokenizer: every lowercase letter, digit and punctuation mark is a
    token, so distinct class names give distinct prompts) into `folder`."""
    characters = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = {token: i for i, token in enumerate(
        ["<|startoftext|>", "<|endoftext|>", *characters, *(c + "</w>" for c in characters)])}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    image_processor = CLIPImageProcessor(size={"shortest_edge": TINY_IMAGE_SIZE},
                                         crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE})
    # initializer_factor 3: at CLIP's default init (1) the class token of a 2-layer random encoder barely sees the
    # image (cosine similarity of any two digits' embeddings > 0.96); at 3 they spread out (mean 0.63)
    layers = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  initializer_factor=3.0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1, **layers),
        vision_config=dict(image_size=TINY_IMAGE_SIZE, patch_size=8, **layers),
        projection_dim=64)
    with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
        torch.manual_seed(TINY_SEED)
        model = CLIPModel(config)
    model.save_pretrained(folder)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)


def tiny_clip_path() -> str:
    """Folder of the tiny CLIP, built once under $DECAF_CACHE (default ~/.cache/decaf_ext) and reused."""
    cache = Path(os.environ.get("DECAF_CACHE", Path.home() / ".cache" / "decaf_ext"))
    folder = cache / f"tiny-clip-v1-seed{TINY_SEED}"
    if not (folder / "config.json").exists():
        cache.mkdir(parents=True, exist_ok=True)
        temporary = tempfile.mkdtemp(prefix="tiny-clip-", dir=cache)
        build_tiny_clip(temporary)
        try:
            os.rename(temporary, folder)
        except OSError:  # another process built it first
            if not (folder / "config.json").exists():
                raise
            shutil.rmtree(temporary, ignore_errors=True)
    return str(folder)


# ------------------------------------------------------------------------------------------------- task


class CLIPClassification(Task):
    """Images -> one of the classes, scored against the class-name prompts; cross-entropy loss."""

    name = "clip"
    default_target_modules = ("q_proj", "k_proj", "v_proj")
    peft_task_type = None  # no head: every trainable parameter is a LoRA factor
    model_aliases = {"tiny-clip": tiny_clip_path}
    predict_options = ("max_len", "prompt_template", "clip_lora_on")

    def __init__(self, config) -> None:
        super().__init__(config)
        self.template = resolve_template(config.prompt_template)
        self.encoders = ["vision", "text"] if config.clip_lora_on == "both" else [config.clip_lora_on]
        self._cached_prompts: torch.Tensor | None = None  # [C, D] when the text encoder has no LoRA
        self._evaluation_prompts: torch.Tensor | None = None  # [C, D] during evaluate()

    def default_model(self) -> str:
        """The paper's CLIP ViT-B/16 (hub id; needs network access once)."""
        return "openai/clip-vit-base-patch16"

    # ------------------------------------------------------------------------------------------ data

    def load_data(self, source: str, *, test_fraction: float, seed: int) -> tuple[ImageDataset, ImageDataset]:
        """(train, test) of `source`; with ``shots_per_class`` K, train keeps K seeded images of every class."""
        train, test = load_image_dataset(source, test_fraction=test_fraction, seed=seed)
        shots, (max_train, _) = self.config.shots_per_class, self.config.caps()  # max_train None: all (0 too)
        if shots is None:
            return train, test
        try:
            train = train.subset(shots_per_class(train.labels, shots, seed))
        except ValueError as error:
            raise ConfigError(f"shots_per_class: {error}") from None
        if max_train is not None and max_train < len(train):
            raise ConfigError(f"max_train: {max_train} would keep only part of the {len(train)} images that "
                              f"shots_per_class={shots} selects (pass --max-train none)")
        return train, test

    def build_model(self, model_path: str, label_names: list[str]) -> nn.Module:
        """CLIPModel and CLIPProcessor from `model_path`; the class prompts are tokenized once."""
        self.processor = CLIPProcessor.from_pretrained(model_path)
        model = CLIPModel.from_pretrained(model_path)
        positions = model.config.text_config.max_position_embeddings
        if self.max_len > positions:
            raise ConfigError(f"max_len: {self.max_len} exceeds the text encoder's {positions} positions")
        tokens = self.processor.tokenizer(class_prompts(self.template, label_names), padding=True, truncation=True,
                                          max_length=self.max_len, return_tensors="pt")
        self.prompt_tokens = {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}
        self.linear_names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
        image_processor = self.processor.image_processor
        self.pixel_scale = float(image_processor.rescale_factor)
        self.pixel_mean = torch.tensor(image_processor.image_mean).reshape(1, -1, 1, 1)
        self.pixel_std = torch.tensor(image_processor.image_std).reshape(1, -1, 1, 1)
        return model

    def lora_config(self, rank: int, lora_alpha: float, lora_dropout: float,
                    target_modules: list[str] | None) -> LoraConfig:
        """LoRA on the modules named `target_modules` (suffixes, default q/k/v_proj) inside the chosen encoders,
        as one regular expression; ConfigError if a target matches no linear module of a chosen encoder."""
        targets = list(target_modules or self.default_target_modules)
        prefixes = [ENCODER_MODULES[encoder] for encoder in self.encoders]
        for encoder, prefix in zip(self.encoders, prefixes):
            for target in targets:
                if not any(name.startswith(prefix + ".") and name.endswith("." + target) for name in self.linear_names):
                    raise ConfigError(f"target_modules: {target!r} matches no linear module of the {encoder} "
                                      f"encoder ({prefix}; clip_lora_on={self.config.clip_lora_on})")
        pattern = rf"(?:{'|'.join(prefixes)})\..*\.(?:{'|'.join(map(re.escape, targets))})"
        return LoraConfig(r=rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=pattern)

    def encode(self, dataset: ImageDataset, indices: np.ndarray) -> Encoded:
        """Images resized and center-cropped by the processor, kept unnormalized: pixel_values uint8 [n, 3, H, W]
        (normalized per batch); labels int64 [n]."""
        chunks = []
        for start in range(0, len(indices), ENCODE_CHUNK):
            images = [dataset.image(i) for i in indices[start:start + ENCODE_CHUNK]]
            pixels = self.processor.image_processor(images=images, do_rescale=False, do_normalize=False,
                                                    return_tensors="pt")["pixel_values"]
            chunks.append(pixels if pixels.dtype == torch.uint8 else pixels.float())
        return Encoded(inputs={"pixel_values": torch.cat(chunks)},
                       labels=torch.as_tensor(dataset.labels[indices], dtype=torch.int64))

    def batch(self, encoded: Encoded, indices: torch.Tensor, device: torch.device) -> Batch:
        """pixel_values float32 [b, 3, H, W], rescaled and normalized as the processor does; labels int64 [b]."""
        inputs, labels = super().batch(encoded, indices, device)
        pixels = inputs["pixel_values"].float() * self.pixel_scale
        pixels = (pixels - self.pixel_mean.to(device)) / self.pixel_std.to(device)
        return {"pixel_values": pixels}, labels

    # ---------------------------------------------------------------------------------------- scores

    @property
    def text_trains(self) -> bool:
        """Whether the text encoder carries LoRA (then the prompt embeddings change with training)."""
        return "text" in self.encoders

    def prompt_embeddings(self, model: nn.Module) -> torch.Tensor:
        """Unit-norm prompt embeddings [C, D]: recomputed (with gradients) when the text encoder carries LoRA,
        else computed once in eval mode and cached (the frozen text encoder is shared by every agent)."""
        if self._evaluation_prompts is not None:
            return self._evaluation_prompts
        if self.text_trains:
            return self._embed_prompts(model)
        if self._cached_prompts is None:
            with torch.no_grad(), _eval_mode(model):
                self._cached_prompts = self._embed_prompts(model)
        return self._cached_prompts

    def _embed_prompts(self, model: nn.Module) -> torch.Tensor:
        device = model.logit_scale.device
        tokens = {k: v.to(device) for k, v in self.prompt_tokens.items()}
        return nn.functional.normalize(model.get_text_features(**tokens).pooler_output, dim=-1)

    def logits(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """[b, C]: logit_scale.exp() times the cosine similarity of each image to each class prompt."""
        images = nn.functional.normalize(model.get_image_features(pixel_values=pixel_values).pooler_output, dim=-1)
        return model.logit_scale.exp() * images @ self.prompt_embeddings(model).T

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        inputs, labels = batch
        return nn.functional.cross_entropy(self.logits(model, inputs["pixel_values"]), labels)

    def predict(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.logits(model, inputs["pixel_values"]).argmax(dim=-1)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, encoded: Encoded, **options) -> dict[str, float]:
        """As Task.evaluate, with the prompts embedded once (in eval mode) for the whole evaluation."""
        with _eval_mode(model):
            self._evaluation_prompts = self.prompt_embeddings(model)
        try:
            return super().evaluate(model, encoded, **options)
        finally:
            self._evaluation_prompts = None

    def describe(self, label_names: list[str]) -> dict[str, Any]:
        """The prompt of each class."""
        return {"class_prompts": class_prompts(self.template, label_names)}

    def predictor(self, model: nn.Module, label_names: list[str], device: torch.device) -> ImagePredictor:
        return ImagePredictor(self, model, label_names, device)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """`model` in eval mode inside, its previous mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
