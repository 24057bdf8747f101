"""What every transport of a distributed run shares (gloo's :class:`~decaf_ext.comm.transport.Transport`, the
mutual-TLS :class:`~decaf_ext.comm.tls_transport.TlsTransport`): the checks of a received buffer, the fault log,
and the checked gather built on a transport's ``all_gather``.

Example::

    >>> check_buffer(torch.ones(5), 5, torch.float32) is None
    True
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import Any, Callable

import torch

from decaf_ext.comm.round_view import RoundView

log = logging.getLogger(__name__)

Validator = Callable[[int, torch.Tensor], "str | None"]  # (sender agent, received buffer) -> why rejected, or None


def check_buffer(buffer: torch.Tensor, numel: int, dtype: torch.dtype) -> str | None:
    """Why a received buffer must not be used (wrong size, wrong dtype, NaN or Inf), or None if it is sound.

    buffer: 1-D [numel] of `dtype` (a floating dtype, or uint8 for a byte message whose own check follows).
    Receive buffers are filled with :func:`unfilled` before a transfer, so a message that was shorter than
    announced fails the finiteness check (a byte message: its float32 scales read as NaN) too. Finiteness is
    read from the buffer's smallest and largest value (NaN propagates into both): one pass with no temporary,
    where torch.isfinite(buffer) allocates temporaries larger than the buffer (its absolute values, bool masks).
    """
    if buffer.dim() != 1 or buffer.numel() != numel:
        return f"size {list(buffer.shape)} instead of [{numel}]"
    if buffer.dtype != dtype:
        return f"dtype {buffer.dtype} instead of {dtype}"
    if numel and not bool(torch.isfinite(torch.stack(buffer.aminmax())).all()):
        return "NaN or Inf values"
    return None


def unfilled(buffer: torch.Tensor, numel: int | None = None) -> torch.Tensor:
    """A receive buffer like `buffer` (1-D of `numel` elements when given): NaN for a floating dtype, 255 for uint8
    (bytes 0xFF: every float32 read from them is NaN)."""
    value = float("nan") if buffer.is_floating_point() else torch.iinfo(buffer.dtype).max
    return torch.full_like(buffer, value) if numel is None else buffer.new_full((numel,), value)


class TransportBase(ABC):
    """The fault log (``events``) and the checks shared by every transport; a subclass sets ``agent`` and
    ``events`` and provides ``all_gather(view, buffer) -> [len(view.members), n] or None``."""

    agent: int
    events: list[dict[str, Any]]
    absent: frozenset[int] = frozenset()  # members whose buffer did not arrive in the last all_gather

    def record_event(self, round_index: int, kind: str, message: str, **details: Any) -> None:
        """Log a fault (warning) and keep it in ``events``."""
        self.events.append({"round": round_index, "event": kind, **details})
        log.warning("agent %d, round %d: %s", self.agent, round_index, message)

    def _accept(self, round_index: int, j: int, tensor: torch.Tensor, numel: int, dtype: torch.dtype,
                validate: Validator | None) -> bool:
        """Whether agent j's buffer passes :func:`check_buffer` and `validate`; a rejection is logged."""
        reason = check_buffer(tensor, numel, dtype)
        if reason is None and validate is not None:
            reason = validate(j, tensor)
        if reason is not None:
            self.record_event(round_index, "rejected", f"buffer of agent {j} rejected ({reason})", agent=j,
                              reason=reason)
        return reason is None

    def gather_checked(self, view: RoundView, buffer: torch.Tensor, validate: Validator | None = None
                       ) -> dict[int, torch.Tensor]:
        """Every other member's `buffer` that passed the checks (as ``send_and_receive``), by agent; {} on failure
        (a member in ``absent`` did not send one)."""
        gathered = self.all_gather(view, buffer)
        if gathered is None:
            return {}
        return {j: gathered[k] for k, j in enumerate(view.agents)
                if j != self.agent and j not in self.absent
                and self._accept(view.round, j, gathered[k], buffer.numel(), buffer.dtype, validate)}

    @abstractmethod
    def all_gather(self, view: RoundView, buffer: torch.Tensor) -> torch.Tensor | None:
        """Every member's `buffer` [n] stacked as [len(view.members), n] in view.agents order, or None."""
