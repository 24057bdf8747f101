"""A ``transformers.TrainerCallback`` that makes an existing Hugging Face ``Trainer`` + peft script
decentralized: one agent per process (launched with torchrun), communicating through
:class:`~decaf_ext.integrations.averager.DecentralizedAverager` after every optimizer step that is due.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.training_args import ParallelMode

from decaf_ext.integrations.averager import DecentralizedAverager

# torchrun's per-process variables: while they are set, Trainer (through accelerate) would train data-parallel
# with DDP, averaging gradients every step; each agent must train alone on its own data instead.
TORCHRUN_RANK_VARIABLES: tuple[str, ...] = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                                           "ROLE_RANK", "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE")


class DecentralizedCallback(TrainerCallback):
    """Decentralized LoRA fine-tuning for ``transformers.Trainer``: build it (before ``TrainingArguments``) from
    the peft model and pass it in ``callbacks``.

    Construction builds a :class:`DecentralizedAverager` (every keyword goes to it: algorithm, options,
    topology, period, warmup_steps, optimizer_state, round_timeout, run_key_file, norm_bound, ...), which joins
    the other agents through torchrun's store, then hides torchrun's rank variables from this process so that
    the Trainer trains this agent alone instead of data-parallel (the Trainer's own data is this agent's
    private data). On CUDA it selects the device cuda:LOCAL_RANK. After every optimizer step the averager
    communicates when due (``callback.averager.stats``: rounds, bytes sent, the last round's consensus
    statistics, fault events).

    Example::

        >>> model = get_peft_model(base, LoraConfig(r=8, target_modules=["query", "value"]))
        >>> callback = DecentralizedCallback(model, algorithm="decaf", topology="ring", period=3)
        >>> args = TrainingArguments("out", max_steps=300, per_device_train_batch_size=16)
        >>> Trainer(model=model, args=args, train_dataset=my_shard, callbacks=[callback]).train()
    """

    def __init__(self, model: nn.Module, **averager_options: Any) -> None:
        self.averager = DecentralizedAverager(model, **averager_options)
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        for name in TORCHRUN_RANK_VARIABLES:
            os.environ.pop(name, None)
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        if args.parallel_mode == ParallelMode.DISTRIBUTED:
            raise ValueError("args: the Trainer runs data-parallel (DDP); build DecentralizedCallback before "
                             "TrainingArguments so that every agent trains alone")

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    optimizer: torch.optim.Optimizer | None = None, **kwargs: Any) -> None:
        self.averager.step(optimizer)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        self.averager.close()
