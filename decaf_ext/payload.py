"""The one flat buffer an agent sends per neighbour and round: layout, encoding and decoding in one place."""

from __future__ import annotations

import functools
import hashlib
import json

import torch

from decaf_ext.compression import Codec
from decaf_ext.lora import FactorGroup

Extras = dict[str, torch.Tensor]


class Payload:
    """Layout of the buffer one agent sends in a round.

    For every factor group (``collect_factors`` order): A [M, r, n] when the strategy trains A, then B [M, m, r];
    then every extra (``collect_extras`` order). ``pack`` / ``unpack`` give the exact data in one dtype
    [data_numel]; ``encode`` / ``decode`` turn it into the message on the wire [wire_numel] of ``wire_dtype``
    under ``message_dtype`` (:mod:`decaf_ext.compression`; int8 rows: one scale per rank direction of A and B,
    per last-dim row of an extra). The buffer sent is the wire data followed by ``trailer`` elements (e.g. a
    message tag): ``numel`` in all. Every agent has the same model, so the size is known before anything is
    received; ``fingerprint`` (entries, shapes, dtypes, message dtype, trailer) lets the transport refuse an
    agent whose layout differs.
    """

    def __init__(self, groups: list[FactorGroup], extras: Extras, *, trains_A: bool, trailer: int = 0,
                 message_dtype: str = "float32") -> None:
        self.trains_A = trains_A
        factors, others = self._entries(groups, extras)
        self.n_factors = len(factors)
        self.shapes = [tuple(t.shape) for t in factors + others]
        self.dtypes = [t.dtype for t in factors + others]
        self.sizes = [t.numel() for t in factors + others]
        self.dtype = functools.reduce(torch.promote_types, self.dtypes)
        self.data_numel = sum(self.sizes)
        dims = [-1 if k % 2 == 0 and trains_A else -2 for k in range(self.n_factors)] + [-1] * len(others)
        self.codec = Codec(self.shapes, dims, self.dtype, message_dtype)
        self.wire_dtype, self.wire_numel = self.codec.wire_dtype, self.codec.numel
        self.numel = self.wire_numel + trailer
        described = json.dumps([[list(s), str(d)] for s, d in zip(self.shapes, self.dtypes)]
                               + [str(self.dtype), message_dtype, trailer])
        self.fingerprint = f"{self.numel}:{self.wire_dtype}:{hashlib.sha1(described.encode()).hexdigest()[:16]}"

    @property
    def message_bytes(self) -> int:
        """Bytes of one agent's message on the wire (the trailer not included)."""
        return self.codec.bytes

    def _entries(self, groups: list[FactorGroup], extras: Extras) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """One agent's factors [M, ...] (agent axis dropped) and extras [...], in buffer order."""
        if any(g.n_agents != 1 for g in groups) or any(x.shape[0] != 1 for x in extras.values()):
            raise ValueError("groups/extras must hold exactly one agent")
        factors = [t[:, 0] for g in groups for t in ((g.A, g.B) if self.trains_A else (g.B,))]
        return factors, [x[0] for x in extras.values()]

    def pack(self, groups: list[FactorGroup], extras: Extras) -> torch.Tensor:
        """One agent's groups (A [M, 1, r, n], B [M, 1, m, r]) and extras [1, ...] -> data [data_numel]."""
        factors, others = self._entries(groups, extras)
        return torch.cat([t.reshape(-1).to(self.dtype) for t in factors + others])

    def pack_each(self, groups: list[FactorGroup], extras: Extras) -> torch.Tensor:
        """k agents' groups (A [M, k, r, n], B [M, k, m, r]) and extras [k, ...] -> data [k, data_numel]
        (row j: what agent j's :meth:`pack` gives)."""
        k = groups[0].n_agents if groups else next(iter(extras.values())).shape[0]
        factors = [t.movedim(1, 0) for g in groups for t in ((g.A, g.B) if self.trains_A else (g.B,))]
        return torch.cat([t.reshape(k, -1).to(self.dtype) for t in factors + list(extras.values())], dim=1)

    def encode(self, data: torch.Tensor) -> torch.Tensor:
        """data [data_numel] -> wire [wire_numel] of wire_dtype."""
        return self.codec.encode(list(data.split(self.sizes)))

    def decode(self, wires: torch.Tensor) -> torch.Tensor:
        """k agents' wires [k, wire_numel] -> their data as received [k, data_numel] (exact for float32)."""
        return torch.cat([t.reshape(wires.shape[0], -1) for t in self.codec.decode(wires)], dim=1)

    def check(self, wire: torch.Tensor) -> str | None:
        """Why a received wire [wire_numel] must be rejected beyond the transport's size / dtype / finiteness
        checks (int8: bad scales or codes), or None."""
        return self.codec.check(wire)

    def received(self, data: torch.Tensor) -> torch.Tensor:
        """k agents' data [k, data_numel] -> what a receiver decodes from their messages, decode(encode(.))."""
        if self.codec.lossless:
            return data
        return self.decode(torch.stack([self.encode(row) for row in data]))

    def unpack(self, buffers: torch.Tensor, own_groups: list[FactorGroup], own_extras: Extras
               ) -> tuple[list[FactorGroup], Extras]:
        """k agents' data [k, data_numel] -> groups (A [M, k, r, n], B [M, k, m, r]) and extras {name: [k, ...]}.

        own_groups / own_extras (one agent) give the names; when A is not trained it is taken from own_groups
        (the A all agents share).
        """
        k = buffers.shape[0]
        pieces = []
        for index, (piece, shape, dtype) in enumerate(zip(buffers.split(self.sizes, dim=1), self.shapes, self.dtypes)):
            piece = piece.reshape(k, *shape).to(dtype)
            pieces.append((piece.movedim(0, 1) if index < self.n_factors else piece).contiguous())
        stream = iter(pieces)
        groups = []
        for g in own_groups:
            A = next(stream) if self.trains_A else g.A.expand(-1, k, -1, -1).contiguous()
            groups.append(FactorGroup(list(g.names), A, next(stream)))
        return groups, {name: next(stream) for name in own_extras}
