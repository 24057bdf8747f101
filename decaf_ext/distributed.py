"""Distributed training: one process per agent on torch.distributed (see docs/distributed.md).

    python -m decaf_ext.distributed --nproc 4 --agents 4 ...          local launcher (survives a dying agent)
    torchrun --nproc-per-node 4 -m decaf_ext.distributed --agents 4 ...

Each process builds exactly what the simulator (:class:`~decaf_ext.trainer.Trainer`) builds for its agent —
same data split, partition, initialization and per-agent data order — keeps only its own data shard and adapter,
and replaces the in-memory mixing by messages: one flat buffer per neighbour per round
(``batch_isend_irecv``) for dlora / decaf / dlora_fa, ``all_reduce`` for fedavg. Round membership, timeouts
and buffer validation live in :mod:`decaf_ext.exchange`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from decaf_ext.checkpoint import latest_checkpoint
from decaf_ext.config import ConfigError, TrainConfig
from decaf_ext.exchange import RoundView, Transport, check_buffer
from decaf_ext.lora import FactorGroup, collect_extras, collect_factors, write_extras, write_factors
from decaf_ext.ops import consensus_tsvd
from decaf_ext.strategies import DeCAF, Strategy, mix
from decaf_ext.tasks import Encoded
from decaf_ext.trainer import METRICS, SUMMARY, AgentSampler, Trainer, write_json

log = logging.getLogger("decaf_ext.distributed")

BACKENDS: tuple[str, ...] = ("auto", "gloo", "nccl")
FAULT_ENV = "DECAF_FAULT"
STATS = 5  # loss_sum, loss_steps, bytes_sent, accuracy, macro_f1: the per-agent numbers gathered at evaluation

Extras = dict[str, torch.Tensor]


@dataclass
class DistributedOptions:
    """Knobs of the transport. backend: auto (nccl on CUDA, else gloo), gloo or nccl; round_timeout: seconds
    an agent waits for the others in one round before leaving them out; startup_timeout: seconds to wait for
    every agent at start (model loading included)."""

    backend: str = "auto"
    round_timeout: float = 60.0
    startup_timeout: float = 600.0

    def validate(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}; got {self.backend!r}")
        for name in ("round_timeout", "startup_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")


@dataclass
class Faults:
    """Test-only fault injection from the environment variable DECAF_FAULT, e.g. ``2:exit@3,1:nan@1,3:stall@2=5``:
    agent 2 kills itself (SIGKILL) after its local steps of round 3, agent 1 sends NaN buffers in round 1, agent 3
    sleeps 5 s before communicating in round 2 (rounds 0-based). A restarted process runs cleanly."""

    exit: frozenset[int] = frozenset()
    nan: frozenset[int] = frozenset()
    stall: Mapping[int, float] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_env(cls, agent: int, *, restarted: bool) -> Faults:
        spec = os.environ.get(FAULT_ENV, "").strip()
        if not spec or restarted:
            return cls()
        exits, nans, stalls = set(), set(), {}
        for item in spec.split(","):
            try:
                who, what = item.strip().split(":")
                kind, when = what.split("@")
                round_index, _, seconds = when.partition("=")
                if kind not in ("exit", "nan", "stall") or (kind == "stall") != bool(seconds):
                    raise ValueError
                if int(who) == agent:
                    if kind == "stall":
                        stalls[int(round_index)] = float(seconds)
                    else:
                        (exits if kind == "exit" else nans).add(int(round_index))
            except ValueError:
                raise ConfigError(f"{FAULT_ENV}: cannot read {item!r} (expected AGENT:exit@R, AGENT:nan@R or "
                                  "AGENT:stall@R=SECONDS)") from None
        return cls(frozenset(exits), frozenset(nans), stalls)

    def before_communication(self, round_index: int) -> None:
        if round_index in self.stall:
            time.sleep(self.stall[round_index])

    def after_local_steps(self, round_index: int) -> None:
        if round_index in self.exit:
            os.kill(os.getpid(), signal.SIGKILL)

    def outgoing(self, round_index: int, buffer: torch.Tensor) -> torch.Tensor:
        return torch.full_like(buffer, float("nan")) if round_index in self.nan else buffer


class Payload:
    """Layout of the one flat buffer an agent sends per neighbour and round.

    For every factor group (``collect_factors`` order): A [M, r, n] when the strategy trains A, then B [M, m, r];
    then every extra (``collect_extras`` order), all in one dtype. Every agent has the same model, so the size
    is known before anything is received; ``fingerprint`` (entries, shapes, dtype) lets the transport refuse an
    agent whose layout differs.
    """

    def __init__(self, groups: list[FactorGroup], extras: Extras, *, trains_A: bool) -> None:
        self.trains_A = trains_A
        factors, others = self._entries(groups, extras)
        self.n_factors = len(factors)
        self.shapes = [tuple(t.shape) for t in factors + others]
        self.dtypes = [t.dtype for t in factors + others]
        self.sizes = [t.numel() for t in factors + others]
        self.dtype = functools.reduce(torch.promote_types, self.dtypes)
        self.numel = sum(self.sizes)
        described = json.dumps([[list(s), str(d)] for s, d in zip(self.shapes, self.dtypes)] + [str(self.dtype)])
        self.fingerprint = f"{self.numel}:{self.dtype}:{hashlib.sha1(described.encode()).hexdigest()[:16]}"

    def _entries(self, groups: list[FactorGroup], extras: Extras) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """One agent's factors [M, ...] (agent axis dropped) and extras [...], in buffer order."""
        if any(g.n_agents != 1 for g in groups) or any(x.shape[0] != 1 for x in extras.values()):
            raise ValueError("groups/extras must hold exactly one agent")
        factors = [t[:, 0] for g in groups for t in ((g.A, g.B) if self.trains_A else (g.B,))]
        return factors, [x[0] for x in extras.values()]

    def pack(self, groups: list[FactorGroup], extras: Extras) -> torch.Tensor:
        """One agent's groups (A [M, 1, r, n], B [M, 1, m, r]) and extras [1, ...] -> buffer [numel]."""
        factors, others = self._entries(groups, extras)
        return torch.cat([t.reshape(-1).to(self.dtype) for t in factors + others])

    def unpack(self, buffers: torch.Tensor, own_groups: list[FactorGroup], own_extras: Extras
               ) -> tuple[list[FactorGroup], Extras]:
        """k agents' buffers [k, numel] -> groups (A [M, k, r, n], B [M, k, m, r]) and extras {name: [k, ...]}.

        own_groups / own_extras (one agent) give the names; when A is not trained it is taken from own_groups
        (the A all agents share).
        """
        k = buffers.shape[0]
        pieces = []
        for index, (piece, shape, dtype) in enumerate(zip(buffers.split(self.sizes, dim=1), self.shapes, self.dtypes)):
            piece = piece.reshape(k, *shape).to(dtype)
            pieces.append((piece.movedim(0, 1) if index < self.n_factors else piece).contiguous())
        stream = iter(pieces)
        groups = []
        for g in own_groups:
            A = next(stream) if self.trains_A else g.A.expand(-1, k, -1, -1).contiguous()
            groups.append(FactorGroup(list(g.names), A, next(stream)))
        return groups, {name: next(stream) for name in own_extras}


def mix_row(strategy: Strategy, groups: list[FactorGroup], extras: Extras, weights: torch.Tensor
            ) -> tuple[list[FactorGroup], Extras]:
    """One agent's new factors and extras from k stacked agents (A [M, k, r, n], B [M, k, m, r], extras [k, ...])
    with its mixing row `weights` [1, k]: decaf calls ``consensus_tsvd`` in its [1, k] form, dlora mixes A and B,
    dlora_fa mixes B and keeps the shared A; extras are mixed alike. Returns one agent (agent axis of size 1)."""
    new_groups = []
    for g in groups:
        if isinstance(strategy, DeCAF):
            A, B, _ = consensus_tsvd(g.A, g.B, weights.to(g.A), g.rank, method=strategy.method,
                                     oversample=strategy.oversample, n_iter=strategy.n_iter, seed=strategy.seed)
        else:
            A = mix(weights, g.A, 1) if strategy.trains_A else g.A[:, :1].clone()
            B = mix(weights, g.B, 1)
        new_groups.append(FactorGroup(list(g.names), A, B))
    return new_groups, {name: mix(weights, x, 0) for name, x in extras.items()}


class AgentTrainer(Trainer):
    """The simulator's :class:`Trainer` reduced to one agent (this process's); the others are reached through a
    :class:`~decaf_ext.exchange.Transport`.

    Construction repeats the simulator's (same seeds, data split, partition and initialization), then keeps only
    this agent's model, data shard and sampler. Files: <output_dir>/agents/agent_XX/ is this agent's own run
    folder (config, the evaluations it took part in, checkpoints, summary with the faults it saw); the reporter
    of a round (its lowest member) also writes <output_dir>/metrics.jsonl and, at the end, summary.json and
    adapters/average; every agent writes adapters/agent_XX.
    """

    def __init__(self, config: TrainConfig, agent: int, store: dist.Store, options: DistributedOptions,
                 backend: str) -> None:
        self.agent = agent
        super().__init__(config)
        self.output_dir = self.run_dir
        self.run_dir = os.path.join(self.output_dir, "agents", f"agent_{agent:02d}")
        self.agent_ids = [agent]
        self.samplers = [AgentSampler(np.arange(len(self.parts[agent])), config.batch_size, config.seed, agent)]
        groups, extras = collect_factors(self.models), collect_extras(self.models)
        self.payload = Payload(groups, extras, trains_A=self.strategy.trains_A)
        self.transport = Transport(store, agent, config.agents, fingerprint=self.payload.fingerprint,
                                   backend=backend, timeout=options.round_timeout,
                                   startup_timeout=options.startup_timeout)
        self.buffer_device = self.device if backend == "nccl" else torch.device("cpu")
        # restarted by the launcher (same store, next incarnation) or by torchrun (new store, restart count)
        self.restarted = self.transport.incarnation > 1 or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
        self.faults = Faults.from_env(agent, restarted=self.restarted)
        self.view: RoundView | None = None

    def build_data(self) -> None:
        """As the simulator, then keep only this agent's training examples (sampled by local position)."""
        super().build_data()
        part = torch.as_tensor(self.parts[self.agent], dtype=torch.int64)
        self.train_set = Encoded({k: v[part] for k, v in self.train_set.inputs.items()}, self.train_set.labels[part])

    def build_models(self) -> None:
        """As the simulator (identical initialization), then keep only this agent's model (and the scratch one)."""
        super().build_models()
        self.models = [self.models[self.agent]]

    # ----------------------------------------------------------------------------------- communication

    def _communicate_round(self, round_index: int) -> RoundView | None:
        """Agree on the round's members, then mix with them; None when this agent is left out of the round."""
        start = self.clock()
        self.faults.before_communication(round_index)
        view = self.transport.agree(round_index)
        if view is not None and not self.transport.connect(view):
            view = None
        if view is not None:
            groups, extras = collect_factors(self.models), collect_extras(self.models)
            if self.strategy.payload(groups, extras) > 0:
                mix = self._gossip if self.strategy.decentralized else self._average
                sent = mix(view, round_index, groups, extras)
                self.counters["bytes_sent"] += sent
                if sent > 0 and self.config.optimizer_state == "reset":
                    self.optimizers[0].state.clear()
        self.counters["time_comm"] += self.clock() - start
        return view

    def _gossip(self, view: RoundView, round_index: int, groups: list[FactorGroup], extras: Extras) -> int:
        """dlora / decaf / dlora_fa: exchange with the live neighbours, mix with this agent's row of W; the weight
        of a neighbour that is missing (left out, failed, rejected) moves to this agent's own factors, so the
        row still sums to 1 (and W stays symmetric and doubly stochastic over the members when both ends agree).
        Returns the bytes sent."""
        row = self.schedule.at(round_index)[self.agent]
        neighbours = [j for j in range(self.config.agents) if j != self.agent and row[j] > 0]
        peers = [j for j in neighbours if j in view.members]
        own = self.payload.pack(groups, extras).to(self.buffer_device)
        received = self.transport.exchange(view, self.faults.outgoing(round_index, own), peers)
        live = sorted(received)
        missing = [j for j in neighbours if j not in received]
        if missing:
            log.info("agent %d, round %d: mixing without agents %s (their weight %.4g stays with this agent)",
                     self.agent, round_index, missing, float(row[missing].sum()))
        weights = torch.cat([(row[self.agent] + row[missing].sum()).reshape(1), row[live]])
        stacked = self.payload.unpack(torch.stack([own, *(received[j] for j in live)]).to(self.device), groups,
                                      extras)
        new_groups, new_extras = mix_row(self.strategy, *stacked, weights[None])
        write_factors(self.models, new_groups)
        write_extras(self.models, new_extras)
        return len(peers) * self.strategy.payload(groups, extras)

    def _average(self, view: RoundView, round_index: int, groups: list[FactorGroup], extras: Extras) -> int:
        """fedavg: the mean over the round's members with one all_reduce; a failed or non-finite result leaves
        this agent's factors as they are. Returns the bytes sent (one upload, as the simulator counts)."""
        buffer = self.faults.outgoing(round_index, self.payload.pack(groups, extras).to(self.buffer_device))
        if self.transport.all_reduce(view, buffer):
            reason = check_buffer(buffer, self.payload.numel, self.payload.dtype)
            if reason is None:
                mean = (buffer / len(view.members)).to(self.device)
                new_groups, new_extras = self.payload.unpack(mean[None], groups, extras)
                write_factors(self.models, new_groups)
                write_extras(self.models, new_extras)
            else:
                self.transport.record_event(round_index, "rejected", f"average rejected ({reason})", reason=reason)
        return self.strategy.payload(groups, extras)

    # -------------------------------------------------------------------------------------- evaluation

    def _evaluate_round(self, rounds_done: int, view: RoundView) -> None:
        """Test metrics of every member and of their averaged model, as the simulator logs them (plus
        ``members``): one all_gather of [loss_sum, loss_steps, bytes_sent, accuracy, macro_f1, payload]."""
        start = self.clock()
        own = self.evaluate_model(self.models[0])
        groups, extras = collect_factors(self.models), collect_extras(self.models)
        numbers = [self.counters["loss_sum"], self.counters["loss_steps"], self.counters["bytes_sent"],
                   own["accuracy"], own["macro_f1"]]
        mine = torch.cat([torch.tensor(numbers, dtype=torch.float64), self.payload.pack(groups, extras).double().cpu()])
        gathered = self.transport.all_gather(view, mine.to(self.buffer_device))
        self.counters["loss_sum"], self.counters["loss_steps"] = 0.0, 0
        if gathered is None:
            self.transport.record_event(view.round, "evaluation_lost", f"evaluation after round {rounds_done} lost")
            return
        gathered = gathered.cpu()
        loss_sum, loss_steps, bytes_sent = gathered[:, :3].sum(dim=0).tolist()
        agents = [{"accuracy": accuracy, "macro_f1": macro_f1} for accuracy, macro_f1 in gathered[:, 3:STATS].tolist()]
        buffers = gathered[:, STATS:].to(self.payload.dtype).to(self.device)
        all_groups, all_extras = self.payload.unpack(buffers, groups, extras)
        average = self.evaluate_model(self.average_model(all_groups, all_extras))
        self.counters["time_eval"] += self.clock() - start
        record = self.evaluation_record(rounds_done, agents, average, all_groups, loss_sum, loss_steps,
                                        int(bytes_sent))
        self.history.append({**record, "members": view.agents})
        self.write_metrics()
        if self.agent == view.agents[0]:
            self._report_metrics()

    def _report_metrics(self) -> None:
        """Merge this agent's history into <output_dir>/metrics.jsonl (by round; records it missed are kept)."""
        path = os.path.join(self.output_dir, METRICS)
        records = {}
        if os.path.exists(path):
            with open(path, encoding="utf-8") as handle:
                records = {r["round"]: r for r in map(json.loads, handle.read().splitlines())}
        records.update({r["round"]: r for r in self.history})
        write_json(path, [records[k] for k in sorted(records)], lines=True)

    # --------------------------------------------------------------------------------------------- run

    def _open(self, resume: bool) -> int:
        """Prepare this agent's folder; returns the rounds this agent has done. Resuming, or restarted by the
        launcher or by torchrun, it continues from its newest checkpoint, or from the initial adapter if it has
        none yet."""
        if not (resume or self.restarted):
            done = self.prepare_run_dir(False)
            write_json(os.path.join(self.output_dir, "config.json"), self.config.to_dict())
            return done
        if resume:
            write_json(os.path.join(self.output_dir, "config.json"), self.config.to_dict())
        if latest_checkpoint(self.run_dir) is not None:
            return self.prepare_run_dir(True)
        self.transport.record_event(-1, "no_checkpoint", "restarted without a checkpoint: from the initial adapter")
        os.makedirs(self.run_dir, exist_ok=True)
        return 0

    def run(self, *, resume: bool = False) -> dict[str, Any]:
        """Train this agent for the remaining rounds with the others; returns its summary (also written to
        its folder; the final reporter writes <output_dir>/summary.json)."""
        cfg = self.config
        try:
            done = self.transport.start(self._open(resume))
            wall = time.perf_counter()
            bar = tqdm(total=cfg.rounds, initial=done, unit="round", dynamic_ncols=True,
                       disable=not cfg.progress or self.agent != 0,
                       desc=f"{cfg.algorithm} {cfg.topology} x{cfg.agents} (distributed)")
            while done < cfg.rounds:
                round_index = done
                if cfg.comm_order == "mix_then_train":
                    self.view = self._communicate_round(round_index)
                self.local_round(round_index)
                self.faults.after_local_steps(round_index)
                if cfg.comm_order == "train_then_mix":
                    self.view = self._communicate_round(round_index)
                done = round_index + 1
                if self.view is None:  # left out: continue with the group's round
                    done = max(done, self.transport.latest + 1)
                else:
                    if done % cfg.eval_every == 0 or done == cfg.rounds:
                        self._evaluate_round(done, self.view)
                    if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == cfg.rounds:
                        self.write_checkpoint(done)
                bar.update(min(done, cfg.rounds) - bar.n)
            bar.close()
            return self._finish(time.perf_counter() - wall)
        finally:
            self.transport.close()

    def _export(self, model: torch.nn.Module, name: str) -> None:
        """peft adapter of `model` into <output_dir>/adapters/<name> (written to a temporary folder, then renamed)."""
        folder = os.path.join(self.output_dir, "adapters", name)
        temporary = f"{folder}.tmp-{os.getpid()}"
        model.save_pretrained(temporary)
        shutil.rmtree(folder, ignore_errors=True)
        os.rename(temporary, folder)

    def _finish(self, wall_seconds: float) -> dict[str, Any]:
        """Export adapters and write the summaries."""
        reporter = self.view is not None and self.agent == self.view.agents[0] and bool(self.history)
        self._export(self.models[0], f"agent_{self.agent:02d}")
        summary = (self.build_summary(wall_seconds) if self.history
                   else {"algorithm": self.config.algorithm, "final": None})
        if self.history:
            summary["examples"]["train"] = len(self.train_labels)
            summary["run_dir"] = self.output_dir
        summary["distributed"] = {"agent": self.agent, "incarnation": self.transport.incarnation,
                                  "backend": self.transport.backend, "reporter": reporter,
                                  "members": self.view.agents if self.view else None, "events": self.transport.events}
        write_json(os.path.join(self.run_dir, SUMMARY), summary)
        if reporter:
            self._export(self.scratch, "average")
            write_json(os.path.join(self.output_dir, SUMMARY), summary)
        return summary


# ------------------------------------------------------------------------------------------- entry points


def _process_rank() -> tuple[int, int, int]:
    """(RANK, WORLD_SIZE, LOCAL_RANK) from the environment torchrun or :func:`launch` sets."""
    try:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))
    except (KeyError, ValueError):
        raise ConfigError("launcher: RANK and WORLD_SIZE are not set; start the agents with torchrun or with "
                          "python -m decaf_ext.distributed --nproc N") from None


def _agent_device(name: str, local_rank: int) -> torch.device:
    """The device of this process: auto/cuda -> cuda:LOCAL_RANK when CUDA is available, else cpu (as given)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    return torch.device(name)


def run_distributed(config: TrainConfig, *, resume: bool = False, options: DistributedOptions | None = None,
                    store: dist.Store | None = None) -> dict[str, Any]:
    """Train this process's agent of a distributed run and return its summary.

    The process is agent RANK of WORLD_SIZE (which must equal config.agents), as torchrun or
    ``python -m decaf_ext.distributed --nproc N`` set it. store: the run's store (default: the env://
    rendezvous store, under the prefix "decaf_ext"); pass a differently prefixed store to run several runs
    one after the other in the same processes. resume: continue every agent from its newest checkpoint in
    config.output_dir. Without output_dir the agents agree on one runs/<algorithm>-<topology>-<time> folder
    (name it explicitly with torchrun --max-restarts).
    """
    options = options or DistributedOptions()
    options.validate()
    config.validate()
    agent, world, local_rank = _process_rank()
    if world != config.agents:
        raise ConfigError(f"agents: the run has {config.agents} agents but {world} processes (WORLD_SIZE); "
                          "start one process per agent")
    device = _agent_device(config.device, local_rank)
    backend = options.backend if options.backend != "auto" else "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError("backend: nccl needs a CUDA device (use gloo on CPU)")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if store is None:
        rendezvous, _, _ = next(dist.rendezvous("env://", timeout=timedelta(seconds=options.startup_timeout)))
        store = dist.PrefixStore("decaf_ext", rendezvous)
    default_dir = os.path.join("runs", f"{config.algorithm}-{config.topology}-{datetime.now():%Y%m%d-%H%M%S}")
    output_dir = config.output_dir or store.compare_set("output_dir", "", default_dir).decode()
    # torchrun restarts every worker at once and keeps its store: each attempt gets its own namespace
    store = dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    config = dataclasses.replace(config, output_dir=output_dir, device=str(device))
    return AgentTrainer(config, agent, store, options, backend).run(resume=resume)


def launch(command: Sequence[str], nproc: int, *, max_restarts: int = 0, env: Mapping[str, str] | None = None
           ) -> list[int]:
    """Run `command` as the `nproc` processes of one run on this machine and return their exit statuses.

    Each process gets torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and the
    TCPStore is hosted here, so any process may die without taking the store along (torchrun's own agent
    stops every worker of a node when one fails); OMP_NUM_THREADS defaults to 1, as under torchrun. A process
    that exits with a nonzero status is started again,
    up to `max_restarts` times per rank; it then rejoins the run from its newest checkpoint.
    """
    if nproc < 1:
        raise ConfigError(f"nproc must be >= 1, got {nproc}")
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    shared = {"OMP_NUM_THREADS": "1", **os.environ, **(env or {}), "MASTER_ADDR": "127.0.0.1",
              "MASTER_PORT": str(store.port),
              "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc), "TORCHELASTIC_USE_AGENT_STORE": "True"}

    def start(rank: int) -> subprocess.Popen:
        return subprocess.Popen(list(command), env={**shared, "RANK": str(rank), "LOCAL_RANK": str(rank)})

    processes = {rank: start(rank) for rank in range(nproc)}
    restarts = dict.fromkeys(processes, 0)
    status: dict[int, int] = {}
    try:
        while len(status) < nproc:
            for rank, process in processes.items():
                if rank in status or process.poll() is None:
                    continue
                if process.returncode != 0 and restarts[rank] < max_restarts:
                    restarts[rank] += 1
                    log.warning("rank %d exited with status %d; restarting it (%d/%d)", rank, process.returncode,
                                restarts[rank], max_restarts)
                    processes[rank] = start(rank)
                else:
                    status[rank] = process.returncode
            time.sleep(0.1)
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.terminate()
                process.wait()
    return [status[rank] for rank in range(nproc)]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m decaf_ext.distributed``: ``decaf-train --launcher dist`` (see decaf_ext.cli)."""
    from decaf_ext.cli import main as cli_main

    argv = list(sys.argv[1:] if argv is None else argv)
    return cli_main([*argv, "--launcher", "dist"], prog="python -m decaf_ext.distributed")


if __name__ == "__main__":
    sys.exit(main())
