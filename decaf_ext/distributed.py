"""Distributed training: one process per agent on torch.distributed (see docs/distributed.md).

    python -m decaf_ext.distributed --nproc 4 --agents 4 ...          local launcher (survives a dying agent)
    torchrun --nproc-per-node 4 -m decaf_ext.distributed --agents 4 ...

Each process builds exactly what the simulator (:class:`~decaf_ext.trainer.Trainer`) builds for its agent —
same data split, partition, initialization and per-agent data order — keeps only its own data shard and adapter,
and replaces the in-memory mixing by messages (:class:`~decaf_ext.agent_mixer.AgentMixer`: one flat buffer per
neighbour and round for a decentralized strategy, every member's for a server strategy such as fedavg, then the
strategy's own ``communicate``). Round membership, timeouts and buffer validation live in
:mod:`decaf_ext.exchange`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
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
from decaf_ext.config import TrainConfig
from decaf_ext.errors import ConfigError
from decaf_ext.agent_mixer import AgentMixer
from decaf_ext.exchange import RoundView, Transport, check_backend, check_timeout
from decaf_ext.faults import Faults
from decaf_ext.export import export_adapter, labelled_base
from decaf_ext.lora import collect_extras, write_extras
from decaf_ext.message_guard import MessageGuard, load_run_key
from decaf_ext.payload import Payload
from decaf_ext.tasks import Encoded
from decaf_ext.trainer import AGENT_FOLDERS, CONFIG, METRICS, SUMMARY, AgentSampler, Trainer, check_free, write_json

log = logging.getLogger("decaf_ext.distributed")

BACKENDS: tuple[str, ...] = ("auto", "gloo", "nccl")
STATS = 5  # loss_sum, loss_steps, bytes_sent, accuracy, macro_f1: the per-agent numbers gathered at evaluation


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
            check_timeout(name, getattr(self, name))


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
        self.run_dir = os.path.join(self.output_dir, AGENT_FOLDERS, f"agent_{agent:02d}")
        self.agent_ids = [agent]
        self.samplers = [AgentSampler(np.arange(len(self.parts[agent])), config.batch_size, config.seed, agent)]
        guard = MessageGuard(load_run_key(config.run_key_file), config.norm_bound)
        groups, extras = self.collect(self.models), collect_extras(self.models)
        self.payload = Payload(groups, extras, trains_A=self.strategy.trains_A, trailer=guard.trailer,
                               message_dtype=config.message_dtype, ranks=config.agent_ranks())
        self.transport = Transport(store, agent, config.agents, fingerprint=self.payload.fingerprint,
                                   backend=backend, timeout=options.round_timeout,
                                   startup_timeout=options.startup_timeout)
        # restarted by the launcher (same store, next incarnation) or by torchrun (new store, restart count)
        self.restarted = self.transport.incarnation > 1 or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
        self.faults = Faults.from_env(agent, restarted=self.restarted)
        self.mixer = AgentMixer(self.strategy, self.transport, self.payload, guard=guard, faults=self.faults,
                                device=self.device)
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
            groups, extras = self.collect(self.models), collect_extras(self.models)
            mixed = self.mixer.communicate(view, round_index, groups, extras, self.schedule.at(round_index))
            if mixed is not None:
                self.write(self.models, mixed.groups)
                write_extras(self.models, mixed.extras)
                self.counters["bytes_sent"] += mixed.bytes_sent
                if mixed.bytes_sent > 0 and self.config.optimizer_state == "reset":
                    self.optimizers[0].state.clear()
        self.counters["time_comm"] += self.clock() - start
        return view

    # -------------------------------------------------------------------------------------- evaluation

    def _evaluate_round(self, rounds_done: int, view: RoundView) -> None:
        """Test metrics of every member and of their averaged model, as the simulator logs them (plus
        ``members``): one all_gather of [loss_sum, loss_steps, bytes_sent, accuracy, macro_f1, payload]."""
        start = self.clock()
        own = self.evaluate_model(self.models[0])
        groups, extras = self.collect(self.models), collect_extras(self.models)
        numbers = [self.counters["loss_sum"], self.counters["loss_steps"], self.counters["bytes_sent"],
                   own["accuracy"], own["macro_f1"]]
        mine = torch.cat([torch.tensor(numbers, dtype=torch.float64), self.payload.pack(groups, extras).double().cpu()])
        gathered = self.transport.all_gather(view, mine.to(self.mixer.buffer_device))
        self.counters["loss_sum"], self.counters["loss_steps"] = 0.0, 0
        if gathered is None:
            self.transport.record_event(view.round, "evaluation_lost", f"evaluation after round {rounds_done} lost")
            return
        gathered = gathered.cpu()
        loss_sum, loss_steps, bytes_sent = gathered[:, :3].sum(dim=0).tolist()
        agents = [{"accuracy": accuracy, "macro_f1": macro_f1} for accuracy, macro_f1 in gathered[:, 3:STATS].tolist()]
        buffers = gathered[:, STATS:].to(self.payload.dtype).to(self.device)
        # names, and the shared A of a strategy that does not send A: the scratch model's (largest rank)
        all_groups, all_extras = self.payload.unpack(buffers, self.collect([self.scratch]), extras)
        average = self.evaluate_model(self.average_model(all_groups, all_extras))
        self.counters["time_eval"] += self.clock() - start
        record = self.evaluation_record(rounds_done, agents, average, all_groups, loss_sum, loss_steps,
                                        int(bytes_sent))
        self.log_record({**record, "members": view.agents})
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
            if os.path.exists(os.path.join(self.run_dir, CONFIG)):  # advice for the whole run, not for this folder
                check_free(self.output_dir)
            done = self.prepare_run_dir(False)
            write_json(os.path.join(self.output_dir, "config.json"), self.config.to_dict())
            return done
        if latest_checkpoint(self.run_dir) is not None:
            done = self.prepare_run_dir(True)  # checks the configuration before anything is written
        else:
            self.transport.record_event(-1, "no_checkpoint", "restarted without a checkpoint: from the initial adapter")
            os.makedirs(self.run_dir, exist_ok=True)
            done = 0
        if resume:
            write_json(os.path.join(self.output_dir, "config.json"), self.config.to_dict())
        return done

    def run(self, *, resume: bool = False) -> dict[str, Any]:
        """Train this agent for the remaining rounds with the others; returns its summary (also written to
        its folder; the final reporter writes <output_dir>/summary.json)."""
        cfg = self.config
        try:
            done = self.transport.start(self._open(resume))
            wall = time.perf_counter()
            if cfg.eval_at_start and done == 0:  # round 0: the members agreed at startup, before any training
                view = self.transport.current_view()
                if self.transport.connect(view):
                    self._evaluate_round(0, view)
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
            if self.tensorboard is not None:
                self.tensorboard.close()

    def _labelled_base(self) -> str | None:
        """<output_dir>/adapters/base, the labelled base model folder the adapters name (as the simulator's, see
        :mod:`decaf_ext.export`), made by whichever agent comes first; None for a model that is not a local
        folder."""
        folder = os.path.join(self.output_dir, "adapters", "base")
        if os.path.isdir(folder):
            return os.path.abspath(folder)
        temporary = f"{folder}.tmp-{os.getpid()}"
        shutil.rmtree(temporary, ignore_errors=True)
        if labelled_base(self.model_path, self.models[0].get_base_model().config, temporary) is None:
            return None
        try:
            os.rename(temporary, folder)
        except OSError:  # another agent renamed its identical folder first
            shutil.rmtree(temporary, ignore_errors=True)
        return os.path.abspath(folder)

    def _export(self, model: torch.nn.Module, name: str) -> None:
        """peft adapter of `model` into <output_dir>/adapters/<name> (written to a temporary folder, then renamed),
        naming the labelled base folder."""
        folder = os.path.join(self.output_dir, "adapters", name)
        temporary = f"{folder}.tmp-{os.getpid()}"
        export_adapter(model, temporary, self._labelled_base())
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
    check_backend(backend, device)
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
