"""A run's folder: its default name, its files, whether it is free, and the command that continues it.

Layout: ``config.json``, ``metrics.jsonl``, ``summary.json`` (written last: the run is finished),
``checkpoints/``, ``adapters/``; a run with one process per agent keeps each agent's own files in
``agents/agent_XX/``.

Example::

    >>> check_free("runs/r1")      # ConfigError with the 'decaf-train --resume runs/r1' advice if it holds a run
"""

from __future__ import annotations

import os
from datetime import datetime

from decaf_ext.errors import ConfigError
from decaf_ext.storage.checkpoint import checkpoint_round, latest_checkpoint

SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
CONFIG = "config.json"
AGENT_FOLDERS = "agents"  # <run>/agents/agent_XX: the agents' own folders of a run with one process per agent


def default_run_dir(kind: str) -> str:
    """runs/<kind>-<date>-<time>, the folder of a run started without --output-dir."""
    return os.path.join("runs", f"{kind}-{datetime.now():%Y%m%d-%H%M%S}")


def agent_folder(run_dir: str, agent: int) -> str:
    """The own folder of agent `agent` in a run with one process per agent."""
    return os.path.join(run_dir, AGENT_FOLDERS, f"agent_{agent:02d}")


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
