"""Predictions of an exported adapter of any task (``decaf-train predict``, :func:`load_predictor`).

The adapter's card (``decaf_adapter.json``, :mod:`decaf_ext.storage.adapter_card`) names its task, classes, base
model and prediction options; the task builds its model as in training, the adapter is loaded onto it with peft,
and the task hands out its :class:`~decaf_ext.tasks.predictor.Predictor` (:meth:`Task.predictor`).

Example::

    predictor = load_predictor("runs/x/adapters/average")
    predictor.predict(["Shares rose after the bank's results."])    # [Prediction(label='business', score=0.93)]
"""

from __future__ import annotations

import os
import sys
from argparse import Namespace
from typing import Any

from decaf_ext.config import TrainConfig
from decaf_ext.data.images import IMAGE_SUFFIXES, decode_image
from decaf_ext.device import check_device, resolve_device
from decaf_ext.errors import ConfigError, first_line
from decaf_ext.quiet import quiet_transformers
from decaf_ext.storage.adapter_card import CARD, AdapterCard
from decaf_ext.storage.export import set_label_names
from decaf_ext.tasks import TASKS, get_task
from decaf_ext.tasks.predictor import Predictor


def load_predictor(adapter_dir: str, *, device: str = "auto", max_len: int | None = None) -> Predictor:
    """The predictor of the exported adapter `adapter_dir` (any task), on `device` (cpu, cuda, cuda:N, auto).

    max_len: tokens per input (default: the run's). ConfigError (one line) when the folder is not an adapter
    exported by decaf_ext, is damaged, or its base model cannot be found.
    """
    from peft import PeftModel
    from safetensors import SafetensorError

    card = AdapterCard.read(adapter_dir)
    if card.task not in TASKS:
        raise ConfigError(f"adapter_dir: {adapter_dir!r} holds an adapter of the task {card.task!r}, which this "
                          f"version does not know ({', '.join(TASKS)})")
    if max_len is not None and max_len < 1:
        raise ConfigError(f"max_len must be >= 1, got {max_len}")
    check_device(device)
    target = resolve_device(device)
    options = {**card.options, **({} if max_len is None else {"max_len": max_len})}
    config = TrainConfig.from_dict({**options, "task": card.task, "model": card.model},
                                   source=os.path.join(adapter_dir, CARD))
    task = get_task(config)
    path = task.resolve_model(card.model)
    try:
        with quiet_transformers():
            base = task.build_model(path, card.label_names)
            if task.labels_in_config:
                set_label_names(base.config, card.label_names)
            model = PeftModel.from_pretrained(base, adapter_dir)
    except ConfigError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as error:
        raise ConfigError(f"adapter_dir: {adapter_dir!r}: cannot load the adapter onto its base model {path!r} "
                          f"({first_line(error)})") from None
    return task.predictor(model.to(target).eval(), card.label_names, target)


# ------------------------------------------------------------------------------------------ the command


def read_texts(args: Namespace) -> list[str]:
    """--text values, or the non-empty lines of --file ('-': standard input); ConfigError when there are none."""
    if args.file is None:
        return list(args.text)
    try:
        handle = sys.stdin if args.file == "-" else open(args.file, encoding="utf-8")
        with handle:
            texts = [line.rstrip("\n") for line in handle if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"file: cannot read {args.file!r} ({getattr(error, 'strerror', None) or error.reason})"
                          ) from None
    if not texts:
        raise ConfigError(f"file: {args.file!r} holds no texts (one per line)")
    return texts


def read_images(paths: list[str]) -> list[tuple[str, Any]]:
    """(file, RGB PIL image) for every --image: a file, or every image file (by suffix) directly in a folder, in
    name order; ConfigError naming the file that cannot be decoded, or a folder without images."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(os.path.join(path, name) for name in os.listdir(path)
                           if not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES))
            if not found:
                raise ConfigError(f"image: the folder {path!r} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
            files += found
        else:
            files.append(path)
    return [(file, decode_image(file)) for file in files]


def predict_lines(args: Namespace) -> list[str]:
    """The output of ``decaf-train predict``: per input, label TAB probability TAB input (or, with --generate,
    input TAB continuation); the inputs are read and checked before the model loads."""
    if sum(map(bool, (args.text, args.file, args.image))) != 1:
        raise ConfigError("predict: give texts with --text or --file, or images with --image (one of the three)")
    if args.generate is not None and args.generate < 1:
        raise ConfigError(f"generate must be >= 1 tokens, got {args.generate}")
    named = read_images(args.image) if args.image else [(text, text) for text in read_texts(args)]
    predictor = load_predictor(args.adapter_dir, device=args.device, max_len=args.max_len)
    wanted = "image" if args.image else "text"
    if predictor.input_kind != wanted:
        flags = "--image" if predictor.input_kind == "image" else "--text or --file"
        raise ConfigError(f"predict: {args.adapter_dir!r} reads {predictor.input_kind}s, not {wanted}s (give them "
                          f"with {flags})")
    inputs = [item for _, item in named]
    if args.generate is not None:
        if not hasattr(predictor, "generate"):
            raise ConfigError(f"generate: {args.adapter_dir!r} is not a causal language model's adapter")
        size = max(args.batch_size, 1)
        texts = [text for start in range(0, len(inputs), size)
                 for text in predictor.generate(inputs[start:start + size], args.generate)]
        return [f"{name}\t{text}" for (name, _), text in zip(named, texts)]
    predictions = predictor.predict(inputs, batch_size=args.batch_size)
    return [f"{p.label}\t{p.score:.4f}\t{name}" for (name, _), p in zip(named, predictions)]
