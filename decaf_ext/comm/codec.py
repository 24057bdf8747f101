"""Compressed messages: the codec that turns one agent's tensors into the bytes it sends, and back.

Message dtypes (``message_dtype``):

- ``float32``: uncompressed; every tensor travels in the parameters' own floating dtype (float32 models: 4 bytes
  per entry).
- ``bfloat16``: every entry rounded to bfloat16 (2 bytes per entry).
- ``int8``: symmetric absmax quantization with one float32 scale per row: q(x) = scale * round(x / scale),
  scale = max|row| / 127, codes in [-127, 127] (1 byte per entry plus 4 bytes per row). Rows are taken along the
  reduction dim given per tensor (the LoRA factors use one scale per rank direction: row k of A [r, n],
  column k of B [m, r]). Error bound per entry: |x - q(x)| <= scale / 2.

The wire form of ``int8`` is one uint8 buffer: every tensor's int8 codes (as bytes), then every tensor's float32
scales (as bytes), so one transfer carries both and the byte count is exact.
"""

from __future__ import annotations

import math

import torch

MESSAGE_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "int8")
INT8_LEVELS = 127
MAX_INT8_SCALE = torch.finfo(torch.float32).max / INT8_LEVELS  # about where code 127 starts decoding to Inf


def check_message_dtype(message_dtype: str) -> None:
    """ValueError naming message_dtype unless it is one of :data:`MESSAGE_DTYPES`."""
    if message_dtype not in MESSAGE_DTYPES:
        raise ValueError(f"message_dtype must be one of {', '.join(MESSAGE_DTYPES)}; got {message_dtype!r}")


def quantize(x: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """x [...] -> (codes int8 [...] in [-127, 127], scales float32 [...] with size 1 along `dim`).

    scale = max|x| / 127 over `dim` (0 for an all-zero row, whose codes are 0)."""
    x = x.to(torch.float32)
    scales = x.abs().amax(dim=dim, keepdim=True) / INT8_LEVELS
    codes = torch.where(scales > 0, x / torch.where(scales > 0, scales, 1.0), 0.0).round()
    return codes.clamp(-INT8_LEVELS, INT8_LEVELS).to(torch.int8), scales


def dequantize(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """codes int8 [...] and scales float32 (broadcastable) -> codes * scales in `dtype`."""
    return (codes.to(torch.float32) * scales).to(dtype)


class Codec:
    """Encoding of a fixed list of tensors (one agent's message) under one message dtype.

    shapes / dims: each tensor's shape and the dim its int8 rows run along (ignored by the float dtypes);
    dtype: the tensors' common floating dtype (what :meth:`decode` returns).
    """

    def __init__(self, shapes: list[tuple[int, ...]], dims: list[int], dtype: torch.dtype,
                 message_dtype: str) -> None:
        check_message_dtype(message_dtype)
        self.shapes = [tuple(s) or (1,) for s in shapes]  # a 0-d tensor travels as one row of one entry
        self.dims, self.dtype, self.message_dtype = list(dims), dtype, message_dtype
        self.sizes = [math.prod(s) for s in self.shapes]
        self.scale_shapes = [s[:d % len(s)] + (1,) + s[d % len(s) + 1:] for s, d in zip(self.shapes, self.dims)]
        self.scale_sizes = [math.prod(s) for s in self.scale_shapes]
        if message_dtype == "int8":
            self.wire_dtype = torch.uint8
            self.numel = sum(self.sizes) + 4 * sum(self.scale_sizes)
        else:
            self.wire_dtype = dtype if message_dtype == "float32" else torch.bfloat16
            self.numel = sum(self.sizes)

    @property
    def lossless(self) -> bool:
        """Whether decode(encode(x)) == x for every x."""
        return self.wire_dtype == self.dtype

    @property
    def bytes(self) -> int:
        """Bytes of one encoded message."""
        return self.numel * self.wire_dtype.itemsize

    def encode(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """The tensors (shapes as given) -> wire [numel] of wire_dtype."""
        tensors = [t.reshape(s) for t, s in zip(tensors, self.shapes)]
        if self.message_dtype != "int8":
            return torch.cat([t.reshape(-1).to(self.wire_dtype) for t in tensors])
        coded = [quantize(t, d) for t, d in zip(tensors, self.dims)]
        return torch.cat([c.reshape(-1).view(torch.uint8) for c, _ in coded]
                         + [s.reshape(-1).contiguous().view(torch.uint8) for _, s in coded])

    def _split(self, wire: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """wire [k, numel] (int8) -> codes [k, *shape] and scales [k, *scale_shape] of every tensor."""
        k = wire.shape[0]
        codes, scales = wire.split([sum(self.sizes), 4 * sum(self.scale_sizes)], dim=1)
        codes = [c.reshape(k, *s).view(torch.int8) for c, s in zip(codes.split(self.sizes, dim=1), self.shapes)]
        scales = scales.clone(memory_format=torch.contiguous_format).view(torch.float32)  # offset 0, 4-aligned
        scales = [c.reshape(k, *s) for c, s in zip(scales.split(self.scale_sizes, dim=1), self.scale_shapes)]
        return codes, scales

    def decode(self, wire: torch.Tensor) -> list[torch.Tensor]:
        """wire [k, numel] (k agents' messages) -> every tensor as [k, *shape] in dtype (0-d ones as [k, 1])."""
        if self.message_dtype != "int8":
            return [p.reshape(wire.shape[0], *s).to(self.dtype)
                    for p, s in zip(wire.split(self.sizes, dim=1), self.shapes)]
        codes, scales = self._split(wire)
        return [dequantize(c, s, self.dtype) for c, s in zip(codes, scales)]

    def check(self, wire: torch.Tensor) -> str | None:
        """Why a received wire [numel] must not be used (an int8 message with a NaN, Inf or negative scale, a
        scale whose codes decode beyond float32, or the unused code -128), or None. The float dtypes are checked
        by the transport (finite values)."""
        if self.message_dtype != "int8":
            return None
        codes, scales = self._split(wire[None])
        if not all(bool((torch.isfinite(s) & (s >= 0)).all()) for s in scales):
            return "NaN, Inf or negative int8 scales"
        if not all(bool(torch.isfinite(s * INT8_LEVELS).all()) for s in scales):
            return f"int8 scale above {MAX_INT8_SCALE:.4g} (code 127 decodes beyond float32)"
        if any(bool((c == -INT8_LEVELS - 1).any()) for c in codes):
            return "int8 code -128"
        return None
