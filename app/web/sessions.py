"""Browser sessions: a key signs in once (form POST), the browser then holds a random token in
an HttpOnly, SameSite=Strict cookie. Sessions live in the database (every API process sees a
sign-in or sign-out at once); only the token's SHA-256 is stored. Each session has a CSRF token
that its forms send back."""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete, select

from app.auth import Principal, authenticate, hash_key
from app.db import Database
from app.orm import ApiKey, Owner, WebSession, utcnow

COOKIE = "attrib_session"
SIGN_IN_COOKIE = "attrib_sign_in"
"""Before a session exists, the sign-in form's CSRF token is checked against this cookie (the
double-submit pattern), so another site cannot sign a browser in under its own key."""


@dataclass(frozen=True)
class WebUser:
    """Who a session belongs to, and the token its forms must carry."""

    principal: Principal
    name: str  # the rights holder's name, or "operator"
    csrf_token: str

    @property
    def is_operator(self) -> bool:
        return self.principal.is_operator


def new_token() -> str:
    return secrets.token_urlsafe(32)


def same_token(sent: str | None, expected: str | None) -> bool:
    """Constant-time equality of two tokens, false when either is missing."""
    return bool(sent) and bool(expected) and hmac.compare_digest(str(sent), str(expected))


def sign_in(db: Database, key: str, operator_key: str | None, ttl_s: float) -> str | None:
    """A new session for the holder of ``key``: its cookie token, or None for a bad key. Expired
    sessions are deleted on the way."""
    with db.session() as s:
        p = authenticate(s, key.strip(), operator_key)
        if p is None:
            return None
        now = utcnow()
        s.execute(delete(WebSession).where(WebSession.expires_at < now))
        token = new_token()
        s.add(WebSession(token_hash=hash_key(token), key_id=p.key_id, owner_id=p.owner_id,
                         csrf_token=new_token(), created_at=now, expires_at=now + timedelta(seconds=ttl_s)))
        return token


_CURRENT = (select(WebSession.key_id, WebSession.owner_id, WebSession.csrf_token, Owner.name,
                   ApiKey.revoked_at)
            .outerjoin(ApiKey, ApiKey.id == WebSession.key_id)
            .outerjoin(Owner, Owner.id == WebSession.owner_id))


def current(db: Database, token: str | None) -> WebUser | None:
    """The session's user, or None (no cookie, unknown, expired, or its key revoked)."""
    if not token:
        return None
    with db.reads.connect() as c:
        row = c.execute(_CURRENT.where(WebSession.token_hash == hash_key(token),
                                       WebSession.expires_at > utcnow())).first()
    if row is None or row.revoked_at is not None:
        return None
    return WebUser(Principal(row.key_id, row.owner_id), row.name or "operator", row.csrf_token)


def sign_out(db: Database, token: str | None) -> None:
    if token:
        with db.session() as s:
            s.execute(delete(WebSession).where(WebSession.token_hash == hash_key(token)))
