"""Agent processes of a test: whatever is still running when the test is done with them is killed.

Example::

    >>> with killed_at_exit([subprocess.Popen(["sleep", "60"])]) as agents:
    ...     pass                       # a failed wait or assertion here leaves no process behind
"""

from __future__ import annotations

import subprocess
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def killed_at_exit(processes: list[subprocess.Popen]) -> Iterator[list[subprocess.Popen]]:
    """`processes` (the list itself: a process put in it inside, e.g. a restart, counts too); on exit, however the
    block ends, each one still running is killed and reaped."""
    try:
        yield processes
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
