"""The checks of a member's evaluation in a distributed run: its statistics must be finite and plausible, its
factors within the guard's bounds (one line naming what is wrong, or None).

Example::

    >>> numbers = torch.tensor([2.5, 3, 100, 0.5, 0.4, 0.0, 0.1, 2.0, 2], dtype=torch.float64)
    >>> check_evaluation(numbers, layout.pack(groups, extras), layout, guard, groups, extras) is None
    True
"""

from __future__ import annotations

import torch

from decaf_ext.comm.guard import MessageGuard
from decaf_ext.comm.layout import MessageLayout
from decaf_ext.lora import Extras, FactorGroup

STATS = 9  # loss_sum, loss_steps, bytes_sent, accuracy, macro_f1, dp_epsilon (0 without DP), mixing tally (3)


def check_evaluation(numbers: torch.Tensor, factors: torch.Tensor, layout: MessageLayout, guard: MessageGuard,
                     groups: list[FactorGroup], extras: Extras) -> str | None:
    """Why a member's evaluation (numbers: float64 [STATS]: loss_sum, loss_steps, bytes_sent, accuracy, macro_f1,
    dp_epsilon, its mixing tally (squared error, squared reference, rounds); factors: [layout.data_numel] of
    layout.dtype, its packed factors) must not be used, or None. groups / extras: this agent's (names)."""
    if not bool(torch.isfinite(numbers).all()):
        return "NaN or Inf values"
    loss_sum, loss_steps, bytes_sent, accuracy, macro_f1, epsilon, mix_error, mix_reference, mix_rounds = \
        numbers.tolist()
    if not (loss_sum >= 0 and loss_steps >= 0 and loss_steps == int(loss_steps) and bytes_sent >= 0
            and bytes_sent == int(bytes_sent) and 0 <= accuracy <= 1 and 0 <= macro_f1 <= 1 and epsilon >= 0
            and mix_error >= 0 and mix_reference >= 0 and mix_rounds >= 0 and mix_rounds == int(mix_rounds)):
        return "implausible statistics (a negative loss or count, a fractional count, a score outside [0, 1])"
    theirs, their_extras = layout.unpack(factors[None], groups, extras)
    return guard.check_values(theirs, their_extras)
