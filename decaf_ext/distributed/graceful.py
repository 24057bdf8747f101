"""Leaving a distributed run on SIGTERM (what ``kill``, Slurm and Kubernetes send before they stop a process):
the agent finishes the round it is in, announces that it leaves (the others do not wait for it from the next
round on, docs/membership.md), writes its checkpoint and exits with status 0. A second SIGTERM, or SIGKILL, stops
it at once as before (a crash: the others wait one round timeout). SIGINT (Ctrl-C) keeps interrupting at once.

Example::

    >>> with leave_on_sigterm() as leaving:
    ...     leaving.is_set()        # set by a SIGTERM; the training loop checks it after each round
    False
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def leave_on_sigterm() -> Iterator[threading.Event]:
    """An event set by the first SIGTERM this process receives while inside (the handler is installed only in
    the main thread, where Python delivers signals; elsewhere the event is never set); the previous handler is
    back on exit and for a second SIGTERM, which it then receives."""
    leaving = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield leaving
        return
    previous = signal.getsignal(signal.SIGTERM)

    def handle(signum: int, frame) -> None:
        if leaving.is_set():  # asked twice: stop now, as without this handler
            signal.signal(signal.SIGTERM, previous)
            signal.raise_signal(signal.SIGTERM)
        leaving.set()

    signal.signal(signal.SIGTERM, handle)
    try:
        yield leaving
    finally:
        signal.signal(signal.SIGTERM, previous)
