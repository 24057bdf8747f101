"""The one-machine launcher: ``python -m decaf_ext.distributed --nproc N`` starts the N agent processes of a run
with torchrun's variables, hosts their store, and restarts a process that fails.

Example::

    >>> launch([sys.executable, "-P", "-m", "decaf_ext.distributed", "--agents", "4"], 4)   # [0, 0, 0, 0]
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import time
from typing import Mapping, Sequence

import torch.distributed as dist

from decaf_ext.errors import ConfigError

log = logging.getLogger(__name__)


def loopback_store() -> dist.TCPStore:
    """A TCPStore server reachable from this machine only: its listening socket is bound to 127.0.0.1 here and
    handed over (TCPStore given "127.0.0.1" alone listens on every interface). The store owns and closes the
    socket.

    Example::

        >>> store = loopback_store()   # clients: dist.TCPStore("127.0.0.1", store.port, is_master=False)
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(socket.SOMAXCONN)
        port = listener.getsockname()[1]
        store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,
                              master_listen_fd=listener.fileno())
    except BaseException:
        listener.close()
        raise
    listener.detach()  # the store closes the descriptor when it goes: a second close could hit a reused one
    return store


def launch(command: Sequence[str], nproc: int, *, max_restarts: int = 0, env: Mapping[str, str] | None = None
           ) -> list[int]:
    """Run `command` as the `nproc` processes of one run on this machine and return their exit statuses.

    Each process gets torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and the
    TCPStore is hosted here (listening on 127.0.0.1 only: :func:`loopback_store`), so any process may die without taking the store along (torchrun's own agent
    stops every worker of a node when one fails); OMP_NUM_THREADS defaults to 1, as under torchrun. A process
    that exits with a nonzero status is started again,
    up to `max_restarts` times per rank; it then rejoins the run from its newest checkpoint.
    """
    if nproc < 1:
        raise ConfigError(f"nproc must be >= 1, got {nproc}")
    store = loopback_store()
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
