"""What a loaded adapter predicts: a task's :class:`Predictor` turns inputs (texts, images) into class scores; the
base class batches them and names the class with the highest probability. A task hands its predictor out through
:meth:`~decaf_ext.tasks.base.Task.predictor`; :func:`decaf_ext.cli.predict.load_predictor` loads an exported
adapter and asks its task for one.

Example::

    predictor = load_predictor("runs/x/adapters/average")
    for prediction in predictor.predict(["Shares rose after the bank's results."]):
        print(prediction.label, prediction.score)      # business 0.93
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from decaf_ext.data.images import ImageDataset, decode_image
from decaf_ext.errors import ConfigError


@dataclass(frozen=True)
class Prediction:
    """label: the predicted class name; score: its probability among the classes (softmax of the class scores)."""

    label: str
    score: float


class Predictor(ABC):
    """A task's loaded model (`model`: peft model in eval mode on `device`) and what it needs to score inputs
    (`task`: the Task whose build_model made it, holding the tokenizer or processor; `label_names`)."""

    #: what one input is: "text" (a string) or "image" (an image file path or a PIL image)
    input_kind: ClassVar[str] = "text"

    def __init__(self, task: Any, model: nn.Module, label_names: list[str], device: torch.device) -> None:
        self.task, self.model, self.label_names, self.device = task, model, label_names, device

    @abstractmethod
    def scores(self, inputs: Sequence[Any]) -> torch.Tensor:
        """Class scores float [b, C] (logits or log-likelihoods; softmax gives the probabilities) of `inputs`."""

    @torch.no_grad()
    def probabilities(self, inputs: Sequence[Any], *, batch_size: int = 64) -> torch.Tensor:
        """float32 [n, C]: each class's probability for every input, `batch_size` inputs per forward pass."""
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        inputs = list(inputs)
        if not inputs:
            return torch.zeros(0, len(self.label_names))
        parts = [torch.softmax(self.scores(inputs[start:start + batch_size]).float().cpu(), dim=-1)
                 for start in range(0, len(inputs), batch_size)]
        return torch.cat(parts)

    def predict(self, inputs: Sequence[Any], *, batch_size: int = 64) -> list[Prediction]:
        """The most probable class of each input, with its probability."""
        best, label = self.probabilities(inputs, batch_size=batch_size).max(dim=-1)
        return [Prediction(self.label_names[i], float(p)) for p, i in zip(best.tolist(), label.tolist())]


class ImagePredictor(Predictor):
    """Images (files or PIL images) -> the task's class scores [b, C] (``task.logits(model, pixel_values)``),
    the images encoded and batched as the task trains on them."""

    input_kind = "image"

    def scores(self, images: Sequence[str | Image.Image]) -> torch.Tensor:
        images = [decode_image(image) for image in images]
        dataset = ImageDataset(images, np.arange(len(images)), np.zeros(len(images)), self.label_names)
        inputs, _ = self.task.batch(self.task.encode(dataset, np.arange(len(images))), torch.arange(len(images)),
                                    self.device)
        return self.task.logits(self.model, inputs["pixel_values"])
