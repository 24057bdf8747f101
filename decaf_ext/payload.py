"""The one flat buffer an agent sends per neighbour and round: layout, encoding and decoding in one place."""

from __future__ import annotations

import functools
import hashlib
import json

import torch

from decaf_ext.lora import FactorGroup

Extras = dict[str, torch.Tensor]


class Payload:
    """Layout of the buffer one agent sends in a round.

    For every factor group (``collect_factors`` order): A [M, r, n] when the strategy trains A, then B [M, m, r];
    then every extra (``collect_extras`` order), all in one dtype. Every agent has the same model, so the size
    is known before anything is received; ``fingerprint`` (entries, shapes, dtype, trailer) lets the transport
    refuse an agent whose layout differs. ``trailer`` elements (e.g. a message tag) follow the data.
    """

    def __init__(self, groups: list[FactorGroup], extras: Extras, *, trains_A: bool, trailer: int = 0) -> None:
        self.trains_A = trains_A
        factors, others = self._entries(groups, extras)
        self.n_factors = len(factors)
        self.shapes = [tuple(t.shape) for t in factors + others]
        self.dtypes = [t.dtype for t in factors + others]
        self.sizes = [t.numel() for t in factors + others]
        self.dtype = functools.reduce(torch.promote_types, self.dtypes)
        self.data_numel = sum(self.sizes)
        self.numel = self.data_numel + trailer
        described = json.dumps([[list(s), str(d)] for s, d in zip(self.shapes, self.dtypes)]
                               + [str(self.dtype), trailer])
        self.fingerprint = f"{self.numel}:{self.dtype}:{hashlib.sha1(described.encode()).hexdigest()[:16]}"

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
