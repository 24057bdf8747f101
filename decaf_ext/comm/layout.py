"""The one flat buffer an agent sends per neighbour and round: layout, encoding and decoding in one place."""

from __future__ import annotations

import functools
import hashlib
import json
from typing import Sequence

import torch

from decaf_ext.comm.codec import Codec
from decaf_ext.lora import Extras, FactorGroup




class MessageLayout:
    """Layout of the buffer one agent sends in a round.

    For every factor group (``collect_factors`` order): A [M, r, n] when the strategy trains A, then B [M, m, r];
    then every extra (``collect_extras`` order). ``pack`` / ``unpack`` give the exact data in one dtype
    [data_numel]; ``encode`` / ``decode`` turn it into the message on the wire [wire_numel] of ``wire_dtype``
    under ``message_dtype`` (:mod:`decaf_ext.comm.codec`; int8 rows: one scale per rank direction of A and B,
    per last-dim row of an extra). The buffer sent is the wire data followed by ``trailer`` elements (e.g. a
    message tag): ``numel`` in all. Every agent has the same model, so the size is known before anything is
    received; ``fingerprint`` (entries, shapes, dtypes, message dtype, trailer, ranks) lets the transport refuse
    an agent whose layout differs.

    Unequal ranks (`ranks`: every agent's LoRA rank, the groups padded to the largest, see
    :class:`~decaf_ext.lora.RankPadding`): the data stays in the padded layout, but agent j's message carries
    only its leading ranks[j] directions of every factor (``wire_numel_of(j)``, ``message_bytes_of(j)``);
    decoding fills the rest with zeros, exactly what the padding holds.
    """

    def __init__(self, groups: list[FactorGroup], extras: Extras, *, trains_A: bool, trailer: int = 0,
                 message_dtype: str = "float32", ranks: Sequence[int] | None = None) -> None:
        self.trains_A, self.message_dtype, self.trailer = trains_A, message_dtype, trailer
        factors, others = self._entries(groups, extras)
        self.n_factors = len(factors)
        self.shapes = [tuple(t.shape) for t in factors + others]
        self.dtypes = [t.dtype for t in factors + others]
        self.sizes = [t.numel() for t in factors + others]
        self.dtype = functools.reduce(torch.promote_types, self.dtypes)
        self.data_numel = sum(self.sizes)
        a_factor = [k % 2 == 0 and trains_A for k in range(self.n_factors)]
        self.rank_dims = [1 if a else 2 for a in a_factor]  # the rank dim of A [M, r, n] / B [M, m, r]
        self.codec_dims = [-1 if a else -2 for a in a_factor] + [-1] * len(others)  # int8 rows: rank directions
        self._codecs: dict[int, Codec] = {}
        self.padded_rank = groups[0].rank if groups else 0
        self.ranks = list(ranks) if ranks is not None and len(set(ranks)) > 1 else None
        if self.ranks is not None and (max(self.ranks) != self.padded_rank or min(self.ranks) < 1):
            raise ValueError(f"ranks: {self.ranks} do not fit factors padded to rank {self.padded_rank}")
        self.codec = self._codec(self.padded_rank)
        self.wire_dtype, self.wire_numel = self.codec.wire_dtype, self.codec.numel
        self.numel = self.wire_numel + trailer
        described = json.dumps([[list(s), str(d)] for s, d in zip(self.shapes, self.dtypes)]
                               + [str(self.dtype), message_dtype, trailer, self.ranks])
        self.fingerprint = f"{self.numel}:{self.wire_dtype}:{hashlib.sha1(described.encode()).hexdigest()[:16]}"

    def _codec(self, rank: int) -> Codec:
        """The codec of a message carrying the leading `rank` directions of every factor."""
        if rank not in self._codecs:
            shapes = [tuple(rank if d == self.rank_dims[index] else size for d, size in enumerate(shape))
                      if index < self.n_factors else shape for index, shape in enumerate(self.shapes)]
            self._codecs[rank] = Codec(shapes, self.codec_dims, self.dtype, self.message_dtype)
        return self._codecs[rank]

    def rank_of(self, agent: int | None) -> int:
        """The rank agent `agent`'s message carries (the padded rank with equal ranks or agent None)."""
        return self.padded_rank if self.ranks is None or agent is None else self.ranks[agent]

    @property
    def message_bytes(self) -> int:
        """Bytes of one agent's message on the wire (the trailer not included); with unequal ranks, the largest."""
        return self.codec.bytes

    def message_bytes_of(self, agent: int) -> int:
        """Bytes of agent `agent`'s message on the wire (the trailer not included)."""
        return self._codec(self.rank_of(agent)).bytes

    def sent_bytes_of(self, agent: int, *, server: bool) -> int:
        """Bytes of the message agent `agent` puts on the wire: its own, or with a server strategy (all_gather
        moves equal sizes) the largest."""
        return self.message_bytes if server else self.message_bytes_of(agent)

    def wire_numel_of(self, agent: int) -> int:
        """Elements of agent `agent`'s wire data."""
        return self._codec(self.rank_of(agent)).numel

    def numel_of(self, agent: int) -> int:
        """Elements of the buffer agent `agent` sends (wire data and trailer)."""
        return self.wire_numel_of(agent) + self.trailer

    def _entries(self, groups: list[FactorGroup], extras: Extras) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """One agent's factors [M, ...] (agent axis dropped) and extras [...], in buffer order."""
        if any(g.n_agents != 1 for g in groups) or any(x.shape[0] != 1 for x in extras.values()):
            raise ValueError("groups/extras must hold exactly one agent")
        factors = [t[:, 0] for g in groups for t in ((g.A, g.B) if self.trains_A else (g.B,))]
        return factors, [x[0] for x in extras.values()]

    def pack(self, groups: list[FactorGroup], extras: Extras, out: torch.Tensor | None = None) -> torch.Tensor:
        """One agent's groups (A [M, 1, r, n], B [M, 1, m, r]) and extras [1, ...] -> data [data_numel] (written
        into `out` [data_numel] when given), detached from autograd: what is sent is data."""
        factors, others = self._entries(groups, extras)
        return torch.cat([t.detach().reshape(-1).to(self.dtype) for t in factors + others], out=out)

    def pack_each(self, groups: list[FactorGroup], extras: Extras) -> torch.Tensor:
        """k agents' groups (A [M, k, r, n], B [M, k, m, r]) and extras [k, ...] -> data [k, data_numel]
        (row j: what agent j's :meth:`pack` gives)."""
        k = groups[0].n_agents if groups else next(iter(extras.values())).shape[0]
        factors = [t.movedim(1, 0) for g in groups for t in ((g.A, g.B) if self.trains_A else (g.B,))]
        return torch.cat([t.reshape(k, -1).to(self.dtype) for t in factors + list(extras.values())], dim=1)

    def _trim(self, tensors: list[torch.Tensor], rank: int) -> list[torch.Tensor]:
        """Tensors [k, *shape] in the padded layout -> the leading `rank` directions of every factor."""
        return [t.narrow(self.rank_dims[index] + 1, 0, rank) if index < self.n_factors else t
                for index, t in enumerate(tensors)]

    def _pad(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Tensors [k, *trimmed shape] -> the padded layout [k, *shape] (zeros after the carried directions)."""
        padded = []
        for index, t in enumerate(tensors):
            if index < self.n_factors and t.shape[1:] != self.shapes[index]:
                full = t.new_zeros(t.shape[0], *self.shapes[index])
                full.narrow(self.rank_dims[index] + 1, 0, t.shape[self.rank_dims[index] + 1]).copy_(t)
                t = full
            padded.append(t)
        return padded

    def encode(self, data: torch.Tensor, agent: int | None = None) -> torch.Tensor:
        """Agent `agent`'s data [data_numel] -> wire [wire_numel_of(agent)] of wire_dtype (None: every direction);
        the data itself when its message carries every direction without loss (float32: no copy)."""
        rank = self.rank_of(agent)
        if rank == self.padded_rank and self.codec.lossless:
            return data
        tensors = [t.reshape(1, *s) for t, s in zip(data.split(self.sizes), self.shapes)]
        return self._codec(rank).encode([t[0] for t in self._trim(tensors, rank)])

    def decode(self, wires: torch.Tensor, agent: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Wires [k, wire_numel_of(agent)] of k agents of `agent`'s rank -> their data as received [k, data_numel]
        (exact for float32), written into `out` [k, data_numel] when given."""
        decoded = self._codec(self.rank_of(agent)).decode(wires)
        return torch.cat([t.reshape(wires.shape[0], -1) for t in self._pad(decoded)], dim=1, out=out)

    def check(self, wire: torch.Tensor, agent: int | None = None) -> str | None:
        """Why agent `agent`'s received wire must be rejected beyond the transport's size / dtype / finiteness
        checks (int8: bad scales or codes), or None."""
        return self._codec(self.rank_of(agent)).check(wire)

    def received(self, data: torch.Tensor) -> torch.Tensor:
        """Every agent's data [N, data_numel] (row j: agent j) -> what a receiver decodes from their messages,
        decode(encode(.))."""
        if self.codec.lossless:
            return data
        return torch.cat([self.decode(self.encode(row, j)[None], j) for j, row in enumerate(data)])

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
