"""The agents of a run, as the simulator builds them: data split and partition, one peft model per agent over
one shared frozen base (plus a scratch model for the averaged adapter), optimizers, per-agent data order, the
mixing schedule and the message layout — and their local training steps and evaluation.

Every runtime starts from this: the simulator keeps all N agents; a process of a distributed run builds the same
(same seeds, so the same split, partition and initialization) and keeps only its own agent (``keep``).

Example::

    >>> agents = Agents(TrainConfig(agents=4, rounds=1))
    >>> agents.local_round(0, counters)          # local_steps AdamW steps per agent
    >>> agents.evaluate_model(agents.models[0])  # {'accuracy': ..., 'macro_f1': ...}
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import os
import random
import time
from contextlib import contextmanager
from typing import Any, Collection, Iterator

import numpy as np
import torch
from peft import get_peft_model
from torch import nn

from decaf_ext.comm.layout import MessageLayout
from decaf_ext.config import TrainConfig
from decaf_ext.device import resolve_device
from decaf_ext.data.partition import partition
from decaf_ext.errors import ConfigError, first_line
from decaf_ext.lora import FactorGroup, RankPadding, add_mixing, collect_extras, collect_factors, mixing_residuals, \
    new_mixing_tally, share_and_freeze_A, write_extras, write_factors
from decaf_ext.privacy import PrivateAgent, check_privacy, private_agents
from decaf_ext.quiet import quiet_transformers
from decaf_ext.storage.export import set_label_names
from decaf_ext.strategies import Strategy
from decaf_ext.tasks import Encoded, get_task
from decaf_ext.topology import make_schedule


class AgentSampler:
    """Endless seeded reshuffling of one agent's example indices, cut into batches."""

    def __init__(self, indices: np.ndarray, batch_size: int, seed: int, agent: int) -> None:
        self.indices = indices
        self.batch_size = batch_size
        self.rng = np.random.default_rng([seed, agent])
        self.order = np.empty(0, dtype=np.int64)
        self.position = 0

    def next_batch(self) -> torch.Tensor:
        """int64 [b] indices, b <= batch_size (the last batch of a pass may be shorter)."""
        if self.position >= len(self.order):
            self.order, self.position = self.rng.permutation(self.indices), 0
        batch = self.order[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return torch.as_tensor(batch, dtype=torch.int64)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state, "order": self.order.tolist(), "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.order = np.asarray(state["order"], dtype=np.int64)
        self.position = state["position"]


def replicate(model: nn.Module, copies: int) -> list[nn.Module]:
    """`copies` deep copies of `model` that share its frozen parameters and buffers with it."""
    frozen = {id(t): t for t in itertools.chain(model.parameters(), model.buffers()) if not t.requires_grad}
    return [copy.deepcopy(model, memo=dict(frozen)) for _ in range(copies)]


@contextmanager
def _blame(argument: str) -> Iterator[None]:
    """Re-raise a ValueError from a library call as a ConfigError naming the config `argument`."""
    try:
        yield
    except ConfigError:
        raise
    except ValueError as error:
        raise ConfigError(f"{argument}: {first_line(error)}") from None


class Agents:
    """Builds data, agents, optimizers and the mixing schedule from a validated TrainConfig with absolute paths.

    keep: None for all N agents (the simulator), or one agent id (a process of a distributed run: its model, its
    data shard and its sampler only; the scratch model stays). Attributes: config, device, strategy, task,
    schedule, label_names, train_labels, parts, model_path, train_set / test_set (:class:`Encoded`), models,
    scratch, padding, layout, trainable_params, optimizers, samplers, agent_ids (the agent id of each model),
    counters (the run's running totals: bytes sent, training loss, seconds per phase, each agent's mixing
    error tally).
    """

    def __init__(self, config: TrainConfig, *, keep: int | None = None) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.strategy: Strategy = config.strategy()
        self.task = get_task(config)
        random.seed(config.seed)
        np.random.seed(config.seed)
        torch.manual_seed(config.seed)
        with _blame("topology"):
            self.schedule = make_schedule(config.topology, config.agents, rule=config.mixing, seed=config.seed,
                                          p=config.topology_p, path=config.topology_file)
        self.build_data()
        self.build_models()
        self.agent_ids = list(range(config.agents))
        if keep is not None:
            self._keep(keep)
        self.optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=config.lr,
                                             weight_decay=config.weight_decay) for m in self.models]
        self.samplers = [AgentSampler(np.arange(len(self.parts[i])) if keep is not None else self.parts[i],
                                      config.batch_size, config.seed, i) for i in self.agent_ids]
        # DP-SGD (dp_epsilon): Opacus's optimizers replace the plain ones; None without differential privacy
        self.privacy: list[PrivateAgent] | None = private_agents(
            check_privacy(config), self.models, self.optimizers, [s.indices for s in self.samplers],
            batch_size=config.batch_size, steps=config.rounds * config.local_steps, device=self.device)
        if self.privacy is not None:
            self.optimizers = [private.optimizer for private in self.privacy]
        self.counters = {"bytes_sent": 0, "loss_sum": 0.0, "loss_steps": 0,
                         "time_local": 0.0, "time_comm": 0.0, "time_eval": 0.0,
                         "mixing": new_mixing_tally(len(self.agent_ids))}  # see decaf_ext.lora.mixing

    def _keep(self, agent: int) -> None:
        """Only agent `agent`'s model and training examples (sampled by local position) from here on."""
        part = torch.as_tensor(self.parts[agent], dtype=torch.int64)
        self.train_set = Encoded({k: v[part] for k, v in self.train_set.inputs.items()}, self.train_set.labels[part])
        self.models = [self.models[agent]]
        self.agent_ids = [agent]

    def build_data(self) -> None:
        """Load the dataset, take the seeded train/test subsets, partition train over agents, encode once."""
        cfg = self.config
        with _blame("dataset"):
            train, test = self.task.load_data(cfg.dataset, test_fraction=cfg.test_fraction, seed=cfg.seed)
        rng = np.random.default_rng(cfg.seed)
        max_train, max_test = cfg.caps()
        train_idx = np.sort(rng.permutation(len(train))[:max_train])
        test_idx = np.sort(rng.permutation(len(test))[:max_test])
        if len(train_idx) < cfg.agents:
            raise ConfigError(f"agents: {cfg.agents} agents but only {len(train_idx)} training examples "
                              "(raise max_train or use fewer agents)")
        self.label_names = list(train.label_names)
        self.train_labels = train.labels[train_idx]
        with _blame("partition"):
            self.parts = partition(self.train_labels, cfg.agents, cfg.partition, alpha=cfg.dirichlet_alpha,
                                   shards=cfg.shards, shots=cfg.shots, seed=cfg.seed)
        self.model_path = self.task.resolve_model(cfg.model)
        self._base = self._load_model()
        self.train_set: Encoded = self.task.encode(train, train_idx)
        self.test_set: Encoded = self.task.encode(test, test_idx)

    def _load_model(self) -> nn.Module:
        """The task's pretrained model (ConfigError naming `model` if it cannot be loaded)."""
        path = self.model_path
        if (os.path.isabs(path) or path.startswith((".", "~"))) and not os.path.isdir(path):
            raise ConfigError(f"model: {path!r} is not a folder")
        try:
            with quiet_transformers():
                model = self.task.build_model(path, self.label_names)
        except ConfigError:
            raise
        except (OSError, ValueError) as error:
            raise ConfigError(f"model: cannot load a pretrained model from {path!r} ({first_line(error)})") from None
        if getattr(model.config, "num_labels", None) == len(self.label_names):
            set_label_names(model.config, self.label_names)
        return model

    def _check_targets(self, targets: list[str], ranks: list[int]) -> None:
        """ConfigError unless every target matches a matrix-weight module whose dims are >= every agent's rank."""
        for target in targets:
            matched = [(name, module.weight.shape) for name, module in self._base.named_modules()
                       if (name == target or name.endswith("." + target))
                       and isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 2]
            if not matched:
                raise ConfigError(f"target_modules: {target!r} matches no linear module of the model")
            name, shape = min(matched, key=lambda item: min(item[1]))
            if max(ranks) > min(shape):
                agent = f" (agent {ranks.index(max(ranks))})" if len(set(ranks)) > 1 else ""
                raise ConfigError(f"rank: {max(ranks)}{agent} exceeds min(in, out) = {min(shape)} "
                                  f"of target module {name!r}")

    def build_models(self) -> None:
        """N agents and one scratch model (for the averaged adapter), all sharing the frozen base.

        Agents of equal rank start from one peft template; with unequal ranks (config.agent_ranks()) there is
        one template per rank over the same frozen base, the scratch model has the largest rank and
        ``padding`` says how their factors are stacked (:class:`~decaf_ext.lora.RankPadding`)."""
        cfg = self.config
        ranks = cfg.agent_ranks()
        targets = list(cfg.target_modules or self.task.default_targets(self._base))
        self._check_targets(targets, ranks)
        base = self._base.to(self.device)
        del self._base
        distinct = sorted(set(ranks))
        if len(distinct) > 1:
            base.requires_grad_(False)  # every copy below shares the frozen weights
        bases = [*replicate(base, len(distinct) - 1), base]
        with quiet_transformers():  # peft asks transformers a deprecated question (a FutureWarning)
            templates = {r: get_peft_model(copy, self.task.lora_config(r, cfg.lora_alpha, cfg.lora_dropout, targets))
                         for r, copy in zip(distinct, bases)}
        if len(distinct) == 1:
            template = templates[distinct[0]]
            *self.models, self.scratch = [template, *replicate(template, cfg.agents)]
            self.padding: RankPadding | None = None
        else:
            self.models = [replicate(templates[r], 1)[0] for r in ranks]
            self.scratch = templates[distinct[-1]]
            self.padding = RankPadding(distinct[-1], frozen_A=not self.strategy.trains_A)
        if not self.strategy.trains_A:
            share_and_freeze_A([*self.models, self.scratch], cfg.seed)
        counts = [sum(p.numel() for p in m.parameters() if p.requires_grad) for m in self.models]
        self.trainable_params = counts[0] if len(set(counts)) == 1 else counts
        groups, extras = self.collect(self.models[:1]), collect_extras(self.models[:1])
        self.layout = MessageLayout(groups, extras, trains_A=self.strategy.trains_A, message_dtype=cfg.message_dtype,
                               ranks=ranks)

    def _layout(self, raw: bool) -> RankPadding | None:
        """This run's RankPadding (None with equal ranks); `raw`: padding only, no scales (checkpoints)."""
        return dataclasses.replace(self.padding, scaled=False) if raw and self.padding else self.padding

    def collect(self, models: list[nn.Module], *, raw: bool = False) -> list[FactorGroup]:
        """collect_factors of `models` in this run's layout (padded and scaled when ranks differ)."""
        return collect_factors(models, padding=self._layout(raw))

    def write(self, models: list[nn.Module], groups: list[FactorGroup], *, raw: bool = False) -> None:
        """write_factors into `models` from groups in this run's layout (see :meth:`collect`)."""
        write_factors(models, groups, padding=self._layout(raw))

    def as_sent(self, inputs: list[FactorGroup]) -> list[FactorGroup]:
        """Input groups of a strategy call (A [M, k, r, n], B [M, k, m, r]) with each agent's true factors: when the
        strategy does not send A, a receiver fills every sender's A from its own, which with unequal ranks lacks the
        rows beyond its own rank; the shared A (the scratch model's, of the largest rank) gives each B_j A_j exactly
        (B_j is zero beyond agent j's rank). For the mixing error (:mod:`decaf_ext.lora.mixing`)."""
        if self.strategy.trains_A or self.padding is None:
            return inputs
        shared = self.collect([self.scratch])
        return [FactorGroup(g.names, s.A.expand_as(g.A), g.B) for g, s in zip(inputs, shared, strict=True)]

    def tally_mixing(self, k: int, inputs: list[FactorGroup], weights: torch.Tensor) -> None:
        """Add model k's mixing error of this round to its tally (counters["mixing"][k]): `inputs` (A [M, j, r, n],
        B [M, j, m, r]) and `weights` [1, j] of its call of the strategy, against the factors it holds now."""
        squared = mixing_residuals(self.as_sent(inputs), weights, self.collect(self.models[k:k + 1]))
        add_mixing(self.counters["mixing"][k], *(x.item() for x in squared))

    def clock(self) -> float:
        """time.perf_counter() after the device's pending work is done."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    @contextmanager
    def agent_rng(self, agent: int, round_index: int) -> Iterator[None]:
        """Torch's generators (CPU and this trainer's CUDA device) seeded by (seed, agent, round) inside, restored
        after: an agent's dropout masks depend only on those three, whether simulated or in its own process."""
        cuda = [self.device.index or 0] if self.device.type == "cuda" else []
        seed = int(np.random.SeedSequence([self.config.seed, agent, round_index]).generate_state(1)[0])
        with torch.random.fork_rng(devices=cuda):
            torch.default_generator.manual_seed(seed)
            for index in cuda:
                torch.cuda.default_generators[index].manual_seed(seed)
            yield

    def local_round(self, round_index: int, only: Collection[int] | None = None) -> None:
        """`local_steps` optimizer steps per agent on its own data (0-based round_index); with `only`, of the
        agents whose ids it holds (the live agents of a churn schedule); DP-SGD steps
        (:class:`~decaf_ext.privacy.PrivateAgent`) when the run has a dp_epsilon."""
        start = self.clock()
        for k, (agent, model, optimizer, sampler) in enumerate(zip(self.agent_ids, self.models, self.optimizers,
                                                                   self.samplers)):
            if only is not None and agent not in only:
                continue
            model.train()
            loss_of = functools.partial(self.loss, model)
            with self.agent_rng(agent, round_index):
                for _ in range(self.config.local_steps):
                    if self.privacy is not None:  # its training loss is not private: not recorded
                        self.privacy[k].step(loss_of)
                        continue
                    loss = loss_of(sampler.next_batch())
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    self.counters["loss_sum"] += loss.item()
                    self.counters["loss_steps"] += 1
        self.counters["time_local"] += self.clock() - start

    def loss(self, model: nn.Module, examples: torch.Tensor) -> torch.Tensor:
        """The task's training loss of `model` on training examples `examples` (int64 [b])."""
        return self.task.loss(model, self.task.batch(self.train_set, examples, self.device))

    def spent(self, k: int) -> dict[str, float]:
        """{"dp_epsilon": epsilon model k has spent so far}, or {} without differential privacy."""
        return {} if self.privacy is None else {"dp_epsilon": self.privacy[k].epsilon()}

    def average_model(self, groups: list[FactorGroup] | None = None,
                      extras: dict[str, torch.Tensor] | None = None) -> nn.Module:
        """The scratch model holding the averaged adapter of `groups` / `extras` (default: this trainer's agents).

        The strategy's consensus of all agents (``Strategy.consensus``): decaf: B, A = rank-r truncated SVD of
        mean_i B_i A_i; dlora, dlora_fa, fedavg, local: the plain agent-mean of A and of B. Extras: the agent-mean.
        """
        if groups is None or extras is None:
            groups, extras = self.collect(self.models), collect_extras(self.models)
        groups, extras = self.strategy.consensus(groups, extras)
        self.write([self.scratch], groups)
        write_extras([self.scratch], extras)
        return self.scratch

    def evaluate_model(self, model: nn.Module) -> dict[str, float]:
        """Test-set metrics of one model (accuracy, macro_f1)."""
        return self.task.evaluate(model, self.test_set, batch_size=self.config.eval_batch_size, device=self.device,
                                  n_classes=len(self.label_names))
