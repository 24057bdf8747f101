"""The run key (a secret shared by every agent of a run) and the keys derived from it, one per purpose.

The run key itself is never used directly: each use (the control plane's signatures, message tags) gets its own
key through HKDF-SHA256 (RFC 5869), so a key leaked or misused in one place says nothing about the others.

Example::

    >>> run_key = check_run_key(b"a run key of 32 bytes, not less!")
    >>> signing = derive_key(run_key, "control plane")   # 32 bytes
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from decaf_ext.errors import ConfigError

MIN_KEY_BYTES = 16  # 128 bits: a shorter secret can be searched
DERIVED_BYTES = 32


def check_run_key(key: bytes) -> bytes:
    """`key` if it can serve as a run key (bytes, at least 16 of them); ConfigError (a ValueError) naming
    run_key_file / DECAF_RUN_KEY otherwise."""
    if not isinstance(key, (bytes, bytearray)):
        raise ConfigError(f"run_key_file / DECAF_RUN_KEY: the run key must be bytes, got {type(key).__name__}")
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(f"run_key_file / DECAF_RUN_KEY: the run key has {len(key)} bytes, at least "
                          f"{MIN_KEY_BYTES} are needed (e.g. 32 random bytes: head -c 32 /dev/urandom | base64)")
    return bytes(key)


def derive_key(run_key: bytes, purpose: str, salt: bytes = b"") -> bytes:
    """The 32-byte key for `purpose` (e.g. "control plane"): HKDF-SHA256 of the run key with
    info = b"decaf_ext " + purpose and `salt` (empty: HKDF's default, zeros). The run key is checked first."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=DERIVED_BYTES, salt=salt or None,
                info=b"decaf_ext " + purpose.encode())
    return hkdf.derive(check_run_key(run_key))
