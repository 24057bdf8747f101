"""Message safety at the boundary of an agent process: a tag on every buffer, and bounds on what a neighbour's
factors may be.

Size, dtype and finiteness of the wire are checked by :func:`decaf_ext.comm.transport.check_buffer`, the int8
codes and scales by the codec. The guard adds:

- with a run key, a tag HMAC-SHA256(k, context | SHA-256(data)) appended to the buffer as 32 elements holding
  its bytes (0..255, exact in every floating dtype). k is derived from the run key with HKDF, salted with the
  run's nonce (a fresh one per launch); the context names the purpose (mixing or evaluation), the round, the
  process group, the sender and its incarnation, and the receiver (-1: every member of the group). A process
  without the key cannot inject factors, and a message cannot be replayed in another run, launch, round, group,
  incarnation, under another sender or to another receiver.
- bounds on a neighbour's decoded message: every value finite; with ``norm_cap`` c, every factor ||A_j||,
  ||B_j||, every extra and the product ||B_j A_j|| (Frobenius over all modules) at most c (an absolute bound:
  mixing then keeps this agent's norms within max(own, c) rounds after rounds); with ``norm_bound`` b,
  ||B_j A_j|| at most b times the median of this agent's and the round's other messages' product norms (a
  minority of neighbours cannot move the reference).

Example::

    >>> guard = MessageGuard(b"a run key of 16+ bytes", norm_cap=100.0); guard.bind(nonce)
    >>> buffer = guard.seal(data, TagContext("mix", round=3, group=0, sender=1, incarnation=1, receiver=2))
    >>> data, reason = guard.open(buffer, context)       # reason None: the tag is right
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
from typing import NamedTuple

import torch

from decaf_ext.comm.keys import check_run_key, derive_key
from decaf_ext.errors import ConfigError
from decaf_ext.lora import Extras, FactorGroup, product_norm

RUN_KEY_ENV = "DECAF_RUN_KEY"
TAG_BYTES = hashlib.sha256().digest_size
BROADCAST = -1  # receiver of a buffer every member of the group gets (all_gather)


def load_run_key(path: str | None) -> bytes | None:
    """The shared run key: the contents of file `path` if given, else the environment variable DECAF_RUN_KEY,
    else None (no tags). ConfigError naming run_key_file if the file cannot be read, or the key is shorter than
    16 bytes."""
    if path is None:
        key = os.environ.get(RUN_KEY_ENV, "").encode()
        return check_run_key(key) if key else None
    try:
        with open(path, "rb") as handle:
            key = handle.read().strip()
    except OSError as error:
        raise ConfigError(f"run_key_file: cannot read {path!r} ({error.strerror})") from None
    return check_run_key(key)


def check_bound(name: str, value: float | None, minimum: float) -> None:
    """ValueError naming `name` unless `value` is None or a finite number >= `minimum`."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not math.isfinite(value) or not value >= minimum):
        raise ValueError(f"{name} must be a finite number >= {minimum:g} or None, got {value!r}")


def message_norm(groups: list[FactorGroup]) -> float:
    """sqrt(sum over modules ||B A||_F^2) of one agent's factors (A [M, 1, r, n], B [M, 1, m, r]); 0 without any."""
    return float(product_norm(groups)[0]) if groups else 0.0


class TagContext(NamedTuple):
    """What a tag binds besides the data: purpose ("mix" or "eval"), round, process group, sender, the sender's
    incarnation, receiver (BROADCAST for every member)."""

    purpose: str
    round: int
    group: int
    sender: int
    incarnation: int
    receiver: int


class MessageGuard:
    """Seals outgoing buffers and checks incoming ones.

    Args:
        key: the run key (None: no tags; at least 16 bytes otherwise).
        norm_bound: b >= 1, relative bound on a neighbour's product norm (None: none).
        norm_cap: c > 0, absolute bound on every factor, extra and product norm of a message (None: none).
    """

    def __init__(self, key: bytes | None = None, norm_bound: float | None = None,
                 norm_cap: float | None = None) -> None:
        check_bound("norm_bound", norm_bound, 1.0)
        check_bound("norm_cap", norm_cap, 0.0)
        if norm_cap == 0:
            raise ValueError("norm_cap must be > 0 or None, got 0")
        self.key = None if key is None else check_run_key(key)
        self.norm_bound, self.norm_cap = norm_bound, norm_cap
        self._tag_key: bytes | None = None

    def bind(self, nonce: bytes) -> None:
        """Derive this run's tag key from the run key and the run's nonce (call once the nonce is agreed)."""
        if self.key is not None:
            self._tag_key = derive_key(self.key, "message tags", salt=nonce)

    @property
    def trailer(self) -> int:
        """Elements appended to every buffer (the tag), 0 without a key."""
        return TAG_BYTES if self.key is not None else 0

    def _tag(self, data: torch.Tensor, context: TagContext) -> bytes:
        if self._tag_key is None:
            raise RuntimeError("MessageGuard.bind(nonce) must be called before sealing or opening")
        digest = hashlib.sha256(data.detach().cpu().contiguous().view(torch.uint8).numpy()).digest()  # no copy
        header = "|".join(map(str, context)).encode()
        return hmac.new(self._tag_key, header + b"|" + digest, hashlib.sha256).digest()

    def seal(self, data: torch.Tensor, context: TagContext) -> torch.Tensor:
        """data [numel] -> the buffer to send: data, then the tag's bytes as elements of data's dtype."""
        if self.key is None:
            return data
        tag = torch.tensor(list(self._tag(data, context)), dtype=data.dtype, device=data.device)
        return torch.cat([data, tag])

    def open(self, buffer: torch.Tensor, context: TagContext) -> tuple[torch.Tensor, str | None]:
        """A received buffer -> (its data, None) or (its data, why it must be rejected: missing or wrong tag)."""
        if self.key is None:
            return buffer, None
        data, tag = buffer[:-TAG_BYTES], buffer[-TAG_BYTES:]
        if not bool(((tag >= 0) & (tag <= 255) & (tag == tag.round())).all()):
            return data, "missing or malformed message tag"
        received = bytes(tag.to(torch.int64).cpu().tolist())
        if not hmac.compare_digest(received, self._tag(data, context)):
            return data, "wrong message tag"
        return data, None

    def check_values(self, groups: list[FactorGroup], extras: Extras, norm: float | None = None) -> str | None:
        """Why one agent's decoded factors (A [M, 1, r, n], B [M, 1, m, r]) and extras [1, ...] must be rejected
        on their own (non-finite values, norms above norm_cap), or None. norm: their product norm
        (:func:`message_norm`), when the caller has it already."""
        tensors = {f"{factor} of {g.names[0]}": getattr(g, factor) for g in groups for factor in "AB"}
        tensors.update({f"extra {name}": x for name, x in extras.items()})
        for name, tensor in tensors.items():
            if not bool(torch.isfinite(tensor).all()):
                return f"NaN or Inf in {name}"
        norm = message_norm(groups) if norm is None else norm
        if not math.isfinite(norm):
            return "LoRA product norm is not finite"
        if self.norm_cap is None:
            return None
        for name, tensor in tensors.items():
            size = float(torch.linalg.vector_norm(tensor.double()))
            if not size <= self.norm_cap:
                return f"norm of {name} {size:.4g} above norm_cap {self.norm_cap:g}"
        if not norm <= self.norm_cap:
            return f"LoRA product norm {norm:.4g} above norm_cap {self.norm_cap:g}"
        return None

    def check_relative(self, norms: dict[int, float], own: float) -> dict[int, str]:
        """Why each sender's product norm (`norms`: sender -> norm) must be rejected under norm_bound: above
        norm_bound x the median of `own` and every norm of the round."""
        if self.norm_bound is None:
            return {}
        reference = float(torch.tensor([own, *norms.values()], dtype=torch.float64).median())
        limit = self.norm_bound * reference
        return {j: f"LoRA product norm {norm:.4g} above {self.norm_bound:g} x the round's median {reference:.4g}"
                for j, norm in norms.items() if not norm <= limit}
