"""Task plug-ins: what depends on the kind of model and data (loading, model, LoRA targets, batches, loss,
evaluation). The interface is :class:`~decaf_ext.tasks.base.Task`; a new task is one new file here and one
entry in :data:`TASKS`.

Example::

    >>> task = get_task(TrainConfig(task="text_classification"))
"""

from __future__ import annotations

from typing import Any

from decaf_ext.tasks.base import Batch, Encoded, Task, classification_metrics
from decaf_ext.tasks.causal_lm import CausalLM
from decaf_ext.tasks.clip import CLIPClassification
from decaf_ext.tasks.image_classification import ImageClassification
from decaf_ext.tasks.text_classification import TextClassification

#: task name -> Task class
TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (TextClassification, CausalLM, CLIPClassification,
                                                             ImageClassification)}

__all__ = ["TASKS", "Batch", "Encoded", "Task", "classification_metrics", "get_task"]


def get_task(config: Any) -> Task:
    """The task named by ``config.task`` (a key of TASKS) of a :class:`~decaf_ext.config.TrainConfig`, reading
    its options from `config`."""
    if config.task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}; got {config.task!r}")
    return TASKS[config.task](config)
