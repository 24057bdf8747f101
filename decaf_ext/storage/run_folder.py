"""A run's folder: its default name, its files, its lock (one run at a time), whether it is free, and the command
that continues it.

Layout: ``config.json``, ``metrics.jsonl``, ``summary.json`` (written last: the run is finished),
``checkpoints/``, ``adapters/``, ``.lock`` (held by the run writing into the folder); a run with one process per
agent keeps each agent's own files (and lock) in ``agents/agent_XX/``.

Example::

    >>> check_free("runs/r1")      # ConfigError with the 'decaf-train --resume runs/r1' advice if it holds a run
    >>> with RunLock("runs/r1"):   # ConfigError if another run holds it (Trainer.run takes it itself)
    ...     write_json("runs/r1/config.json", config.to_dict())
"""

from __future__ import annotations

import fcntl
import os
from datetime import datetime

from decaf_ext.errors import ConfigError
from decaf_ext.storage.checkpoint import checkpoint_round, latest_checkpoint

SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
CONFIG = "config.json"
LOCK = ".lock"
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


def _lock(fd: int, run_dir: str) -> None:
    """Take the exclusive lock of the open lock file `fd`; ConfigError naming `run_dir` and the holder's pid (which
    the file records) if another run holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        raise ConfigError(f"output_dir: {run_dir!r} is in use by another run (pid {holder})") from None


class RunLock:
    """One run at a time in `run_dir` (made if missing): ``with`` holds ``run_dir/.lock`` (fcntl.flock, exclusive,
    not waiting) until its end; the kernel lets go of it when the process ends, however it ends. The file records
    the holder's pid. ConfigError ``output_dir: ... is in use by another run (pid N)`` if another run holds it.

    Example::

        >>> with RunLock("runs/r1"):   # meanwhile RunLock("runs/r1") in any process: ConfigError
        ...     write_json("runs/r1/config.json", config.to_dict())
    """

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        try:
            os.makedirs(self.run_dir, exist_ok=True)
            fd = os.open(os.path.join(self.run_dir, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            where = error.filename or self.run_dir
            raise ConfigError(f"output_dir: cannot create {where!r} ({error.strerror})") from None
        try:
            _lock(fd, self.run_dir)
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def __exit__(self, *exc_info) -> None:
        os.close(self._fd)  # lets go of the lock
        self._fd = None


def _check_not_in_use(folder: str, run_dir: str) -> None:
    """ConfigError naming `run_dir` if a run holds the lock of `folder` (tried, and let go at once)."""
    try:
        fd = os.open(os.path.join(folder, LOCK), os.O_RDONLY)
    except OSError:  # no lock file: no run ever held it
        return
    try:
        _lock(fd, run_dir)
    finally:
        os.close(fd)


def check_no_run(run_dir: str) -> None:
    """ConfigError saying what to do when `run_dir` already holds a run (finished, or stopped part way): the command
    that continues it. For a caller holding the folder's :class:`RunLock`; others call :func:`check_free`."""
    if not os.path.exists(os.path.join(run_dir, CONFIG)):
        return
    folders, resume = checkpoint_folders(run_dir), resume_command(run_dir)
    if os.path.exists(os.path.join(run_dir, SUMMARY)):
        raise ConfigError(f"output_dir: {run_dir!r} already holds a finished run (extend it with "
                          f"'{resume} --rounds N', or choose another --output-dir)")
    done = max((checkpoint_round(f) for f in map(latest_checkpoint, folders) if f is not None), default=0)
    raise ConfigError(f"output_dir: {run_dir!r} holds an unfinished run ({done} rounds checkpointed); continue "
                      f"it with '{resume}', or choose another --output-dir")


def check_free(run_dir: str) -> None:
    """ConfigError when a running run holds `run_dir` (or one of its agents' folders), or when it holds a run
    (:func:`check_no_run`); checked before anything is built or launched."""
    for folder in checkpoint_folders(run_dir):
        _check_not_in_use(folder, run_dir)
    check_no_run(run_dir)
