"""One agent of a distributed run in its own process (see docs/distributed.md).

    python -m decaf_ext.distributed --nproc 4 --agents 4 ...          local launcher (survives a dying agent)
    torchrun --nproc-per-node 4 -m decaf_ext.distributed --agents 4 ...

Each process builds exactly what the simulator builds for its agent (:class:`~decaf_ext.sim.agents.Agents`
with ``keep``: same data split, partition, initialization and per-agent data order), keeps only its own data
shard and adapter, and replaces the in-memory mixing by messages through its
:class:`~decaf_ext.comm.agent_comm.AgentComm` (one flat buffer per neighbour and round for a decentralized
strategy, every member's for a server strategy such as fedavg, then the strategy's own ``communicate``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from decaf_ext.comm.agent_comm import AgentComm, HooksFactory
from decaf_ext.comm.agent_round import compact
from decaf_ext.comm.control_store import shared_value
from decaf_ext.comm.kit import Kit, load_checked_kit
from decaf_ext.comm.guard import BROADCAST, TagContext, load_run_key
from decaf_ext.comm.transport import BACKENDS, RoundView, check_backend, check_timeout
from decaf_ext.config import TrainConfig
from decaf_ext.device import resolve_device
from decaf_ext.distributed.evaluation_check import STATS, check_evaluation
from decaf_ext.distributed.graceful import leave_on_sigterm
from decaf_ext.elastic import LiveMixing
from decaf_ext.errors import ConfigError
from decaf_ext.lora import collect_extras, new_mixing_tally, write_extras
from decaf_ext.sim.agents import Agents
from decaf_ext.sim.evaluation import MetricsLog, build_summary, evaluation_record
from decaf_ext.sim.resume import open_run_dir, write_checkpoint
from decaf_ext.sim.tensorboard_log import TensorBoardLog
from decaf_ext.storage.checkpoint import latest_checkpoint
from decaf_ext.storage.export import export_adapter
from decaf_ext.storage.files import replacing_folder, write_json
from decaf_ext.storage.run_folder import CONFIG, METRICS, SUMMARY, RunLock, agent_folder, check_no_run, \
    default_run_dir



@dataclass
class DistributedOptions:
    """Knobs of the transport. backend: auto (nccl on CUDA, else gloo), gloo or nccl; round_timeout: seconds
    an agent waits for the others in one round before leaving them out; startup_timeout: seconds to wait for
    every agent at start (model loading included)."""

    backend: str = "auto"
    round_timeout: float = 60.0
    startup_timeout: float = 600.0

    def validate(self) -> None:
        if self.backend not in ("auto", *BACKENDS):
            raise ConfigError(f"backend must be one of {', '.join(('auto', *BACKENDS))}; got {self.backend!r}")
        for name in ("round_timeout", "startup_timeout"):
            check_timeout(name, getattr(self, name))


class AgentRuntime:
    """Agent `agent` of a distributed run: the simulator's :class:`~decaf_ext.sim.agents.Agents` kept to this
    agent, and its :class:`~decaf_ext.comm.agent_comm.AgentComm` to reach the others.

    Files: <output_dir>/agents/agent_XX/ is this agent's own run folder (config, the evaluations it took part in,
    checkpoints, summary with the faults it saw); the reporter of a round (its lowest member) also writes
    <output_dir>/metrics.jsonl and, at the end, summary.json and adapters/average; every agent writes
    adapters/agent_XX.
    """

    def __init__(self, config: TrainConfig, agent: int, store: dist.Store | None, options: DistributedOptions,
                 backend: str, test_hooks: HooksFactory | None = None, kit: Kit | None = None) -> None:
        self.config, self.agent = config, agent
        self.output_dir = config.output_dir
        self.run_dir = agent_folder(self.output_dir, agent)
        self.agents = Agents(config, keep=agent)
        self.log = MetricsLog(self.run_dir, tensorboard=config.tensorboard)
        self.churn = config.churn_schedule()  # scheduled joins and departures (docs/membership.md)
        self.mixing = LiveMixing.of(config, self.agents.schedule)
        models = self.agents.models
        # restarted by the launcher (same store, next incarnation: AgentComm sees it) or by torchrun (new store)
        self.comm = AgentComm(self.agents.strategy, self.agents.collect(models), collect_extras(models), store=store,
                              agent=agent, n_agents=config.agents, backend=backend, device=self.agents.device,
                              run_key=load_run_key(config.run_key_file), norm_bound=config.norm_bound,
                              norm_cap=config.norm_cap,
                              message_dtype=config.message_dtype, ranks=config.agent_ranks(),
                              round_timeout=options.round_timeout, startup_timeout=options.startup_timeout,
                              restarted=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0,
                              test_hooks=test_hooks, kit=kit, churn=self.churn, mixing=self.mixing)
        self.transport = self.comm.transport
        self.view: RoundView | None = None
        self.row: torch.Tensor | None = None  # this agent's row of W [N] in its last round
        self.joined_round: int | None = None  # the round this agent joined in without a state of its own

    # ----------------------------------------------------------------------------------- communication

    def communicate(self, round_index: int) -> RoundView | None:
        """Agree on the round's members, then mix with them; None when this agent is left out of the round."""
        agents = self.agents
        start = agents.clock()
        groups, extras = agents.collect(agents.models), collect_extras(agents.models)
        view, mixed = self.comm.round(round_index, groups, extras, lambda view: self._mixing(round_index, view))
        if view is not None and self.transport.fresh:
            self.transport.fresh, self.joined_round = False, round_index
        if mixed is not None:
            agents.write(agents.models, mixed.groups)
            write_extras(agents.models, mixed.extras)
            agents.counters["bytes_sent"] += mixed.bytes_sent
            if mixed.bytes_sent > 0 and self.config.optimizer_state == "reset":
                agents.optimizers[0].state.clear()
        agents.counters["time_comm"] += agents.clock() - start
        if mixed is not None:
            agents.tally_mixing(0, mixed.received, mixed.weights)
        return view

    def _mixing(self, round_index: int, view: RoundView) -> torch.Tensor:
        """W [N, N] of round `round_index` on the view's live graph (the configured W while all are live)."""
        W = self.mixing.at(round_index, view.live, view.joining)
        self.row = W[self.agent]
        return W

    # -------------------------------------------------------------------------------------- evaluation

    def evaluate(self, rounds_done: int, view: RoundView) -> None:
        """Test metrics of every member and of their averaged model, as the simulator logs them (plus
        ``members``): two all_gathers, of [loss_sum, loss_steps, bytes_sent, accuracy, macro_f1, dp_epsilon,
        mixing tally, tag] (float64) and of [factors, tag] (the layout's dtype). A member whose buffers fail their
        checks (tags, finite and plausible numbers, the factors' bounds) is left out of the record."""
        agents, layout, guard = self.agents, self.comm.layout, self.comm.guard
        start = agents.clock()
        own = agents.evaluate_model(agents.models[0])
        groups, extras = agents.collect(agents.models), collect_extras(agents.models)
        counters = agents.counters
        numbers = torch.tensor([counters["loss_sum"], counters["loss_steps"], counters["bytes_sent"], own["accuracy"],
                                own["macro_f1"], agents.spent(0).get("dp_epsilon", 0.0), *counters["mixing"][0]],
                               dtype=torch.float64)
        factors = layout.pack(groups, extras).cpu()

        def context(purpose: str, j: int) -> TagContext:
            return TagContext(purpose, view.round, view.group, j, view.members[j], BROADCAST)

        hooks, seal = self.comm.hooks, lambda data: guard.seal(data, context("eval", self.agent))  # noqa: E731
        device = self.comm.agent_round.buffer_device
        sealed = seal(numbers) if hooks is None else hooks.evaluation(view.round, numbers, seal)
        stats = self.transport.all_gather(view, sealed.to(device))
        gathered = None if stats is None else self.transport.all_gather(
            view, guard.seal(factors, context("eval_factors", self.agent)).to(device))
        counters["loss_sum"], counters["loss_steps"], counters["mixing"] = 0.0, 0, new_mixing_tally(1)
        if gathered is None:
            self.transport.record_event(view.round, "evaluation_lost", f"evaluation after round {rounds_done} lost")
            return
        stats, gathered, accepted, members = stats.cpu(), gathered.cpu(), [], []
        for k, j in enumerate(view.agents):
            if j == self.agent:  # its own numbers as it holds them, not as they crossed the wire
                data, reason = numbers, None
                gathered[k, :layout.data_numel].copy_(factors)
            else:
                data, reason = guard.open(stats[k], context("eval", j))
                theirs, why = guard.open(gathered[k], context("eval_factors", j))
                reason = reason or why or check_evaluation(data, theirs, layout, guard, groups, extras)
            if reason is None:
                accepted.append(data)
                members.append(j)
            else:
                self.transport.record_event(view.round, "rejected", f"evaluation of agent {j} rejected ({reason})",
                                            agent=j, reason=reason, what="evaluation")
        stacked = torch.stack(accepted)
        loss_sum, loss_steps, bytes_sent = stacked[:, :3].sum(dim=0).tolist()
        per_agent = [{"accuracy": accuracy, "macro_f1": macro_f1, "dp_epsilon": epsilon}
                     for accuracy, macro_f1, epsilon in stacked[:, 3:6].tolist()]
        mixing = [[error, reference, int(rounds)] for error, reference, rounds in stacked[:, 6:STATS].tolist()]
        # the accepted members' factors, moved up in place (no copy of the gathered rows)
        buffers = compact(gathered, view.agents, members)[:, :layout.data_numel].to(agents.device)
        # names, and the shared A of a strategy that does not send A: the scratch model's (largest rank)
        all_groups, all_extras = layout.unpack(buffers, agents.collect([agents.scratch]), extras)
        average = agents.evaluate_model(agents.average_model(all_groups, all_extras))
        counters["time_eval"] += agents.clock() - start
        record = evaluation_record(agents, rounds_done, per_agent, average, all_groups, loss_sum, loss_steps,
                                   int(bytes_sent), mixing)
        record["members"] = members
        # the live set can change in any distributed run (a crashed agent); the mixing row goes to this agent's log
        record.update(self.mixing.fields(max(view.round, 0), view.live, view.joining),
                      mixing_row=None if self.row is None else self.row.tolist())
        self.log.add(record)
        if self.agent == view.agents[0]:
            self._report_metrics()

    def _report_metrics(self) -> None:
        """Merge this agent's history into <output_dir>/metrics.jsonl (by round; records it missed are kept)."""
        path = os.path.join(self.output_dir, METRICS)
        records = {}
        if os.path.exists(path):
            with open(path, encoding="utf-8") as handle:
                records = {r["round"]: r for r in map(json.loads, handle.read().splitlines())}
        records.update({r["round"]: shared(r) for r in self.log.history})
        write_json(path, [records[k] for k in sorted(records)], lines=True)

    # --------------------------------------------------------------------------------------------- run

    def _open(self, resume: bool) -> int:
        """Prepare this agent's folder; returns the rounds this agent has done. Resuming, or restarted by the
        launcher or by torchrun, it continues from its newest checkpoint, or from the initial adapter if it has
        none yet."""
        config_path = os.path.join(self.output_dir, CONFIG)
        if not (resume or self.comm.restarted):
            if os.path.exists(os.path.join(self.run_dir, CONFIG)):  # advice for the whole run, not for this folder
                check_no_run(self.output_dir)
            done = open_run_dir(self.run_dir, self.agents, self.log, resume=False)
            write_json(config_path, self.config.to_dict())
            return done
        if latest_checkpoint(self.run_dir) is not None:
            done = open_run_dir(self.run_dir, self.agents, self.log, resume=True)  # checks the configuration first
        elif self.agents.privacy is not None:  # its messages so far are spent, by an accountant that is gone
            raise ConfigError(f"dp_epsilon: agent {self.agent} restarted without a checkpoint cannot account what it "
                              "already sent; it leaves the run")
        else:
            self.transport.record_event(-1, "no_checkpoint", "restarted without a checkpoint: from the initial adapter")
            done = 0
        if resume:
            write_json(config_path, self.config.to_dict())
        return done

    def run(self, *, resume: bool = False) -> dict[str, Any]:
        """Train this agent for the remaining rounds with the others; returns its summary (also written to
        its folder; the final reporter writes <output_dir>/summary.json). The agent holds its own folder's
        :class:`~decaf_ext.storage.run_folder.RunLock` throughout: a second agent into it is refused."""
        try:
            with RunLock(self.run_dir):
                return self._train(resume)
        finally:
            self.transport.close()
            self.log.close()

    def _train(self, resume: bool) -> dict[str, Any]:
        cfg, agents = self.config, self.agents
        own, join_at = self._open(resume), self.churn.joined_at(self.agent)
        done = self.comm.start(own, join_at, list(self.churn.initial))
        if agents.privacy is not None and (resume or self.comm.restarted) and done > own:  # a run that went on
            for private in agents.privacy:
                private.rejoin((done - own) * cfg.local_steps)
        self.transport.fresh = done > 0 and own == 0  # no state of its own: it starts from its neighbours'
        kind, at = self.churn.departure(self.agent) or ("", cfg.rounds)
        stop = at if kind == "leave" or self.comm.restarted else cfg.rounds  # a restarted crasher leaves instead
        if stop < cfg.rounds:  # announced now: nobody waits for it from that round on
            self.transport.leave(stop)
        wall = time.perf_counter()
        if cfg.eval_at_start and done == 0:  # round 0: the members agreed at startup, before any training
            view = self.transport.current_view()
            if self.transport.connect(view):
                self.evaluate(0, view)
        bar = tqdm(total=cfg.rounds, initial=done, unit="round", dynamic_ncols=True,
                   disable=not cfg.progress or self.agent != 0,
                   desc=f"{cfg.algorithm} {cfg.topology} x{cfg.agents} (distributed)")
        saved = None  # the rounds done of the newest checkpoint this loop wrote
        with leave_on_sigterm() as leaving:
            while done < stop:
                round_index, listening = done, self.transport.fresh  # a joiner listens first, then trains
                if cfg.comm_order == "mix_then_train":
                    self._crash_if_scheduled(round_index)
                    self.view = self.communicate(round_index)
                if not listening:
                    agents.local_round(round_index)
                self.comm.after_local_steps(round_index)
                if cfg.comm_order == "train_then_mix":
                    self._crash_if_scheduled(round_index)
                    self.view = self.communicate(round_index)
                done = round_index + 1
                if leaving.is_set() and done < stop:  # announced before the evaluation, which it still takes part in
                    self.transport.record_event(round_index, "leaving", f"SIGTERM: leaving the run before round "
                                                                        f"{done} (announced)")
                    self.transport.leave(done)
                    stop = done
                if self.view is None:  # left out: continue with the group's round
                    done = max(done, self.transport.latest + 1)
                else:
                    if done % cfg.eval_every == 0 or done == cfg.rounds:
                        self.evaluate(done, self.view)
                    if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == cfg.rounds:
                        write_checkpoint(self.run_dir, agents, self.log.history, done)
                        saved = done
                bar.update(min(done, cfg.rounds) - bar.n)
        bar.close()
        if done < cfg.rounds and saved != done:  # it left the run (also while left out of its last round)
            write_checkpoint(self.run_dir, agents, self.log.history, done)
        return self._finish(time.perf_counter() - wall)

    def _crash_if_scheduled(self, round_index: int) -> None:
        """``--churn kill:A@R``: agent A's process kills itself (SIGKILL, unannounced) before communicating in
        round R, as a crash would; a restarted process does not (it has announced leaving instead)."""
        if self.churn.departure(self.agent) == ("kill", round_index) and not self.comm.restarted:
            os.kill(os.getpid(), signal.SIGKILL)

    def _export(self, model: torch.nn.Module, name: str) -> None:
        """peft adapter of `model` and its card into <output_dir>/adapters/<name> (written to a temporary folder,
        then put in place; see :mod:`decaf_ext.storage.export`)."""
        with replacing_folder(os.path.join(self.output_dir, "adapters", name)) as temporary:
            export_adapter(model, temporary, self.agents.task, self.agents.label_names, self.agents.model_path)

    def _finish(self, wall_seconds: float) -> dict[str, Any]:
        """Export adapters and write the summaries."""
        history = [shared(r) for r in self.log.history]
        reporter = self.view is not None and self.agent == self.view.agents[0] and bool(history)
        self._export(self.agents.models[0], f"agent_{self.agent:02d}")
        summary = (build_summary(self.agents, history, self.output_dir, wall_seconds) if history
                   else {"algorithm": self.config.algorithm, "final": None})
        summary["distributed"] = {"agent": self.agent, "incarnation": self.transport.incarnation,
                                  "backend": self.transport.backend, "reporter": reporter,
                                  "joined_round": self.joined_round,
                                  "members": self.view.agents if self.view else None, "events": self.transport.events}
        write_json(os.path.join(self.run_dir, SUMMARY), summary)
        if reporter:
            self._export(self.agents.scratch, "average")
            write_json(os.path.join(self.output_dir, SUMMARY), summary)
        return summary


def shared(record: dict[str, Any]) -> dict[str, Any]:
    """A metrics record as the run's log and summaries hold it: without this agent's own W row."""
    return {k: v for k, v in record.items() if k != "mixing_row"}


def _process_rank() -> tuple[int, int, int]:
    """(RANK, WORLD_SIZE, LOCAL_RANK) from the environment torchrun or the launcher sets."""
    try:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))
    except (KeyError, ValueError):
        raise ConfigError("launcher: RANK and WORLD_SIZE are not set; start the agents with torchrun or with "
                          "python -m decaf_ext.distributed --nproc N") from None


def run_distributed(config: TrainConfig, *, resume: bool = False, options: DistributedOptions | None = None,
                    store: dist.Store | None = None, test_hooks: HooksFactory | None = None) -> dict[str, Any]:
    """Train this process's agent of a distributed run and return its summary.

    Args:
        config: the run's configuration; this process is agent RANK of WORLD_SIZE (which must equal
            config.agents), as torchrun or ``python -m decaf_ext.distributed --nproc N`` set it. Without
            output_dir the agents agree on one runs/<algorithm>-<topology>-<time> folder (name it explicitly with
            torchrun --max-restarts). With ``transport="tls"`` the agent is the one its kit names (started on
            its own, no RANK, no store; see docs/deploy.md) and the run folder is local to it.
        resume: continue every agent from its newest checkpoint in config.output_dir.
        options: backend and timeouts.
        store: the run's store (default: the env:// rendezvous store, under the prefix "decaf_ext"); pass a
            differently prefixed store to run several runs one after the other in the same processes.
        test_hooks: test-only fault injection (see :class:`~decaf_ext.comm.agent_comm.AgentComm`); leave None.

    Example::

        >>> run_distributed(TrainConfig(agents=4, output_dir="runs/d4"))   # under torchrun --nproc-per-node 4
    """
    options = options or DistributedOptions()
    options.validate()
    config.validate()
    kit = load_checked_kit(config) if config.transport == "tls" else None  # before anything is written
    agent, world, local_rank = (kit.agent, config.agents, 0) if kit is not None else _process_rank()
    if world != config.agents:
        raise ConfigError(f"agents: the run has {config.agents} agents but {world} processes (WORLD_SIZE); "
                          "start one process per agent")
    device = resolve_device(config.device, local_rank)
    backend = options.backend if options.backend != "auto" else "nccl" if device.type == "cuda" else "gloo"
    check_backend(backend, device)
    if config.tensorboard:
        TensorBoardLog.writer_class()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if store is None and kit is None:
        rendezvous, _, _ = next(dist.rendezvous("env://", timeout=timedelta(seconds=options.startup_timeout)))
        store = dist.PrefixStore("decaf_ext", rendezvous)
    default_dir = default_run_dir(f"{config.algorithm}-{config.topology}")
    # signed with the run key: a process without it cannot send the agents' files elsewhere
    output_dir = config.output_dir or (default_dir if kit is not None else shared_value(
        store, load_run_key(config.run_key_file), "output_dir", default_dir))
    if output_dir is None:
        raise ConfigError("output_dir: the agents could not agree on a run folder (the store's value keeps being "
                          "replaced); name one with --output-dir")
    # torchrun restarts every worker at once and keeps its store: each attempt gets its own namespace
    if kit is None:
        store = dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    config = dataclasses.replace(config, output_dir=output_dir, device=str(device)).with_absolute_paths()
    return AgentRuntime(config, agent, store, options, backend, test_hooks, kit).run(resume=resume)
