"""The control plane's access to the run's store: values signed with the run key, read without blocking and
parsed where they are read. A value that is unsigned, wrongly signed or unreadable is treated as absent and
reported once per key, so a process that can write the store but lacks the key cannot make an agent act on
a value of its own, nor crash it with one.

With a run key every value is written sealed: 64 hex characters of HMAC-SHA256 (key:
``derive_key(run_key, "control plane")``) over the key name, a zero byte and the value, then the value. The key
name is covered, so a signed value cannot be moved to another key; it can still be written back under its
own key later (a replay): readers of values that change (``latest``) keep the newest they have seen.
Counters made with ``store.add`` cannot be signed: :meth:`ControlStore.increment` keeps a signed count instead
(a garbage counter also makes a TCPStore server drop the connection of the agent that adds to it).

Example::

    >>> control = ControlStore(dist.HashStore(), b"a run key of 32 bytes, not less!")
    >>> control.set("latest", "3")
    >>> control.get("latest", parse_int)   # 3; None when absent, forged or unreadable
    3
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from typing import Callable, TypeVar

import torch.distributed as dist

from decaf_ext.comm.keys import derive_key
from decaf_ext.errors import first_line

log = logging.getLogger(__name__)

T = TypeVar("T")
Report = Callable[[str, str, str], None]  # (key, kind: "forged" or "malformed", reason)
ABSENT = "\x00decaf_ext: no such key\x00"  # compare_set(key, ABSENT, ABSENT) reads a key without creating it
TAG_CHARS = 2 * hashlib.sha256().digest_size
ATTEMPTS = 4  # compare_set tries against a value that keeps being replaced
PARSE_ERRORS = (ValueError, TypeError, KeyError, AttributeError, IndexError,  # json's errors are ValueErrors
                RecursionError)  # json.loads of deeply nested brackets


def parse_int(text: str) -> int:
    """A JSON integer (not a bool, not a float); ValueError otherwise."""
    value = json.loads(text)
    if type(value) is not int:
        raise ValueError(f"{text[:40]!r} is not an integer")
    return value


def parse_nonce(text: str) -> bytes:
    """16 bytes written as 32 hex characters; ValueError otherwise."""
    value = bytes.fromhex(text)
    if len(value) != 16:
        raise ValueError(f"a nonce has 16 bytes, this one {len(value)}")
    return value


def _unicode(text: str) -> str:
    return text


class _Forged(Exception):
    pass


class ControlStore:
    """`store` seen through the run key (None: values are written and read as they are, unsigned).

    report(key, kind, reason) is called once per key whose value is ignored (default: a logged warning).
    """

    def __init__(self, store: dist.Store, run_key: bytes | None = None, report: Report | None = None) -> None:
        self.store = store
        self._mac_key = None if run_key is None else derive_key(run_key, "control plane")
        self._report = report or (lambda key, kind, reason: log.warning("store value %r ignored (%s): %s", key,
                                                                         kind, reason))
        self._reported: set[str] = set()

    @property
    def signed(self) -> bool:
        """Whether values are signed and checked (a run key was given)."""
        return self._mac_key is not None

    def _tag(self, key: str, data: bytes) -> bytes:
        return hmac.new(self._mac_key, key.encode() + b"\x00" + data, hashlib.sha256).hexdigest().encode()

    def seal(self, key: str, value: str) -> bytes:
        """The bytes stored for `value` under `key`: the value, after its signature when there is a run key."""
        data = value.encode()
        return data if self._mac_key is None else self._tag(key, data) + data

    def _read(self, key: str, raw: bytes, parse: Callable[[str], T]) -> T | None:
        """parse(the value in `raw`), or None (reported) if it is not signed right or cannot be parsed."""
        try:
            if self._mac_key is not None:
                tag, raw = raw[:TAG_CHARS], raw[TAG_CHARS:]
                if not hmac.compare_digest(tag, self._tag(key, raw)):
                    raise _Forged
            return parse(raw.decode())
        except _Forged:
            self._reject(key, "forged", "no valid signature for this key (written without the run key, or moved "
                                        "from another key)")
        except PARSE_ERRORS as error:
            self._reject(key, "malformed", f"unreadable ({first_line(error)[:120]})")
        return None

    def _reject(self, key: str, kind: str, reason: str) -> None:
        if key not in self._reported:
            self._reported.add(key)
            self._report(key, kind, reason)

    def _peek(self, key: str) -> bytes | None:
        """The raw value of `key`, None when absent; never waits (store.get waits for a missing key)."""
        raw = self.store.compare_set(key, ABSENT, ABSENT)
        return None if raw == ABSENT.encode() else raw

    def set(self, key: str, value: str) -> None:
        """Write `value` (signed when there is a run key)."""
        self.store.set(key, self.seal(key, value))

    def get(self, key: str, parse: Callable[[str], T] = _unicode) -> T | None:
        """parse(value of `key`), or None when the key is absent or its value forged or unreadable."""
        raw = self._peek(key)
        return None if raw is None else self._read(key, raw, parse)

    def agree(self, key: str, value: str, parse: Callable[[str], T] = _unicode) -> T | None:
        """Write `value` under `key` unless a sound value is there already; returns the one there (parsed).

        A forged or unreadable value in the way is replaced, as if absent; None only if it keeps being
        replaced (ATTEMPTS times)."""
        desired, expected = self.seal(key, value), b""
        for _ in range(ATTEMPTS):
            raw = self.store.compare_set(key, expected, desired)
            found = self._read(key, raw, parse)
            if found is not None:
                return found
            expected = b"" if raw == expected else raw  # compare_set returns `expected` for a missing key
        return None

    def increment(self, key: str) -> int:
        """Add one to the signed count under `key` (absent, forged or unreadable: 0) and return the new count."""
        count = 1
        for _ in range(ATTEMPTS):
            raw = self._peek(key)
            found = None if raw is None else self._read(key, raw, parse_int)
            count = 1 + max(found or 0, 0)
            desired = self.seal(key, str(count))
            if self.store.compare_set(key, raw or b"", desired) == desired:
                return count
        self._reject(key, "forged", "keeps changing: the count could not be written")
        return count

    def delete(self, key: str) -> None:
        self.store.delete_key(key)


def shared_value(store: dist.Store, run_key: bytes | None, key: str, value: str) -> str | None:
    """The value under `key` every agent of the run agrees on (`value` if it is the first to write), signed with
    the run key; None if it could not be agreed. Example: ``shared_value(store, run_key, "output_dir", default)``."""
    return ControlStore(store, run_key).agree(key, value)

