"""Predictions of an exported text-classification adapter, as label names (``decaf-train predict``).

Example::

    classifier = Classifier.load("runs/x/adapters/average")
    classifier.predict(["Shares rose after the bank's results."])    # ['business']
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch
from torch import nn

from decaf_ext.device import check_device
from decaf_ext.errors import ConfigError, first_line
from decaf_ext.quiet import quiet_transformers

DEFAULT_MAX_LEN = 128


def _run_max_len(adapter_dir: str) -> int | None:
    """max_len of the run an adapter was exported from (RUN/adapters/NAME -> RUN/config.json), if known."""
    path = os.path.join(adapter_dir, os.pardir, os.pardir, "config.json")
    try:
        with open(path, encoding="utf-8") as handle:
            return int(json.load(handle)["max_len"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


@dataclass
class Classifier:
    """A loaded adapter (peft model on its base), its tokenizer, its label names and the token budget."""

    model: nn.Module
    tokenizer: object
    label_names: list[str]
    max_len: int
    device: torch.device

    @classmethod
    def load(cls, adapter_dir: str, *, device: str = "auto", max_len: int | None = None) -> Classifier:
        """Load `adapter_dir` (an exported adapter folder) with peft's AutoPeftModelForSequenceClassification.

        max_len: tokens per text (default: the run's max_len, else 128, at most the model's positions).
        ConfigError (one line) when the folder is not an exported adapter, its base model cannot be loaded or
        max_len exceeds the model's positions.
        """
        from peft import AutoPeftModelForSequenceClassification
        from transformers import AutoTokenizer

        from decaf_ext.device import resolve_device

        config_path = os.path.join(adapter_dir, "adapter_config.json")
        if not os.path.isfile(config_path):
            raise ConfigError(f"adapter_dir: {adapter_dir!r} is not an exported adapter (no adapter_config.json)")
        if max_len is not None and max_len < 1:
            raise ConfigError(f"max_len must be >= 1, got {max_len}")
        check_device(device)
        target = resolve_device(device)
        try:
            with quiet_transformers():
                model = AutoPeftModelForSequenceClassification.from_pretrained(adapter_dir)
                tokenizer = AutoTokenizer.from_pretrained(model.peft_config["default"].base_model_name_or_path)
        except (OSError, ValueError, RuntimeError) as error:
            raise ConfigError(f"adapter_dir: cannot load the adapter in {adapter_dir!r} "
                              f"({first_line(error)})") from None
        config = model.get_base_model().config
        names = [config.id2label[i] for i in range(config.num_labels)]
        positions = getattr(config, "max_position_embeddings", None) or math.inf
        if max_len is not None and max_len > positions:
            raise ConfigError(f"max_len: {max_len} exceeds the model's {positions} positions")
        max_len = max_len or _run_max_len(adapter_dir) or min(DEFAULT_MAX_LEN, positions)
        return cls(model.to(target).eval(), tokenizer, names, max_len, target)

    @torch.no_grad()
    def predict(self, texts: list[str], *, batch_size: int = 64) -> list[str]:
        """The label name predicted for each of `texts`."""
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        names = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(texts[start:start + batch_size], truncation=True, max_length=self.max_len,
                                   padding=True, return_tensors="pt").to(self.device)
            names += [self.label_names[i] for i in self.model(**batch).logits.argmax(dim=-1).tolist()]
        return names
