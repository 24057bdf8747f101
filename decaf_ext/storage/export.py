"""Exported adapters that load on their own and name their labels.

A peft adapter records the folder of its base model. The base model's own ``config.json`` knows nothing of a
run's classes, so ``AutoPeftModelForSequenceClassification.from_pretrained(adapter_dir)`` would build a 2-way
head and fail on the run's head. :func:`labelled_base` therefore writes, next to the adapters, a base folder
whose ``config.json`` is the base model's with the run's ``id2label`` / ``label2id`` / ``num_labels``; every
other file (weights, tokenizer) is a symbolic link to the original, so it costs no disk space.
"""

from __future__ import annotations

import os
import shutil

from torch import nn


def labelled_base(model_path: str, model_config, folder: str) -> str | None:
    """Write `folder` (config.json from `model_config`, links to the other files of `model_path`); returns its
    absolute path, or None when `model_path` is not a local folder with a config.json (a hub id, a GGUF file)."""
    if not os.path.isfile(os.path.join(model_path, "config.json")):
        return None
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(model_path):
        source = os.path.join(os.path.abspath(model_path), name)
        if name != "config.json" and os.path.isfile(source):
            os.symlink(source, os.path.join(folder, name))
    model_config.save_pretrained(folder)
    return os.path.abspath(folder)


def set_label_names(model_config, label_names: list[str]) -> None:
    """Name the classes of a model's config (id2label, label2id; num_labels follows)."""
    model_config.id2label = dict(enumerate(label_names))
    model_config.label2id = {name: i for i, name in enumerate(label_names)}


def export_adapter(model: nn.Module, folder: str, base: str | None) -> None:
    """Save `model`'s peft adapter into `folder`, recording `base` (when given) as its base model folder."""
    if base is not None:
        for peft_config in model.peft_config.values():
            peft_config.base_model_name_or_path = base
    shutil.rmtree(folder, ignore_errors=True)
    model.save_pretrained(folder, save_embedding_layers=False)  # LoRA never touches the embeddings
