"""Files and folders that are never seen half-written: a temporary in the same folder, fsynced, then renamed over
the target, then the folder fsynced; a temporary left by an error is removed.

Example::

    >>> write_json("runs/r/summary.json", {"final": {"acc_mean": 0.9}})
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from typing import Any, Iterator


def fsync_folder(folder: str) -> None:
    """Make the entries of `folder` (a rename, a new file) durable."""
    handle = os.open(folder or ".", os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def fsync_tree(folder: str) -> None:
    """fsync every file and folder under `folder` (before the folder is renamed into place)."""
    for root, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
        fsync_folder(root)


@contextmanager
def replacing(path: str) -> Iterator[str]:
    """The path of a temporary file to write; on success it is fsynced and renamed to `path` (atomic), on error
    it is removed. The temporary is named after this process (several agent processes may write one file)."""
    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        yield temporary
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    fsync_folder(os.path.dirname(path))


def write_json(path: str, value: Any, *, lines: bool = False) -> None:
    """Write JSON (or JSON lines from a list) to `path` through :func:`replacing`."""
    with replacing(path) as temporary:
        with open(temporary, "w", encoding="utf-8") as handle:
            if lines:
                handle.writelines(json.dumps(item) + "\n" for item in value)
            else:
                json.dump(value, handle, indent=1)


def replace_folder(temporary: str, folder: str) -> None:
    """Move the complete folder `temporary` to `folder` (fsynced first, the parent folder fsynced after); the
    previous `folder`, if any, is moved aside and removed only once the new one is in place (moved back if the
    rename fails), so an error leaves the previous one and a crash leaves one of the two complete."""
    fsync_tree(temporary)
    previous = f"{folder}.old-{os.getpid()}"
    moved = os.path.isdir(folder)
    if moved:
        os.rename(folder, previous)
    try:
        os.rename(temporary, folder)
    except BaseException:
        if moved:
            os.rename(previous, folder)
        raise
    fsync_folder(os.path.dirname(folder))
    shutil.rmtree(previous, ignore_errors=True)


@contextmanager
def replacing_folder(folder: str) -> Iterator[str]:
    """A new empty temporary folder to fill; on success it replaces `folder` (:func:`replace_folder`), on any error
    (a full disk) it is removed and `folder` stays as it was.

    Example::

        >>> with replacing_folder("runs/r/adapters") as temporary:
        ...     model.save_pretrained(os.path.join(temporary, "agent_00"))
    """
    temporary = f"{folder}.tmp-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)  # left by a killed process of the same id
    try:
        os.makedirs(temporary)
        yield temporary
        replace_folder(temporary, folder)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
