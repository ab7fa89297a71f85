"""API keys: ``attrib_<prefix>_<secret>``, stored as SHA-256, compared in constant time.

Keys carry 256 bits of randomness, so a fast hash is enough (nothing to brute-force). The
prefix is a public lookup id; the comparison of the whole key's hash is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.orm import ApiKey, Owner, utcnow

KEY_PREFIX = "attrib"


@dataclass(frozen=True)
class Principal:
    """Who is calling: an operator, or the rights holder ``owner_id``."""

    key_id: int | None
    owner_id: int | None

    @property
    def is_operator(self) -> bool:
        return self.owner_id is None


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(s: Session, owner: Owner | None, name: str = "") -> tuple[ApiKey, str]:
    """A new key for ``owner`` (None: operator). Returns the row and the key, shown only once."""
    prefix = secrets.token_hex(6)
    key = f"{KEY_PREFIX}_{prefix}_{secrets.token_urlsafe(32)}"
    row = ApiKey(prefix=prefix, key_hash=hash_key(key), owner_id=owner.id if owner else None, name=name)
    s.add(row)
    s.flush()
    return row, key


def revoke_key(s: Session, prefix: str) -> bool:
    row = s.scalar(select(ApiKey).where(ApiKey.prefix == prefix))
    if row is None:
        return False
    if row.revoked_at is None:
        row.revoked_at = utcnow()
    return True


def authenticate(s: Session, key: str, operator_key: str | None = None) -> Principal | None:
    """The principal holding ``key``, or None (unknown, malformed or revoked)."""
    if operator_key and hmac.compare_digest(hash_key(key), hash_key(operator_key)):
        return Principal(None, None)
    parts = key.split("_", 2)  # the secret itself may contain "_"
    if len(parts) != 3 or parts[0] != KEY_PREFIX or len(parts[1]) != 12:
        return None
    row = s.scalar(select(ApiKey).where(ApiKey.prefix == parts[1]))
    if row is None or row.revoked_at is not None:
        return None
    if not hmac.compare_digest(row.key_hash, hash_key(key)):
        return None
    return Principal(row.id, row.owner_id)
