"""Decentralized LoRA fine-tuning of N agents simulated in one process on one device.

Memory: one frozen pretrained model is shared. Each agent is a peft model deep-copied from a template
whose frozen parameters and buffers are passed through the copy memo, so the N agents (plus one scratch
model for the averaged adapter) share the base weights and own only their LoRA factors and head.
All agents start from the same adapter and head initialization (a common starting point).

Each round: every agent takes `local_steps` AdamW steps on its own partition (seeded per-agent data
order), then the strategy mixes the stacked factors and extras (``comm_order`` "train_then_mix"; with
"mix_then_train" mixing comes first). Every `eval_every` rounds the run logs one JSON line (see
docs/training.md); ``summary.json`` is written last and marks a finished run.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import os
import random
import resource
import shutil
import time
from contextlib import contextmanager
from datetime import datetime
from typing import Any, Iterator

import numpy as np
import torch
from peft import get_peft_model
from torch import nn
from tqdm.auto import tqdm

from decaf_ext.checkpoint import Checkpoint, capture_rng, checkpoint_round, latest_checkpoint, load_checkpoint, \
    restore_rng, save_checkpoint
from decaf_ext.config import TrainConfig, load_saved
from decaf_ext.data import partition
from decaf_ext.errors import ConfigError, first_line
from decaf_ext.export import export_adapter, labelled_base, set_label_names
from decaf_ext.quiet import quiet_transformers
from decaf_ext.lora import FactorGroup, RankPadding, collect_extras, collect_factors, consensus_error, \
    consensus_interference, share_and_freeze_A, write_extras, write_factors
from decaf_ext.agent_mixer import round_inputs
from decaf_ext.payload import Payload
from decaf_ext.strategies import Strategy
from decaf_ext.tasks import Encoded, get_task
from decaf_ext.tensorboard_log import TensorBoardLog
from decaf_ext.topology import make_schedule

SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
CONFIG = "config.json"
AGENT_FOLDERS = "agents"  # <run>/agents/agent_XX: the agents' own folders of a run with one process per agent


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


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available else cpu; ConfigError for an unavailable CUDA device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    return device


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


def write_json(path: str, value: Any, *, lines: bool = False) -> None:
    """Write JSON (or JSON lines from a list) atomically: a temporary file named after this process, then
    ``os.replace`` (several agent processes may write the same shared file)."""
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as handle:
        if lines:
            handle.writelines(json.dumps(item) + "\n" for item in value)
        else:
            json.dump(value, handle, indent=1)
    os.replace(temporary, path)


def checkpoint_folders(run_dir: str) -> list[str]:
    """The folders holding a run's checkpoints: the run's own, or its agents' for a run with one process per agent."""
    agents = os.path.join(run_dir, AGENT_FOLDERS)
    if not os.path.isdir(agents):
        return [run_dir]
    return [os.path.join(agents, name) for name in sorted(os.listdir(agents))]


def resume_command(run_dir: str) -> str:
    """The command that continues the run in `run_dir` (with --launcher dist for one process per agent)."""
    folders = checkpoint_folders(run_dir)
    dist_flags = f" --launcher dist --nproc {len(folders)}" if folders != [run_dir] else ""
    return f"decaf-train --resume {run_dir}{dist_flags}"


def check_free(run_dir: str) -> None:
    """ConfigError saying what to do when `run_dir` already holds a run (finished, or stopped part way): the command
    that continues it."""
    if not os.path.exists(os.path.join(run_dir, CONFIG)):
        return
    folders, resume = checkpoint_folders(run_dir), resume_command(run_dir)
    if os.path.exists(os.path.join(run_dir, SUMMARY)):
        raise ConfigError(f"output_dir: {run_dir!r} already holds a finished run (extend it with "
                          f"'{resume} --rounds N', or choose another --output-dir)")
    done = max((checkpoint_round(f) for f in map(latest_checkpoint, folders) if f is not None), default=0)
    raise ConfigError(f"output_dir: {run_dir!r} holds an unfinished run ({done} rounds checkpointed); continue "
                      f"it with '{resume}', or choose another --output-dir")


class Trainer:
    """Builds data, agents, optimizers and the mixing schedule from a TrainConfig; :meth:`run` trains.

    Attributes after construction: models (N peft models), agent_ids (the agent number of each model),
    optimizers, samplers, strategy, schedule, train_set / test_set (:class:`Encoded`), history (one dict per
    evaluation), run_dir.
    """

    def __init__(self, config: TrainConfig) -> None:
        config.validate()
        config = config.with_absolute_paths()
        self.config = config
        self.device = resolve_device(config.device)
        self.run_dir = config.output_dir or os.path.join(
            "runs", f"{config.algorithm}-{config.topology}-{datetime.now():%Y%m%d-%H%M%S}")
        self.strategy: Strategy = config.strategy()
        if config.tensorboard:
            TensorBoardLog.writer_class()
        self.task = get_task(config)
        random.seed(config.seed)
        np.random.seed(config.seed)
        torch.manual_seed(config.seed)
        with _blame("topology"):
            self.schedule = make_schedule(config.topology, config.agents, rule=config.mixing, seed=config.seed,
                                          p=config.topology_p, path=config.topology_file)
        self.build_data()
        self.build_models()
        self.optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=config.lr,
                                             weight_decay=config.weight_decay) for m in self.models]
        self.agent_ids = list(range(config.agents))
        self.samplers = [AgentSampler(part, config.batch_size, config.seed, i) for i, part in enumerate(self.parts)]
        self.history: list[dict[str, Any]] = []
        self.tensorboard: TensorBoardLog | None = None
        self.counters = {"bytes_sent": 0, "loss_sum": 0.0, "loss_steps": 0,
                         "time_local": 0.0, "time_comm": 0.0, "time_eval": 0.0}

    # ------------------------------------------------------------------------------------------ setup

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
        self.payload = Payload(groups, extras, trains_A=self.strategy.trains_A, message_dtype=cfg.message_dtype,
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

    # ---------------------------------------------------------------------------------------- training

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

    def local_round(self, round_index: int) -> None:
        """`local_steps` optimizer steps per agent on its own data (0-based round_index)."""
        start = self.clock()
        for agent, model, optimizer, sampler in zip(self.agent_ids, self.models, self.optimizers, self.samplers):
            model.train()
            with self.agent_rng(agent, round_index):
                for _ in range(self.config.local_steps):
                    loss = self.task.loss(model, self.task.batch(self.train_set, sampler.next_batch(), self.device))
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    self.counters["loss_sum"] += loss.item()
                    self.counters["loss_steps"] += 1
        self.counters["time_local"] += self.clock() - start

    def _communicate(self, round_index: int) -> None:
        """One mixing step of the strategy on every agent's factors and extras (0-based round_index)."""
        start = self.clock()
        groups, extras = self.collect(self.models), collect_extras(self.models)
        W = self.schedule.at(round_index)
        if self.payload.codec.lossless:
            new_groups, new_extras = self.strategy.communicate(groups, extras, W)
        else:
            new_groups, new_extras = self._communicate_received(groups, extras, W)
        self.write(self.models, new_groups)
        write_extras(self.models, new_extras)
        sent = self.strategy.bytes_sent(groups, extras, W, self.message_bytes())
        self.counters["bytes_sent"] += int(sent.sum())
        if self.config.optimizer_state == "reset":
            for optimizer, agent_sent in zip(self.optimizers, sent.tolist()):
                if agent_sent > 0:
                    optimizer.state.clear()
        self.counters["time_comm"] += self.clock() - start

    def message_bytes(self) -> int | torch.Tensor:
        """Bytes of one message: an int, or int64 [N] per agent when unequal ranks make messages differ (a server
        strategy's all_gather pads every message to the largest)."""
        if self.payload.ranks is None:
            return self.payload.message_bytes
        return torch.tensor([self.payload.sent_bytes_of(agent, server=not self.strategy.decentralized)
                             for agent in self.agent_ids])

    def _communicate_received(self, groups: list[FactorGroup], extras: dict[str, torch.Tensor], W: torch.Tensor
                              ) -> tuple[list[FactorGroup], dict[str, torch.Tensor]]:
        """The round with lossy messages: each agent's own call of the strategy, as the distributed runtime makes
        it (:func:`~decaf_ext.agent_mixer.round_inputs`), on its own exact factors and the others' as decoded
        from their messages. groups A [M, N, r, n], B [M, N, m, r], extras [N, ...] -> the same shapes."""
        exact = self.payload.pack_each(groups, extras)
        heard = self.payload.received(exact)
        rows: list[tuple[list[FactorGroup], dict[str, torch.Tensor]]] = []
        for i, row in enumerate(W.to(torch.float64).cpu()):
            own = ([FactorGroup(g.names, g.A[:, i:i + 1], g.B[:, i:i + 1]) for g in groups],
                   {k: x[i:i + 1] for k, x in extras.items()})
            others = [j for j in range(len(row)) if j != i and (row[j] > 0 or not self.strategy.decentralized)]
            order, W_round = round_inputs(self.strategy, i, row, others, [])
            data = torch.stack([exact[j] if j == i else heard[j] for j in order])
            out_groups, out_extras = self.strategy.communicate(*self.payload.unpack(data, *own), W_round)
            k = order.index(i)
            rows.append(([FactorGroup(g.names, g.A[:, k:k + 1], g.B[:, k:k + 1]) for g in out_groups],
                         {name: x[k:k + 1] for name, x in out_extras.items()}))
        return ([FactorGroup(g.names, torch.cat([r[0][m].A for r in rows], dim=1),
                             torch.cat([r[0][m].B for r in rows], dim=1)) for m, g in enumerate(groups)],
                {name: torch.cat([r[1][name] for r in rows]) for name in extras})

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

    def evaluation_record(self, rounds_done: int, agents: list[dict[str, float]], average: dict[str, float],
                          groups: list[FactorGroup], loss_sum: float, loss_steps: float, bytes_sent: int
                          ) -> dict[str, Any]:
        """One metrics.jsonl record: per-agent test metrics `agents`, the averaged model's `average`, the agents'
        factors `groups` (A [M, N, r, n], B [M, N, m, r]) for the consensus error, the training loss summed
        over `loss_steps` steps since the last evaluation, the bytes sent so far, this trainer's timings."""
        accuracy = np.array([m["accuracy"] for m in agents])
        return {
            "round": rounds_done,
            "train_loss": loss_sum / loss_steps if loss_steps else None,  # None before any local step
            "acc_mean": float(accuracy.mean()),
            "acc_std": float(accuracy.std()),
            "macro_f1_mean": float(np.mean([m["macro_f1"] for m in agents])),
            "avg_model_acc": average["accuracy"],
            "avg_model_macro_f1": average["macro_f1"],
            "consensus_error": consensus_error(groups),
            "consensus_interference": consensus_interference(groups),
            "bytes_sent": bytes_sent,
            "acc_agents": accuracy.tolist(),
            "time": {k[5:]: round(v, 3) for k, v in self.counters.items() if k.startswith("time_")},
        }

    def _evaluate(self, rounds_done: int) -> dict[str, Any]:
        """Test metrics of every agent and of the averaged model; appended to history and metrics.jsonl."""
        start = self.clock()
        agents = [self.evaluate_model(model) for model in self.models]
        average = self.evaluate_model(self.average_model())
        self.counters["time_eval"] += self.clock() - start
        record = self.evaluation_record(rounds_done, agents, average, self.collect(self.models),
                                        self.counters["loss_sum"], self.counters["loss_steps"],
                                        self.counters["bytes_sent"])
        self.counters["loss_sum"], self.counters["loss_steps"] = 0.0, 0
        self.log_record(record)
        return record

    def log_record(self, record: dict[str, Any]) -> None:
        """Append an evaluation record to history, rewrite metrics.jsonl and, with config.tensorboard, add it to
        the TensorBoard event files in run_dir/tensorboard."""
        if self.config.tensorboard and self.tensorboard is None:
            self.tensorboard = TensorBoardLog(os.path.join(self.run_dir, "tensorboard"),
                                              self.history[-1] if self.history else None)
        self.history.append(record)
        self.write_metrics()
        if self.tensorboard is not None:
            self.tensorboard.write(record)

    def write_metrics(self) -> None:
        """Rewrite run_dir/metrics.jsonl (one line per evaluation in history) atomically."""
        write_json(os.path.join(self.run_dir, METRICS), self.history, lines=True)

    # ------------------------------------------------------------------------------------- checkpoints

    def write_checkpoint(self, rounds_done: int) -> None:
        groups, extras = self.collect(self.models, raw=True), collect_extras(self.models)
        tensors = {f"factors/{k}/{factor}": getattr(g, factor) for k, g in enumerate(groups) for factor in "AB"}
        tensors.update({f"extras/{name}": x for name, x in extras.items()})
        state = {"samplers": [s.state_dict() for s in self.samplers], "history": self.history,
                 "counters": self.counters}
        save_checkpoint(self.run_dir, Checkpoint(round=rounds_done, tensors=tensors,
                                                 optimizers=[o.state_dict() for o in self.optimizers],
                                                 state=state, rng=capture_rng()))

    def _restore(self) -> int:
        """Load the newest checkpoint of run_dir; returns the number of rounds it had finished (0, from the
        initial state this trainer was built with, when the run was stopped before its first checkpoint)."""
        folder = latest_checkpoint(self.run_dir)
        if folder is None:
            self.history = []
            return 0
        saved = load_checkpoint(folder)
        groups = self.collect(self.models, raw=True)
        self.write(self.models, [FactorGroup(g.names, saved.tensors[f"factors/{k}/A"],
                                             saved.tensors[f"factors/{k}/B"]) for k, g in enumerate(groups)], raw=True)
        write_extras(self.models, {name[len("extras/"):]: x for name, x in saved.tensors.items()
                                   if name.startswith("extras/")})
        for optimizer, state in zip(self.optimizers, saved.optimizers):
            optimizer.load_state_dict(state)
        for sampler, state in zip(self.samplers, saved.state["samplers"]):
            sampler.load_state_dict(state)
        self.history = saved.state["history"]
        self.counters = saved.state["counters"]
        restore_rng(saved.rng)
        return saved.round

    def prepare_run_dir(self, resume: bool) -> int:
        """Create (fresh) or reopen (resume) run_dir; returns the number of rounds already done."""
        config_path = os.path.join(self.run_dir, CONFIG)
        if not resume:
            check_free(self.run_dir)
            try:
                os.makedirs(self.run_dir, exist_ok=True)
                write_json(config_path, self.config.to_dict())
            except OSError as error:
                raise ConfigError(f"output_dir: cannot create {self.run_dir!r} ({error.strerror})") from None
            return 0
        if checkpoint_folders(self.run_dir) != [self.run_dir]:  # its checkpoints are the agents' own
            raise ConfigError(f"resume: {self.run_dir!r} holds a run with one process per agent; continue it with "
                              f"'{resume_command(self.run_dir)} --rounds N'")
        if os.path.exists(config_path):
            self.config.check_resumes(load_saved(config_path), source=config_path)
        done = self._restore()
        if done > self.config.rounds:
            raise ConfigError(f"rounds: the run in {self.run_dir!r} already finished {done} rounds "
                              f"(asked for {self.config.rounds})")
        if os.path.exists(os.path.join(self.run_dir, SUMMARY)):
            os.remove(os.path.join(self.run_dir, SUMMARY))  # the run is unfinished again until it ends
        self.write_metrics()
        write_json(config_path, self.config.to_dict())
        return done

    # --------------------------------------------------------------------------------------------- run

    def run(self, *, resume: bool = False) -> dict[str, Any]:
        """Train for config.rounds rounds (continuing from the newest checkpoint if `resume`); returns the
        summary that is also written to run_dir/summary.json."""
        cfg = self.config
        done = self.prepare_run_dir(resume)
        wall = time.perf_counter()
        bar = tqdm(range(done, cfg.rounds), initial=done, total=cfg.rounds, unit="round", disable=not cfg.progress,
                   desc=f"{cfg.algorithm} {cfg.topology} x{cfg.agents}", dynamic_ncols=True)
        if cfg.eval_at_start and done == 0:
            self._evaluate(0)
        for round_index in bar:
            if cfg.comm_order == "mix_then_train":
                self._communicate(round_index)
            self.local_round(round_index)
            if cfg.comm_order == "train_then_mix":
                self._communicate(round_index)
            rounds_done = round_index + 1
            if rounds_done % cfg.eval_every == 0 or rounds_done == cfg.rounds:
                record = self._evaluate(rounds_done)
                bar.set_postfix(acc=f"{record['acc_mean']:.3f}", avg=f"{record['avg_model_acc']:.3f}",
                                loss=f"{record['train_loss']:.3f}")
            if (cfg.checkpoint_every and rounds_done % cfg.checkpoint_every == 0) or rounds_done == cfg.rounds:
                self.write_checkpoint(rounds_done)
        bar.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        self.export_adapters(os.path.join(self.run_dir, "adapters"))
        summary = self.build_summary(time.perf_counter() - wall)
        write_json(os.path.join(self.run_dir, SUMMARY), summary)
        return summary

    def export_adapters(self, folder: str) -> None:
        """peft-format adapters (``PeftModel.from_pretrained``, ``AutoPeftModelFor...from_pretrained``):
        agent_XX/ for each agent, average/ for the averaged model, and base/, the base model folder they name
        (its config carries the label names; see :mod:`decaf_ext.export`). Written to a temporary folder, then
        renamed."""
        folder = os.path.abspath(folder)
        temporary = folder + ".tmp"
        shutil.rmtree(temporary, ignore_errors=True)
        os.makedirs(temporary)
        made = labelled_base(self.model_path, self.models[0].get_base_model().config, os.path.join(temporary, "base"))
        base = None if made is None else os.path.join(folder, "base")
        for i, model in enumerate(self.models):
            export_adapter(model, os.path.join(temporary, f"agent_{i:02d}"), base)
        export_adapter(self.average_model(), os.path.join(temporary, "average"), base)
        shutil.rmtree(folder, ignore_errors=True)
        os.rename(temporary, folder)

    def _peak_memory_mb(self) -> float:
        """Peak GPU memory allocated on a CUDA device, else the process's peak resident memory (MB)."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux reports KiB

    def build_summary(self, wall_seconds: float) -> dict[str, Any]:
        """Final metrics, totals and per-round timings."""
        cfg, final = self.config, self.history[-1]
        return {
            "task": cfg.task, "algorithm": cfg.algorithm, "topology": cfg.topology, "agents": cfg.agents,
            "rounds": cfg.rounds,
            "final": {k: v for k, v in final.items() if k != "time"},
            "bytes_per_agent_per_round": final["bytes_sent"] / (cfg.agents * cfg.rounds),
            "time": {**final["time"], "wall_this_session": round(wall_seconds, 3)},
            "seconds_per_round": {k: round(v / cfg.rounds, 4) for k, v in final["time"].items()},
            "peak_memory_mb": round(self._peak_memory_mb(), 1),
            "spectral_gap": self.schedule.spectral_gap,
            "trainable_params_per_agent": self.trainable_params,
            "label_names": self.label_names,
            "examples": {"train": len(self.train_set), "test": len(self.test_set),
                         "per_agent": [len(p) for p in self.parts]},
            "run_dir": self.run_dir,
        }


def train(config: TrainConfig, *, resume: bool = False) -> dict[str, Any]:
    """Build a :class:`Trainer` for `config` and run it; returns the summary."""
    return Trainer(config).run(resume=resume)

