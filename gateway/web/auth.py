"""Credentials of the status page: scrypt password hashes, token hashes, sessions.

The config holds only hashes (``web.password_hash``, ``web.token_sha256``); the
page never shows either.  A browser logs in once and then carries a session cookie
(HttpOnly, SameSite=Strict) whose server-side record holds the CSRF token every
action must echo back.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass, field

# scrypt cost: ~50 ms and 16 MB on a small box; the parameters travel in the hash.
_N, _R, _P = 2**14, 8, 1
SESSION_LIFETIME_S = 12 * 3600
MAX_SESSIONS = 1000


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def hash_password(password: str, salt: bytes | None = None) -> str:
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_N, r=_R, p=_P, dklen=32)
    return f"scrypt${_N}${_R}${_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        got = hashlib.scrypt(
            password.encode(),
            salt=base64.b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            maxmem=128 * 1024 * 1024,
            dklen=len(expected),
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, expected)


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def verify_token(token: str, stored_sha256: str) -> bool:
    return bool(stored_sha256) and hmac.compare_digest(token_sha256(token), stored_sha256)


def new_token() -> str:
    return secrets.token_urlsafe(32)


@dataclass
class Session:
    user: str
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    expires: float = field(default_factory=lambda: time.monotonic() + SESSION_LIFETIME_S)


class Sessions:
    """In memory: a restart logs everybody out, which is fine for an appliance."""

    def __init__(self) -> None:
        self._by_id: dict[str, Session] = {}

    def create(self, user: str) -> tuple[str, Session]:
        now = time.monotonic()
        self._by_id = {k: s for k, s in self._by_id.items() if s.expires > now}
        while len(self._by_id) >= MAX_SESSIONS:
            self._by_id.pop(next(iter(self._by_id)))
        session_id = secrets.token_urlsafe(32)
        session = self._by_id[session_id] = Session(user)
        return session_id, session

    def get(self, session_id: str | None) -> Session | None:
        if not session_id:
            return None
        session = self._by_id.get(session_id)
        if session is None or session.expires <= time.monotonic():
            self._by_id.pop(session_id, None)
            return None
        return session

    def drop(self, session_id: str | None) -> None:
        if session_id:
            self._by_id.pop(session_id, None)
