"""Keys of a run: the user's shared run key (at least 16 bytes) and the keys derived from it with HKDF-SHA256,
one per purpose (message tags, the control plane), salted with the run's nonce.

Example::

    >>> tag_key = derive_key(check_run_key(b"sixteen byte key"), "message tags", salt=nonce)
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MIN_KEY_BYTES = 16
DERIVED_BYTES = 32


def check_run_key(key: bytes, source: str = "run_key_file") -> bytes:
    """`key` if it holds at least MIN_KEY_BYTES bytes, else ValueError naming `source`."""
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"{source}: the run key has {len(key)} bytes; use at least {MIN_KEY_BYTES} "
                         "(e.g. 32 random bytes: head -c 32 /dev/urandom > run.key)")
    return key


def derive_key(run_key: bytes, purpose: str, salt: bytes = b"") -> bytes:
    """A 32-byte key for `purpose` derived from the run key (HKDF-SHA256, info = b"decaf_ext " + purpose)."""
    return HKDF(algorithm=hashes.SHA256(), length=DERIVED_BYTES, salt=salt or None,
                info=b"decaf_ext " + purpose.encode()).derive(run_key)
