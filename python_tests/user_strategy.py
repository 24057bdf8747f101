"""A strategy registered from outside the package, as a user would: every runtime must run it unchanged."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from decaf_ext.lora import FactorGroup
from decaf_ext.strategies import Strategy, mix, register_strategy

NAME = "damped_dlora"


@register_strategy(NAME)
@dataclass
class DampedDLoRA(Strategy):
    """x_i <- (1 - step) x_i + step sum_j W_ij x_j for A, B and extras: DLoRA moving part of the way."""

    step: float = 0.5

    def communicate(self, groups: list[FactorGroup], extras: dict[str, torch.Tensor], W: torch.Tensor
                    ) -> tuple[list[FactorGroup], dict[str, torch.Tensor]]:
        self.check_agents(groups, extras, W)

        def damped(x: torch.Tensor, dim: int) -> torch.Tensor:
            return (1 - self.step) * x.narrow(dim, 0, W.shape[0]) + self.step * mix(W, x, dim)

        return ([FactorGroup(list(g.names), damped(g.A, 1), damped(g.B, 1)) for g in groups],
                {k: damped(x, 0) for k, x in extras.items()})
