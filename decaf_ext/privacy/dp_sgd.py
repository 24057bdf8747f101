"""One agent's local training as DP-SGD through Opacus: per-sample gradients (Opacus's hooks on the peft model),
each example's gradient clipped to ``max_grad_norm`` over all trainable parameters (LoRA factors and the head),
Gaussian noise of ``noise_multiplier * max_grad_norm``, Poisson sampling with Opacus's sampler, and Opacus's
accountant counting every step. Nothing here clips, samples or accounts by hand.

The noise multiplier is chosen once, by Opacus's ``get_noise_multiplier``, so that the run's ``steps`` steps
(rounds x local_steps) spend exactly the asked epsilon; a budget that needs an absurd noise multiplier is refused
before training. Sampling and noise draw from generators seeded from ``os.urandom``, never from the run's seed
(which config.json records), and their states travel in the agent's checkpoints.

Example::

    >>> private = PrivateAgent(model, optimizer, np.arange(60), budget=DPBudget(3.0, None, 1.0), batch_size=16,
    ...                        steps=50, device=torch.device("cpu"))
    >>> private.step(lambda examples: task.loss(model, task.batch(train_set, examples, device)))
    >>> private.epsilon(), private.noise_multiplier, private.sample_rate
"""

from __future__ import annotations

import math
import os
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from decaf_ext.errors import ConfigError, first_line
from decaf_ext.privacy.options import DPBudget

#: a budget whose noise multiplier would exceed this is refused: each step's noise would be this many times the
#: clip norm, against a signal of at most batch x clip norm, and Opacus's own search gives up only at 1e6
MAX_NOISE_MULTIPLIER = 100.0


def _secret_seed() -> int:
    """A seed nobody can read from the run's files: 8 bytes of os.urandom."""
    return int.from_bytes(os.urandom(8), "little")


@contextmanager
def _quiet_opacus() -> Iterator[None]:
    """Silence Opacus's advice that a run cannot act on (secure RNG needs torchcsprng; the RDP search's largest
    order; the full-backward-hook remark on frozen inputs)."""
    with warnings.catch_warnings():
        for message in ("Secure RNG turned off", "Optimal order is the largest alpha", "Full backward hook is firing"):
            warnings.filterwarnings("ignore", message=message)
        yield


def noise_multiplier(budget: DPBudget, delta: float, sample_rate: float, steps: int) -> float:
    """Opacus's noise multiplier for `steps` steps at `sample_rate` to spend (budget.epsilon, delta), or a
    ConfigError naming dp_epsilon when none exists or it exceeds MAX_NOISE_MULTIPLIER."""
    from opacus.accountants.utils import get_noise_multiplier

    try:
        with _quiet_opacus():
            sigma = get_noise_multiplier(target_epsilon=budget.epsilon, target_delta=delta, sample_rate=sample_rate,
                                         steps=steps, accountant=budget.accountant,
                                         epsilon_tolerance=0.01 * budget.epsilon)
    except ValueError:  # Opacus: "The privacy budget is too low."
        sigma = math.inf
    if not sigma <= MAX_NOISE_MULTIPLIER:
        raise ConfigError(f"dp_epsilon: {budget.epsilon:g} cannot be reached in {steps} steps (rounds x local_steps) "
                          f"at sample rate {sample_rate:.3g} with dp_delta {delta:.3g}: it needs a noise multiplier "
                          f"above {MAX_NOISE_MULTIPLIER:g}; raise dp_epsilon, batch_size or max_train, or lower "
                          "rounds or local_steps")
    return sigma


class PrivateAgent:
    """DP-SGD for one agent: Opacus's PrivacyEngine over `model` (hooks, not a wrapper: `model` stays the peft
    model every runtime reads), `optimizer` (replaced by :attr:`optimizer`, a DPOptimizer) and the agent's
    examples `indices` (int64 [n], positions in the encoded training set), Poisson-sampled at Opacus's rate
    1 / ceil(n / batch_size).

    Attributes: optimizer, delta, sample_rate, noise_multiplier, steps (the steps the noise is calibrated for),
    engine (its ``accountant`` counts every step taken).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, indices: np.ndarray, *,
                 budget: DPBudget, batch_size: int, steps: int, device: torch.device) -> None:
        from opacus import PrivacyEngine

        self.indices = torch.as_tensor(np.asarray(indices), dtype=torch.int64)
        self.budget, self.steps = budget, steps
        self.delta = budget.delta_for(len(self.indices))
        self.sample_generator = torch.Generator().manual_seed(_secret_seed())
        self.noise_generator = torch.Generator(device=device).manual_seed(_secret_seed())
        loader = DataLoader(TensorDataset(torch.arange(len(self.indices))), batch_size=batch_size,
                            generator=self.sample_generator)
        self.sample_rate = 1 / len(loader)
        self.noise_multiplier = noise_multiplier(budget, self.delta, self.sample_rate, steps)
        try:
            with _quiet_opacus():
                self.engine = PrivacyEngine(accountant=budget.accountant)
                self.hooks, self.optimizer, private_loader = self.engine.make_private(
                    module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=self.noise_multiplier,
                    max_grad_norm=budget.max_grad_norm, poisson_sampling=True, noise_generator=self.noise_generator,
                    wrap_model=False)
        except (NotImplementedError, ValueError) as error:  # a layer Opacus has no per-sample gradient for
            raise ConfigError(f"model: Opacus cannot compute its per-sample gradients ({first_line(error)})"
                              ) from None
        self.sampler = private_loader.batch_sampler  # Opacus's UniformWithReplacementSampler (Poisson)

    def step(self, loss_of: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """One DP-SGD step: a Poisson sample of the agent's examples, `loss_of(examples)` (examples: int64 [b]
        positions in the training set; the task's mean loss on the model) backpropagated, clipped per example,
        noised and applied. An empty sample still takes the step, noise only (skipping it would reveal the
        sample's size). The loss itself is not private and is not returned."""
        positions = torch.as_tensor(next(iter(self.sampler)), dtype=torch.int64)
        with _quiet_opacus():
            if len(positions) == 0:
                for param in self.optimizer.params:
                    param.grad_sample = param.new_zeros((0, *param.shape))
            else:
                loss_of(self.indices[positions]).backward()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def epsilon(self) -> float:
        """Epsilon spent so far at this agent's delta (Opacus's accountant over the steps taken)."""
        if not self.engine.accountant.history:
            return 0.0
        with _quiet_opacus():
            return float(self.engine.accountant.get_epsilon(delta=self.delta))

    def summary(self) -> dict[str, Any]:
        """What the run reports about this agent's privacy."""
        return {"epsilon": self.epsilon(), "delta": self.delta, "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate, "steps_taken": sum(n for _, _, n in self.engine.accountant.history)}

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready: the accountant's history, the calibration and both generators' states (secret: they fix
        the samples and the noise still to come)."""
        return {"history": [list(entry) for entry in self.engine.accountant.history],
                "noise_multiplier": self.noise_multiplier, "steps": self.steps,
                "sample_generator": bytes(self.sample_generator.get_state().tolist()).hex(),
                "noise_generator": bytes(self.noise_generator.get_state().tolist()).hex()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`: the run keeps the noise multiplier it started with (ConfigError naming rounds if
        this run now asks for more steps than that noise was calibrated for)."""
        if self.steps > state["steps"]:
            raise ConfigError(f"rounds: the run's DP noise was calibrated for {state['steps']} steps to spend "
                              f"dp_epsilon {self.budget.epsilon:g}; {self.steps} steps would spend more")
        self.steps = state["steps"]
        self.noise_multiplier = self.optimizer.noise_multiplier = state["noise_multiplier"]
        self.engine.accountant.history = [tuple(entry) for entry in state["history"]]
        for generator, name in ((self.sample_generator, "sample_generator"), (self.noise_generator, "noise_generator")):
            generator.set_state(torch.tensor(list(bytes.fromhex(state[name])), dtype=torch.uint8))


    def rejoin(self, skipped_steps: int) -> None:
        """After :meth:`load_state_dict`, for an agent restarted into a run that went on without it: the
        `skipped_steps` after its checkpoint may have been taken and released before it crashed, so they are
        accounted as taken, and both generators are reseeded (the checkpoint's would redraw those steps' samples
        and noise for other inputs)."""
        if skipped_steps > 0:
            self.engine.accountant.history.append((self.noise_multiplier, self.sample_rate, skipped_steps))
        self.sample_generator.manual_seed(_secret_seed())
        self.noise_generator.manual_seed(_secret_seed())


def private_agents(budget: DPBudget | None, models: list[nn.Module], optimizers: list[torch.optim.Optimizer],
                   indices: list[np.ndarray], *, batch_size: int, steps: int, device: torch.device
                   ) -> list[PrivateAgent] | None:
    """One PrivateAgent per model (None without a budget): the call every runtime makes after building its
    agents' models and optimizers (indices[k]: model k's examples)."""
    if budget is None:
        return None
    return [PrivateAgent(model, optimizer, part, budget=budget, batch_size=batch_size, steps=steps, device=device)
            for model, optimizer, part in zip(models, optimizers, indices)]
