"""TensorBoard event files of a run's evaluation records (``torch.utils.tensorboard``; optional extra)."""

from __future__ import annotations

from typing import Any

from decaf_ext.errors import ConfigError

SCALARS: dict[str, str] = {  # TensorBoard tag -> metrics record key
    "accuracy/agents_mean": "acc_mean",
    "accuracy/agents_std": "acc_std",
    "accuracy/averaged_model": "avg_model_acc",
    "macro_f1/agents_mean": "macro_f1_mean",
    "loss/train": "train_loss",
    "consensus_error": "consensus_error",
    "mechanism/mixing_error": "mixing_error",
    "mechanism/effective_rank": "effective_rank",
    "bytes/sent_total": "bytes_sent",
}


class TensorBoardLog:
    """Writes every record's scalars at step = its round into `folder` (a value that is None, such as the training
    loss of round 0, is left out), plus ``bytes/per_round`` (bytes sent since the previous record over the rounds
    between them). previous: the last record already logged (resuming)."""

    def __init__(self, folder: str, previous: dict[str, Any] | None = None) -> None:
        self.writer = self.writer_class()(folder)
        self.last_round = previous["round"] if previous else 0
        self.last_bytes = previous["bytes_sent"] if previous else 0

    @staticmethod
    def writer_class() -> type:
        """``torch.utils.tensorboard.SummaryWriter``; ConfigError naming tensorboard if the package is missing."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("tensorboard: needs the tensorboard package (pip install tensorboard, or "
                              "decaf_ext[tensorboard])") from None
        return SummaryWriter

    def write(self, record: dict[str, Any]) -> None:
        step = record["round"]
        for tag, key in SCALARS.items():
            if record[key] is not None:  # train_loss before any local step (--eval-at-start)
                self.writer.add_scalar(tag, record[key], step)
        if step > self.last_round:
            per_round = (record["bytes_sent"] - self.last_bytes) / (step - self.last_round)
            self.writer.add_scalar("bytes/per_round", per_round, step)
        self.last_round, self.last_bytes = step, record["bytes_sent"]
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
