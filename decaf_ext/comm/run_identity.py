"""What every agent of a run must share, as one string compared at startup and on every join: the message
layout's fingerprint (model shapes, ranks, message dtype, tag trailer), the algorithm's name and a digest of the
run key (HMAC-SHA256 of a fixed label under a key derived from the run key: equal keys give equal digests, and the
digest tells nothing of the key). Both transports put it where the layout fingerprint went (gloo: the start and
ready records; TLS: the Hello and Ready messages), so an agent with another model, rank, algorithm or key is
refused with one line naming what differs.

Example::

    >>> mine = run_identity("760:torch.float32:ab12", "decaf", b"a run key of 32 bytes, not less!")
    >>> difference(mine, run_identity("760:torch.float32:ab12", "dlora", b"a run key of 32 bytes, not less!"))
    "algorithm 'dlora' instead of 'decaf'"
"""

from __future__ import annotations

import hashlib
import hmac

from decaf_ext.comm.keys import derive_key

LABEL = b"decaf_ext: this agent holds the run key"
NO_KEY = "no-key"
SEPARATOR = "|"


def key_digest(run_key: bytes | None) -> str:
    """16 hex characters identifying the run key (NO_KEY without one); never the key itself."""
    if run_key is None:
        return NO_KEY
    return hmac.new(derive_key(run_key, "run identity"), LABEL, hashlib.sha256).hexdigest()[:16]


def run_identity(fingerprint: str, algorithm: str, run_key: bytes | None) -> str:
    """The identity string of an agent with message layout `fingerprint`, strategy `algorithm` and `run_key`."""
    return SEPARATOR.join((fingerprint, algorithm, key_digest(run_key)))


def difference(mine: str, theirs: object) -> str | None:
    """What differs between identity `theirs` and `mine` (one phrase naming it), or None when they are equal."""
    if mine == theirs:
        return None
    if not isinstance(theirs, str):
        return "no run identity"
    own, other = mine.split(SEPARATOR), theirs.split(SEPARATOR)
    if len(own) != 3 or len(other) != 3:
        return "another message layout"
    reasons = []
    if own[2] != other[2]:
        reasons.append("no run key" if other[2] == NO_KEY else "a run key where there is none" if own[2] == NO_KEY
                       else "another run key")
    if own[1] != other[1]:
        reasons.append(f"algorithm {other[1]!r} instead of {own[1]!r}")
    if own[0] != other[0] and not reasons:  # a key's tag trailer changes the layout too
        reasons.append("another message layout (model, rank, message dtype or norm settings)")
    return ", ".join(reasons) or "another message layout"
