"""An exported adapter's card, ``decaf_adapter.json``: what is needed to use the adapter alone, next to peft's own
``adapter_config.json`` (which holds the LoRA rank, alpha and target modules) and ``adapter_model.safetensors``.

The card names the task, the class names (in label-id order), the base model as the run named it (a hub id, a
local folder, an offline alias such as ``gemma3-270m``, or null for the task's offline default), the task's
prediction options (the run's ``max_len``, causal-LM template and label words, CLIP prompt template, ...) and,
for people, what those options mean (the template text, the class prompts). It holds no path of the run folder,
so an adapter, or the whole run, may be copied or moved.

Example::

    >>> card = AdapterCard(task="clip", label_names=["cat", "dog"], model="tiny-clip",
    ...                    options={"max_len": 32, "prompt_template": "generic"})
    >>> card.write("runs/r/adapters/average")
    >>> AdapterCard.read("runs/r/adapters/average").label_names     # ['cat', 'dog']
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from decaf_ext.errors import ConfigError

CARD = "decaf_adapter.json"
ADAPTER_CONFIG = "adapter_config.json"
FORMAT = 1


@dataclass(frozen=True)
class AdapterCard:
    """task: a key of decaf_ext.tasks.TASKS; label_names: one per label id; model: the run's ``model`` option
    (None: the task's default); options: TrainConfig fields the task's predictor reads; described: the options
    spelled out for people (not read back)."""

    task: str
    label_names: list[str]
    model: str | None
    options: dict[str, Any] = field(default_factory=dict)
    described: dict[str, Any] = field(default_factory=dict)

    def write(self, folder: str) -> None:
        """Write ``folder/decaf_adapter.json`` (the folder exists: peft's save_pretrained made it)."""
        with open(os.path.join(folder, CARD), "w", encoding="utf-8") as handle:
            json.dump({"format": FORMAT, **asdict(self)}, handle, indent=1)

    @classmethod
    def read(cls, folder: str) -> AdapterCard:
        """The card of the exported adapter `folder`; ConfigError (one line naming `adapter_dir`) when the folder
        is not a peft adapter, was not exported by decaf_ext, or its card is damaged."""
        where = f"adapter_dir: {folder!r}"
        if not os.path.isdir(folder):
            raise ConfigError(f"{where} is not a folder")
        if not os.path.isfile(os.path.join(folder, ADAPTER_CONFIG)):
            raise ConfigError(f"{where} is not an exported adapter (no {ADAPTER_CONFIG})")
        path = os.path.join(folder, CARD)
        if not os.path.isfile(path):
            raise ConfigError(f"{where} holds a peft adapter without {CARD} (exported by another library or an "
                              "older decaf_ext); load it with peft")
        try:
            with open(path, encoding="utf-8") as handle:
                values = json.load(handle)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
            raise ConfigError(f"{where}: its {CARD} is damaged ({type(error).__name__})") from None
        try:
            card = cls(task=values["task"], label_names=values["label_names"], model=values["model"],
                       options=values.get("options", {}), described=values.get("described", {}))
        except (TypeError, KeyError) as error:
            raise ConfigError(f"{where}: its {CARD} is damaged (missing or wrong {error})") from None
        if values.get("format") != FORMAT:
            raise ConfigError(f"{where}: its {CARD} has format {values.get('format')!r}, this version reads {FORMAT}")
        if not (isinstance(card.task, str) and isinstance(card.options, dict) and isinstance(card.label_names, list)
                and card.label_names and all(isinstance(n, str) for n in card.label_names)
                and (card.model is None or isinstance(card.model, str))):
            raise ConfigError(f"{where}: its {CARD} is damaged (task, label_names, model or options of the wrong "
                              "type)")
        return card
