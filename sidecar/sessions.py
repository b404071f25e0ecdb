"""Client-side TLS session resumption: the newest session from one upstream, kept for the next
connection to it, and only with the very material it was made under."""

from __future__ import annotations

import ssl
import time

from .tlsio import Session, TLSEngine

SESSION_REFRESH_SECONDS = 60.0


class SessionCache:
    """The newest TLS 1.3 session from one upstream, to resume the next handshake with.

    A session is used only with the very context that made it, so a reload (new contexts) drops it;
    it is stored only after the upstream's identity was accepted, and it is not used past
    ``lifetime`` seconds or its own ticket lifetime. Ages count from OpenSSL's session time, which
    has whole seconds: a session may be dropped up to a second early, never late. ``lifetime`` 0
    turns resumption off.
    """

    def __init__(self, lifetime: float) -> None:
        self.lifetime = lifetime
        self._ctx: ssl.SSLContext | None = None
        self._session: Session | None = None

    def get(self, ctx: ssl.SSLContext) -> Session | None:
        session = self._session
        if session is None or self._ctx is not ctx:
            return None
        age = time.time() - session.time
        if age > min(self.lifetime, session.timeout):
            self._session = None
            return None
        return session

    def keep(self, engine: TLSEngine) -> bool:
        """Take the session of ``engine``, a client whose upstream was accepted, if one is worth
        taking; True when this connection has nothing more to offer (taken, or not wanted)."""
        ctx = engine.context
        if not self._wants(ctx):
            return True
        session = engine.session()
        if session is None or not session.has_ticket:
            return False  # the ticket has not arrived yet
        self._ctx, self._session = ctx, session
        return True

    def _wants(self, ctx: ssl.SSLContext) -> bool:
        """Whether a new session is worth fetching: taking one copies it (Python's getter cost about
        0.1 ms of CPU, measured; a held copy less), so the newest one is refreshed at most every
        ``SESSION_REFRESH_SECONDS`` (stateless TLS 1.3 tickets can be resumed more than once)."""
        if self.lifetime <= 0:
            return False
        session = self._session
        if session is None or self._ctx is not ctx:
            return True
        return time.time() - session.time > min(self.lifetime / 2, SESSION_REFRESH_SECONDS)
