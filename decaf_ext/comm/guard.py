"""Message safety at the boundary of an agent process: a shared-key HMAC tag on every buffer and a bound on the
norm of a neighbour's LoRA product relative to the agent's own.

Size, dtype and finiteness are checked by :func:`decaf_ext.comm.transport.check_buffer`; the guard adds (a) with a run
key, a tag HMAC-SHA256(key, round | sender | data bytes) appended to the buffer as 32 elements holding its bytes
(0..255, exact in every floating dtype), so a process without the key cannot inject factors and a message
cannot be replayed in another round or under another sender; (b) with a norm bound c, a neighbour with
||B_j A_j|| > c * ||B_i A_i|| (Frobenius over all modules) is rejected: a finite but poisoned message.
"""

from __future__ import annotations

import hashlib
import hmac
import os

import torch

from decaf_ext.errors import ConfigError
from decaf_ext.lora import FactorGroup, product_norm

RUN_KEY_ENV = "DECAF_RUN_KEY"
TAG_BYTES = hashlib.sha256().digest_size


def load_run_key(path: str | None) -> bytes | None:
    """The shared run key: the contents of file `path` if given, else the environment variable DECAF_RUN_KEY,
    else None (no tags). ConfigError naming run_key_file if the file cannot be read or is empty."""
    if path is None:
        key = os.environ.get(RUN_KEY_ENV, "")
        return key.encode() if key else None
    try:
        with open(path, "rb") as handle:
            key = handle.read().strip()
    except OSError as error:
        raise ConfigError(f"run_key_file: cannot read {path!r} ({error.strerror})") from None
    if not key:
        raise ConfigError(f"run_key_file: {path!r} is empty")
    return key


class MessageGuard:
    """Seals outgoing buffers and checks incoming ones. key: the shared run key (None: no tags); norm_bound:
    the multiple c of the agent's own product norm a neighbour may reach (None: no bound)."""

    def __init__(self, key: bytes | None = None, norm_bound: float | None = None) -> None:
        if norm_bound is not None and (isinstance(norm_bound, bool) or not isinstance(norm_bound, (int, float))
                                       or not norm_bound >= 1):
            raise ValueError(f"norm_bound must be a number >= 1 or None, got {norm_bound!r}")
        self.key, self.norm_bound = key, norm_bound

    @property
    def trailer(self) -> int:
        """Elements appended to every buffer (the tag), 0 without a key."""
        return TAG_BYTES if self.key is not None else 0

    def _tag(self, data: torch.Tensor, round_index: int, sender: int) -> bytes:
        message = hmac.new(self.key, f"{round_index}|{sender}|".encode(), hashlib.sha256)
        message.update(data.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return message.digest()

    def seal(self, data: torch.Tensor, round_index: int, sender: int) -> torch.Tensor:
        """data [numel] -> the buffer to send: data, then the tag's bytes as elements of data's dtype."""
        if self.key is None:
            return data
        tag = torch.tensor(list(self._tag(data, round_index, sender)), dtype=data.dtype, device=data.device)
        return torch.cat([data, tag])

    def open(self, buffer: torch.Tensor, round_index: int, sender: int) -> tuple[torch.Tensor, str | None]:
        """A received buffer -> (its data, None) or (its data, why it must be rejected: missing or wrong tag)."""
        if self.key is None:
            return buffer, None
        data, tag = buffer[:-TAG_BYTES], buffer[-TAG_BYTES:]
        if not bool(((tag >= 0) & (tag <= 255) & (tag == tag.round())).all()):
            return data, "missing or malformed message tag"
        received = bytes(tag.to(torch.int64).cpu().tolist())
        if not hmac.compare_digest(received, self._tag(data, round_index, sender)):
            return data, "wrong message tag"
        return data, None

    def check_norm(self, theirs: list[FactorGroup], own: list[FactorGroup]) -> str | None:
        """Why a neighbour's factors (one agent) must be rejected under the norm bound, or None."""
        if self.norm_bound is None:
            return None
        norm, limit = float(product_norm(theirs)[0]), self.norm_bound * float(product_norm(own)[0])
        if norm > limit:
            own = limit / self.norm_bound
            return f"LoRA product norm {norm:.4g} above {self.norm_bound:g} x this agent's {own:.4g}"
        return None
