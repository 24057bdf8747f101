"""Task interface: everything that depends on the kind of model and data lives behind :class:`Task`.

A task loads its data, builds the pretrained model and the LoRA config, encodes examples once into tensors,
and defines the loss and the predictions. The trainer, strategies and topologies never look inside.
Adding a task (CLIP few-shot, ...) means one new file in this package and one entry
in :data:`TASKS`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Protocol

import numpy as np
import torch
from peft import LoraConfig
from torch import nn

from decaf_ext.errors import ConfigError
from decaf_ext.storage.adapter_card import AdapterCard
from decaf_ext.tasks.predictor import Predictor


class LabeledDataset(Protocol):
    """What the trainer needs from a task's dataset: int64 labels [n] and one name per class."""

    labels: np.ndarray
    label_names: list[str]

    def __len__(self) -> int: ...


@dataclass
class Encoded:
    """Examples encoded once: model inputs with the example index first ([n, ...]) and labels int64 [n]."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]


Batch = tuple[dict[str, torch.Tensor], torch.Tensor]  # (model inputs [b, ...], labels int64 [b])


class Task(ABC):
    """One kind of fine-tuning problem. Subclasses set the class attributes and implement the abstract methods."""

    name: ClassVar[str]
    default_target_modules: ClassVar[tuple[str, ...]]
    peft_task_type: ClassVar[str]
    #: short model names accepted by ``--model`` (alias -> function returning a local folder or hub id)
    model_aliases: ClassVar[dict[str, Callable[[], str]]] = {}
    #: TrainConfig fields the task reads to predict: written to an exported adapter's card, read back to predict
    predict_options: ClassVar[tuple[str, ...]] = ("max_len",)
    #: whether the model's config names the classes (a classification head): its adapters name a labelled base
    labels_in_config: ClassVar[bool] = False
    #: True when the loss is a mean of per-example losses and examples never meet in the forward pass, so that
    #: DP-SGD's per-sample gradients bound one example's influence (``--dp-epsilon``, docs/privacy.md)
    dp_sgd: ClassVar[bool] = False

    def __init__(self, config: Any) -> None:
        self.config = config
        self.max_len = config.max_len

    @abstractmethod
    def default_model(self) -> str:
        """Folder (or hub id) of the model used when ``config.model`` is not given (the task's offline default)."""

    def resolve_model(self, name: str | None) -> str:
        """The folder or hub id for ``--model NAME``: the default when None, an alias resolved, else `name`."""
        if name is None:
            return self.default_model()
        if name in self.model_aliases:
            return self.model_aliases[name]()
        return name

    @abstractmethod
    def load_data(self, source: str, *, test_fraction: float, seed: int) -> tuple[LabeledDataset, LabeledDataset]:
        """(train, test) datasets from `source`."""

    @abstractmethod
    def build_model(self, model_path: str, label_names: list[str]) -> nn.Module:
        """The pretrained model with a fresh head for `label_names` (also loads any tokenizer/processor it needs)."""

    def default_targets(self, model: nn.Module) -> list[str]:
        """LoRA target modules of `model` when the user names none (default: ``default_target_modules``)."""
        return list(self.default_target_modules)

    def lora_config(self, rank: int, lora_alpha: float, lora_dropout: float,
                    target_modules: list[str] | None) -> LoraConfig:
        """peft LoRA config; the task type makes peft keep the new head trainable (``modules_to_save``)."""
        return LoraConfig(r=rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                          target_modules=list(target_modules or self.default_target_modules),
                          task_type=self.peft_task_type)

    @abstractmethod
    def encode(self, dataset: LabeledDataset, indices: np.ndarray) -> Encoded:
        """Encode the examples `indices` of `dataset` (once, before training)."""

    def batch(self, encoded: Encoded, indices: torch.Tensor, device: torch.device) -> Batch:
        """Examples `indices` (int64 [b]) of `encoded`, on `device`."""
        return ({k: v[indices].to(device) for k, v in encoded.inputs.items()}, encoded.labels[indices].to(device))

    @abstractmethod
    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Scalar training loss of `model` on `batch`."""

    @abstractmethod
    def predict(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Predicted class ids int64 [b]."""

    def describe(self, label_names: list[str]) -> dict[str, Any]:
        """The prediction options spelled out for people (template text, class prompts), for the adapter's card."""
        return {}

    def card(self, label_names: list[str]) -> AdapterCard:
        """What an exported adapter of this task needs to be used alone (see :mod:`decaf_ext.storage.adapter_card`)."""
        return AdapterCard(task=self.name, label_names=list(label_names), model=self.config.model,
                           options={name: getattr(self.config, name) for name in self.predict_options},
                           described=self.describe(label_names))

    def predictor(self, model: nn.Module, label_names: list[str], device: torch.device) -> Predictor:
        """The predictor of a loaded adapter `model` (built by :meth:`build_model`, adapter loaded, on `device`, in
        eval mode): what ``decaf-train predict`` and ``load_predictor`` hand back. A task without one says so."""
        raise ConfigError(f"adapter_dir: the {self.name} task cannot predict yet")

    @torch.no_grad()
    def evaluate(self, model: nn.Module, encoded: Encoded, *, batch_size: int, device: torch.device,
                 n_classes: int) -> dict[str, float]:
        """Accuracy and macro-F1 of `model` on all of `encoded`, in eval mode, `batch_size` examples at a time."""
        predicted = self.predictions(model, encoded, batch_size=batch_size, device=device)
        return classification_metrics(predicted, encoded.labels.numpy(), n_classes)

    def predictions(self, model: nn.Module, encoded: Encoded, *, batch_size: int, device: torch.device
                    ) -> np.ndarray:
        """The class `model` predicts for each example of `encoded` [len(encoded)], in eval mode, `batch_size`
        examples at a time."""
        was_training = model.training
        model.eval()
        predictions = []
        for start in range(0, len(encoded), batch_size):
            inputs, _ = self.batch(encoded, torch.arange(start, min(start + batch_size, len(encoded))), device)
            predictions.append(self.predict(model, inputs).cpu())
        model.train(was_training)
        return torch.cat(predictions).numpy()


def classification_metrics(predicted: np.ndarray, labels: np.ndarray, n_classes: int) -> dict[str, float]:
    """Accuracy and macro-F1 (F1 averaged over the classes that occur in `labels` or `predicted`)."""
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    true_positive = np.diag(confusion).astype(np.float64)
    support, predicted_count = confusion.sum(axis=1), confusion.sum(axis=0)
    present = (support + predicted_count) > 0
    f1 = 2 * true_positive[present] / (support[present] + predicted_count[present])
    return {"accuracy": float(true_positive.sum() / max(len(labels), 1)),
            "macro_f1": float(f1.mean()) if present.any() else 0.0}
