"""A run's folder over its life: opened fresh (one run per folder) or reopened to resume, checkpointed every few
rounds, restored bitwise from its newest checkpoint.

Example::

    >>> with RunLock(run_dir):
    ...     done = open_run_dir(run_dir, agents, log, resume=False)   # writes config.json; 0 rounds done
    ...     write_checkpoint(run_dir, agents, log.history, 2)
"""

from __future__ import annotations

import os

from decaf_ext.errors import ConfigError
from decaf_ext.storage.loading import load_saved
from decaf_ext.lora import FactorGroup, collect_extras, write_extras
from decaf_ext.sim.agents import Agents
from decaf_ext.sim.evaluation import MetricsLog
from decaf_ext.storage.checkpoint import Checkpoint, capture_rng, latest_checkpoint, load_checkpoint, restore_rng, \
    save_checkpoint
from decaf_ext.storage.files import write_json
from decaf_ext.storage.run_folder import CONFIG, SUMMARY, check_no_run, checkpoint_folders, resume_command


def write_checkpoint(run_dir: str, agents: Agents, history: list[dict], rounds_done: int) -> None:
    """Everything needed to continue after `rounds_done` rounds: factors, extras, optimizers, samplers, history,
    counters and every RNG state."""
    groups, extras = agents.collect(agents.models, raw=True), collect_extras(agents.models)
    tensors = {f"factors/{k}/{factor}": getattr(g, factor) for k, g in enumerate(groups) for factor in "AB"}
    tensors.update({f"extras/{name}": x for name, x in extras.items()})
    state = {"samplers": [s.state_dict() for s in agents.samplers], "history": history, "counters": agents.counters}
    if agents.privacy is not None:  # accountants, calibration and the secret generators (docs/privacy.md)
        state["privacy"] = [private.state_dict() for private in agents.privacy]
    save_checkpoint(run_dir, Checkpoint(round=rounds_done, tensors=tensors,
                                        optimizers=[o.state_dict() for o in agents.optimizers],
                                        state=state, rng=capture_rng()))


def restore(run_dir: str, agents: Agents) -> tuple[int, list[dict]]:
    """Load the newest checkpoint of `run_dir` into `agents`; returns (rounds it had finished, its history):
    (0, []) from the initial state `agents` was built with when the run stopped before its first checkpoint."""
    folder = latest_checkpoint(run_dir)
    if folder is None:
        return 0, []
    saved = load_checkpoint(folder)
    groups = agents.collect(agents.models, raw=True)
    agents.write(agents.models, [FactorGroup(g.names, saved.tensors[f"factors/{k}/A"], saved.tensors[f"factors/{k}/B"])
                                 for k, g in enumerate(groups)], raw=True)
    write_extras(agents.models, {name[len("extras/"):]: x for name, x in saved.tensors.items()
                                 if name.startswith("extras/")})
    for optimizer, state in zip(agents.optimizers, saved.optimizers):
        optimizer.load_state_dict(state)
    for sampler, state in zip(agents.samplers, saved.state["samplers"]):
        sampler.load_state_dict(state)
    for private, state in zip(agents.privacy or [], saved.state.get("privacy", [])):
        private.load_state_dict(state)
    agents.counters = {**agents.counters, **saved.state["counters"]}  # a key newer than the checkpoint starts fresh
    restore_rng(saved.rng)
    return saved.round, saved.state["history"]


def check_simulated(run_dir: str) -> None:
    """ConfigError (with the command that continues it) if `run_dir` holds a run with one process per agent, whose
    checkpoints are the agents' own; checked before the simulator takes the folder's lock, so it touches nothing."""
    if checkpoint_folders(run_dir) != [run_dir]:
        raise ConfigError(f"resume: {run_dir!r} holds a run with one process per agent; continue it with "
                          f"'{resume_command(run_dir)} --rounds N'")


def open_run_dir(run_dir: str, agents: Agents, log: MetricsLog, *, resume: bool) -> int:
    """Start (fresh: the folder must hold no run) or reopen (resume: same configuration, newest checkpoint
    restored into `agents` and `log`) `run_dir`, which the caller holds (:class:`~decaf_ext.storage.run_folder.RunLock`,
    which made it); returns the number of rounds already done."""
    config = agents.config
    config_path = os.path.join(run_dir, CONFIG)
    if not resume:
        check_no_run(run_dir)
        write_json(config_path, config.to_dict())
        return 0
    if os.path.exists(config_path):
        config.check_resumes(load_saved(config_path), source=config_path)
    done, log.history = restore(run_dir, agents)
    if done > config.rounds:
        raise ConfigError(f"rounds: the run in {run_dir!r} already finished {done} rounds "
                          f"(asked for {config.rounds})")
    if os.path.exists(os.path.join(run_dir, SUMMARY)):
        os.remove(os.path.join(run_dir, SUMMARY))  # the run is unfinished again until it ends
    log.write()
    write_json(config_path, config.to_dict())
    return done
