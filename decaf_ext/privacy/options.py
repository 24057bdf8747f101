"""The differential-privacy options of a run (dp_epsilon, dp_delta, dp_max_grad_norm, dp_accountant), checked
before anything is built: one-line ConfigErrors naming the option.

Example::

    >>> DPBudget(epsilon=3.0, delta=None, max_grad_norm=1.0).delta_for(600)   # None: 1 / n of the agent
    0.0016666666666666668
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from typing import Any

from decaf_ext.errors import ConfigError

#: Opacus accountants a run may use (rdp: Renyi DP, Opacus's classic; prv: privacy random variables, tighter)
ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv")


@dataclass(frozen=True)
class DPBudget:
    """What one agent may spend: (epsilon, delta) over the whole run, per-example gradient clip norm, accountant.
    delta None: 1 / n, n the agent's own number of training examples."""

    epsilon: float
    delta: float | None
    max_grad_norm: float
    accountant: str = "rdp"

    def delta_for(self, n_examples: int) -> float:
        """The delta of an agent holding `n_examples` examples."""
        return self.delta if self.delta is not None else 1.0 / n_examples


def _positive(name: str, value: float | None, *, below_one: bool = False) -> None:
    if value is None:
        return
    upper = 1.0 if below_one else math.inf
    if not (isinstance(value, (int, float)) and 0 < value < upper):
        bound = "in (0, 1)" if below_one else "a finite number > 0"
        raise ConfigError(f"{name} must be {bound}, got {value!r}")


def check_privacy(config: Any) -> DPBudget | None:
    """The run's DPBudget (None without ``dp_epsilon``), or ConfigError naming the first bad dp_* option, or
    naming ``task`` when the task's loss is not a mean of per-example losses (DP-SGD's per-sample gradients
    would not bound one example's influence). `config`: a TrainConfig."""
    _positive("dp_epsilon", config.dp_epsilon)
    _positive("dp_delta", config.dp_delta, below_one=True)
    _positive("dp_max_grad_norm", config.dp_max_grad_norm)
    if config.dp_accountant not in ACCOUNTANTS:
        raise ConfigError(f"dp_accountant must be one of {', '.join(ACCOUNTANTS)}; got {config.dp_accountant!r}")
    if config.dp_epsilon is None:
        return None
    if importlib.util.find_spec("opacus") is None:
        raise ConfigError("dp_epsilon: DP-SGD needs the package opacus (pip install decaf_ext[privacy])")
    from decaf_ext.tasks import TASKS

    task = TASKS.get(config.task)
    if task is not None and not task.dp_sgd:
        raise ConfigError(f"task: {config.task!r} cannot be trained with dp_epsilon (DP-SGD needs a loss that is a "
                          f"mean of per-example losses and a forward pass in which examples never meet)")
    return DPBudget(config.dp_epsilon, config.dp_delta, config.dp_max_grad_norm, config.dp_accountant)
