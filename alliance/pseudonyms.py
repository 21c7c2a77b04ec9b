"""Keyed pseudonyms (HMAC-SHA256) for patient, therapist, episode and session identifiers.

The key never enters the warehouse. A clinic holding the key recomputes a pseudonym from its own
identifier (``alliance pseudonym``) to act on an alert.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Callable
from pathlib import Path

KEY_ENV = "ALLIANCE_PSEUDONYM_KEY"
PREFIX = {"patient": "pt_", "therapist": "th_", "episode": "ep_", "session": "se_"}
MIN_KEY_CHARS = 32
DIGEST_CHARS = 16  # 64 bits: collision odds are negligible at 10^7 identifiers per kind


class MissingKeyError(RuntimeError):
    """Raised when no pseudonym key is configured outside demo mode."""


def pseudonymiser(key: bytes) -> Callable[[str, str, str], str]:
    """A fast pseudonym function for one key (the keyed HMAC state is built once and copied)."""
    keyed = hmac.new(key, digestmod=hashlib.sha256)

    def to_pseudonym(kind: str, clinic_id: str, raw_id: str) -> str:
        h = keyed.copy()
        h.update(f"{kind}|{clinic_id}|{raw_id}".encode())
        return PREFIX[kind] + h.hexdigest()[:DIGEST_CHARS]

    return to_pseudonym


def hmac_pads(key: bytes) -> tuple[bytes, bytes]:
    """The HMAC-SHA256 inner and outer padded keys (RFC 2104), for computing pseudonyms in SQL.

    HMAC(key, m) = sha256(outer || sha256(inner || m)); `alliance.ingest` evaluates that over a
    batch's distinct identifiers in DuckDB, the pads passed as statement parameters (never in SQL
    text or a table). tests/test_ingest.py checks it equals `pseudonymiser`.
    """
    if len(key) > 64:  # SHA-256 block size
        key = hashlib.sha256(key).digest()
    key = key.ljust(64, b"\0")
    return bytes(b ^ 0x36 for b in key), bytes(b ^ 0x5C for b in key)


def pseudonym(key: bytes, kind: str, clinic_id: str, raw_id: str) -> str:
    """The pseudonym of one identifier; identifiers are scoped by clinic and kind."""
    return pseudonymiser(key)(kind, clinic_id, raw_id)


def load_key(demo_key_file: Path | None = None) -> bytes:
    """The key from $ALLIANCE_PSEUDONYM_KEY; in demo mode a local key file is created and used."""
    value = os.environ.get(KEY_ENV)
    if value:
        if len(value) < MIN_KEY_CHARS:
            raise MissingKeyError(
                f"{KEY_ENV} is only {len(value)} characters; use a random secret of at least "
                f"{MIN_KEY_CHARS} (e.g. `python -c 'import secrets; print(secrets.token_hex(32))'`)"
            )
        return value.encode()
    if demo_key_file is None:
        raise MissingKeyError(
            f"{KEY_ENV} is not set. Set it to a secret of at least 32 characters kept outside "
            "the warehouse (the same key must be used for every run), or, for synthetic data "
            "only, use `alliance demo` or set ALLIANCE_DEMO=1, which create a local demo key."
        )
    if not demo_key_file.exists():
        demo_key_file.parent.mkdir(parents=True, exist_ok=True)
        demo_key_file.write_text(secrets.token_hex(32))
        demo_key_file.chmod(0o600)
    return demo_key_file.read_text().strip().encode()


def platform_key() -> bytes:
    """The platform's key as the pipeline uses it: $ALLIANCE_PSEUDONYM_KEY, or in demo mode
    (ALLIANCE_DEMO=1) the local demo key under the data directory's secrets/."""
    from alliance.config import paths

    demo = os.environ.get("ALLIANCE_DEMO", "") == "1"
    return load_key(paths().secrets / "demo_pseudonym_key" if demo else None)


def is_pseudonym(value: str, kind: str) -> bool:
    p = PREFIX[kind]
    return (
        len(value) == len(p) + DIGEST_CHARS
        and value.startswith(p)
        and all(c in "0123456789abcdef" for c in value[len(p):])
    )
