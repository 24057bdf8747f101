"""Exported adapters that load on their own: peft's files, the adapter's card (:mod:`adapter_card`) and, for a
task whose model config names the classes (a classification head), a labelled base model folder.

A peft adapter records the folder of its base model. The base model's own ``config.json`` knows nothing of a
run's classes, so ``AutoPeftModelForSequenceClassification.from_pretrained(adapter_dir)`` would build a 2-way
head and fail on the run's head. :func:`labelled_base` therefore writes, in the cache folder (``$DECAF_CACHE``,
default ``~/.cache/decaf_ext``, under ``labelled/``), a base folder whose ``config.json`` is the base model's
with the run's ``id2label`` / ``label2id`` / ``num_labels``; every other entry is a symbolic link to the
original (a local folder, or a hub model's local snapshot), so it costs no disk space. It lies outside the run
folder, so a run may be moved or copied; ``decaf-train predict`` reads the card, not that folder, and works
wherever the base model itself can be found.

Example::

    >>> save_adapter(model, "out/adapter", task="text_classification", label_names=["neg", "pos"])
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile

from torch import nn

from decaf_ext.tasks.base import Task
from decaf_ext.tasks.model_cache import cache_root

LABELLED = "labelled"  # folder of the labelled bases in the cache


def local_model_folder(model_path: str) -> str | None:
    """The local folder of `model_path`: itself when it holds a config.json, else the local snapshot of the hub
    model it names (no network); None when there is neither (a GGUF file, a model never downloaded)."""
    if os.path.isfile(os.path.join(model_path, "config.json")):
        return os.path.abspath(model_path)
    if os.path.isabs(model_path) or model_path.startswith((".", "~")):
        return None
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(model_path, local_files_only=True)
    except (OSError, ValueError):
        return None
    return folder if os.path.isfile(os.path.join(folder, "config.json")) else None


def labelled_base(model_path: str, model_config) -> str | None:
    """The cache folder holding config.json from `model_config` and links to the other entries of `model_path`'s
    local folder (made once, atomically; named by the model and a hash of both); None when `model_path` has no
    local folder."""
    source = local_model_folder(model_path)
    if source is None:
        return None
    text = model_config.to_json_string()
    digest = hashlib.sha256(f"{source}\0{text}".encode()).hexdigest()[:16]
    folder = os.path.join(cache_root(), LABELLED, f"{os.path.basename(source.rstrip(os.sep))}-{digest}")
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    temporary = tempfile.mkdtemp(prefix=".labelled-", dir=os.path.dirname(folder))
    try:
        for name in os.listdir(source):
            if name != "config.json":
                os.symlink(os.path.join(source, name), os.path.join(temporary, name))
        model_config.save_pretrained(temporary)
        os.rename(temporary, folder)
    except OSError:
        if not os.path.isfile(os.path.join(folder, "config.json")):  # else another process made it first
            raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return folder


def set_label_names(model_config, label_names: list[str]) -> None:
    """Name the classes of a model's config (id2label, label2id; num_labels follows)."""
    model_config.id2label = dict(enumerate(label_names))
    model_config.label2id = {name: i for i, name in enumerate(label_names)}


def export_adapter(model: nn.Module, folder: str, task: Task, label_names: list[str], model_path: str) -> None:
    """Save `model`'s peft adapter into `folder` with its card (:meth:`Task.card`); for a task whose config names
    the classes, the adapter names the labelled base of `model_path` (the folder or hub id it was loaded from)."""
    base = labelled_base(model_path, model.get_base_model().config) if task.labels_in_config else None
    for peft_config in model.peft_config.values():
        peft_config.base_model_name_or_path = base or model_path
    shutil.rmtree(folder, ignore_errors=True)
    model.save_pretrained(folder, save_embedding_layers=False)  # LoRA never touches the embeddings
    task.card(label_names).write(folder)


def save_adapter(model: nn.Module, folder: str, *, task: str, label_names: list[str], model_path: str | None = None,
                 **options) -> None:
    """Export the peft model `model` trained in your own loop (:class:`~decaf_ext.integrations.DecentralizedAverager`)
    as a run exports its adapters, so that ``decaf-train predict folder`` and ``AutoPeftModelFor...`` load it.

    task: a key of decaf_ext.tasks.TASKS; label_names: one per label id; model_path: the base model's folder,
    hub id or alias (default: the one peft recorded); options: the TrainConfig fields the task predicts with
    (max_len, template, label_words, prompt_template, ...; the defaults otherwise).

    Example::

        >>> save_adapter(model, "out/adapter", task="causal_lm", label_names=["no", "yes"], template="yesno_qa",
        ...              max_len=256)
    """
    from decaf_ext.config import TrainConfig
    from decaf_ext.tasks import get_task

    recorded = next(iter(model.peft_config.values())).base_model_name_or_path
    config = TrainConfig(task=task, model=model_path or recorded, **options)
    config.validate()
    plugin = get_task(config)
    if plugin.labels_in_config:
        set_label_names(model.get_base_model().config, list(label_names))
    export_adapter(model, folder, plugin, list(label_names), plugin.resolve_model(config.model))
