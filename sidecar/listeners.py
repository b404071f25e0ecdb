"""Inbound and outbound listeners: the policy around each proxied connection.

Inbound: accept, terminate TLS (client certificate required), check ``allow``, and only then dial
``forward``. Outbound: accept the app's plaintext without reading it, dial ``upstream``, handshake,
check ``server_identity`` (or the host name), and only then let the app's bytes through.
Every connection is counted and logged exactly once, when it ends.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import ssl
import time
from collections.abc import Callable

from . import tlserrors
from .config import Address, Inbound, Limits, Outbound, is_ip
from .identity import PeerIdentity, from_peercert, is_allowed
from .libssl import resume
from .logs import ACCESS, event
from .metrics import ListenerMetrics
from .pump import Connection, Leg, peer_address, ssl_error_text
from .tls import TLSStore

SESSION_REFRESH_SECONDS = 60.0
BACKLOG = 4096


class Listener:
    """A listening socket and the connections it accepted."""

    direction = ""

    def __init__(self, name: str, listen: Address, store: TLSStore, limits: Limits, metrics: ListenerMetrics) -> None:
        self.name = name
        self.listen = listen
        self.store = store
        self.limits = limits
        self.metrics = metrics
        self.active: set[ProxyConnection] = set()
        self.servers: list[asyncio.Server] = []
        self.shares: list[list[socket.socket]] = []  # a supervisor's: the sockets its workers serve
        self.on_closed: Callable[[], None] = lambda: None

    async def start(self, sockets: list[socket.socket] | None = None) -> None:
        """Listen on ``listen``, or serve ``sockets`` bound by a supervisor (``bind_shares``)."""
        loop = asyncio.get_running_loop()
        if sockets is None:
            host = self.listen.host or None
            server = await loop.create_server(
                self._accept, host, self.listen.port, reuse_address=True, backlog=BACKLOG, start_serving=True
            )
            self.servers = [server]
            return
        for sock in sockets:
            self.servers.append(await loop.create_server(self._accept, sock=sock, backlog=BACKLOG))

    async def bind_shares(self, count: int) -> list[list[socket.socket]]:
        """Bind ``count`` listening sockets on the same address with SO_REUSEPORT, one share per worker.

        The kernel spreads new connections over them. Each share may hold an IPv4 and an IPv6
        socket (when ``listen`` names no host). This process never accepts on them; it keeps them
        so that a restarted worker can serve the same share.
        """
        loop = asyncio.get_running_loop()
        host, port = self.listen.host or None, self.listen.port
        for _ in range(count):
            server = await loop.create_server(
                self._accept, host, port, reuse_address=True, reuse_port=True, backlog=BACKLOG, start_serving=False
            )
            socks = [socket.socket(fileno=os.dup(s.fileno())) for s in server.sockets]
            server.close()
            for sock in socks:
                sock.listen(BACKLOG)  # connections queue from now on, before a worker is up
            port = socks[0].getsockname()[1]  # "port 0": every share takes the port the first got
            self.shares.append(socks)
        return self.shares

    @property
    def bound(self) -> Address | None:
        for sockets in [list(server.sockets) for server in self.servers] + self.shares:
            if sockets:
                host, port = sockets[0].getsockname()[:2]
                return Address(host, port)
        return None

    def stop_accepting(self) -> None:
        for server in self.servers:
            server.close()
        for sock in (sock for share in self.shares for sock in share):
            sock.close()
        self.shares = []

    def _accept(self) -> asyncio.Protocol:
        loop = asyncio.get_running_loop()
        if len(self.active) >= self.limits.max_connections:
            return _Refuse(self)
        conn = self.new_connection(loop)
        self.active.add(conn)
        assert conn.down is not None
        return conn.down

    def new_connection(self, loop: asyncio.AbstractEventLoop) -> ProxyConnection:
        raise NotImplementedError

    def tick(self, now: float) -> None:
        for conn in list(self.active):
            conn.tick(now)


class InboundListener(Listener):
    direction = "inbound"

    def __init__(self, spec: Inbound, store: TLSStore, limits: Limits, metrics: ListenerMetrics) -> None:
        super().__init__(spec.name, spec.listen, store, limits, metrics)
        self.spec = spec

    def new_connection(self, loop: asyncio.AbstractEventLoop) -> ProxyConnection:
        return InboundConnection(self, loop)


class OutboundListener(Listener):
    direction = "outbound"

    def __init__(self, spec: Outbound, store: TLSStore, limits: Limits, metrics: ListenerMetrics) -> None:
        super().__init__(spec.name, spec.listen, store, limits, metrics)
        self.spec = spec
        self.sessions = SessionCache(store.files.session_lifetime if store.files.session_resumption else 0.0)

    def new_connection(self, loop: asyncio.AbstractEventLoop) -> ProxyConnection:
        return OutboundConnection(self, loop)


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
        self._session: ssl.SSLSession | None = None

    def get(self, ctx: ssl.SSLContext) -> ssl.SSLSession | None:
        session = self._session
        if session is None or self._ctx is not ctx:
            return None
        age = time.time() - session.time
        if age > min(self.lifetime, session.timeout):
            self._session = None
            return None
        return session

    def wants(self, ctx: ssl.SSLContext) -> bool:
        """Whether a new session is worth fetching: reading ``SSLObject.session`` costs about 0.1 ms
        of CPU (measured), so the newest one is refreshed at most every ``REFRESH`` seconds
        (stateless TLS 1.3 tickets can be resumed more than once)."""
        if self.lifetime <= 0:
            return False
        session = self._session
        if session is None or self._ctx is not ctx:
            return True
        return time.time() - session.time > min(self.lifetime / 2, SESSION_REFRESH_SECONDS)

    def put(self, ctx: ssl.SSLContext, session: ssl.SSLSession | None) -> None:
        if self.lifetime > 0 and session is not None and session.has_ticket:
            self._ctx, self._session = ctx, session


class _Refuse(asyncio.Protocol):
    """Over ``max_connections``: close at once, count, log."""

    def __init__(self, listener: Listener) -> None:
        self.listener = listener

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        client = peer_address(transport)
        transport.abort()  # type: ignore[attr-defined]
        self.listener.metrics.ended("limit")
        log_access(self.listener, client=client, outcome="limit", reason="max_connections")


def log_access(
    listener: Listener,
    *,
    client: str,
    outcome: str,
    reason: str | None,
    peer_identity: str | None = None,
    handshake_error: str | None = None,
    bytes_to_upstream: int = 0,
    bytes_to_downstream: int = 0,
    duration_ms: float = 0.0,
    tls_version: str | None = None,
    cipher: str | None = None,
    resumed: bool = False,
) -> None:
    """The one access record of a connection (contract section 6, plus reason/handshake_error/resumed)."""
    event(
        ACCESS,
        logging.INFO if outcome == "ok" else logging.WARNING,
        "connection",
        listener=listener.name,
        direction=listener.direction,
        client=client,
        peer_identity=peer_identity,
        outcome=outcome,
        reason=reason,
        handshake_error=handshake_error,
        bytes_to_upstream=bytes_to_upstream,
        bytes_to_downstream=bytes_to_downstream,
        duration_ms=duration_ms,
        tls_version=tls_version,
        cipher=cipher,
        resumed=resumed,
    )


class ProxyConnection(Connection):
    """What inbound and outbound connections share: timers, counting, the access record."""

    def __init__(self, listener: Listener, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.listener = listener
        self.limits = listener.limits
        self.metrics = listener.metrics
        self.peer: PeerIdentity | None = None
        self.tls_version: str | None = None
        self.cipher: str | None = None
        self.client = "-"
        self.handshake_error: str | None = None
        self.resumed = False
        self._timer: asyncio.TimerHandle | None = None
        self._dial_task: asyncio.Task[None] | None = None
        self._handshake_started = 0.0
        self._flushed = (0, 0)
        self._idle_since = loop.time()
        self.metrics.active.inc()

    # -- shared steps ------------------------------------------------------------------------

    def arm_handshake_timer(self) -> None:
        self._handshake_started = time.perf_counter()
        self._timer = self.loop.call_later(self.limits.handshake_timeout, self._handshake_timed_out)

    def _handshake_timed_out(self) -> None:
        self._timer = None
        self.handshake_failed("timeout")
        self.finish("timeout", "handshake_timeout", abort=True)

    def handshake_failed(self, reason: str) -> None:
        self.handshake_error = reason
        self.metrics.handshake_failed(reason)

    def _cancel_handshake_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def handshake_finished(self, leg: Leg) -> bool:
        """Record the handshake; False when the connection was refused here."""
        self._cancel_handshake_timer()
        self.metrics.handshake_seconds.observe(time.perf_counter() - self._handshake_started)
        assert leg.tls is not None
        self.tls_version = leg.tls.version()
        cipher = leg.tls.cipher()
        self.cipher = cipher[0] if cipher else None
        self.resumed = leg.tls.session_reused
        cert = leg.tls.getpeercert()
        self.peer = from_peercert(cert)
        if self.resumed and cert and _not_after(str(cert["notAfter"])) < time.time():
            # a ticket can outlive the certificate it was issued for: that peer must handshake anew
            self.handshake_failed("expired")
            self.refuse("tls_error", "resumed a session of a certificate that has expired since", leg)
            return False
        return True

    def dial(self, target: Address) -> None:
        """Connect the ``up`` leg (the one we dial, both ways) to ``target``; failing that within
        ``connect_timeout`` ends the connection."""
        assert self.up is not None
        self._dial_task = self.loop.create_task(self._dial(target, self.up))

    async def _dial(self, target: Address, leg: Leg) -> None:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.limits.connect_timeout):  # no extra task, unlike wait_for
                await self.loop.create_connection(lambda: leg, target.host, target.port)
        except TimeoutError:
            self.finish("upstream_error", f"connect to {target} timed out")
            return
        except OSError as exc:
            self.finish("upstream_error", f"connect to {target}: {exc.strerror or exc}")
            return
        finally:
            self._dial_task = None
        self.metrics.upstream_connect_seconds.observe(time.perf_counter() - started)

    def leg_failed(self, leg: Leg, exc: BaseException) -> None:
        if self.closing:
            return
        if not leg.handshake_done:
            self._cancel_handshake_timer()
            self.handshake_failed(tlserrors.classify(exc))
            leg.abort()  # its alert is sent; nothing more is owed to a peer that failed its handshake
            # the app's leg, if there is one, closes cleanly: end of data, never a reset it could
            # get for bytes it sent that we never read
            self.finish("tls_error", ssl_error_text(exc))
        else:
            self.finish("tls_error" if isinstance(exc, ssl.SSLError) else "ok", ssl_error_text(exc), abort=True)

    def refuse(self, outcome: str, reason: str, leg: Leg) -> None:
        """Close a leg whose peer is not allowed: close_notify, then close; nothing is forwarded."""
        leg.send_eof()
        self.finish(outcome, reason)

    def cancel_pending(self) -> None:
        self._cancel_handshake_timer()
        if self._dial_task is not None:
            # uvloop can hand the leg its transport (and the handshake can even finish) before
            # create_connection returns; cancelling it then closes that transport without ever
            # calling connection_lost, and the connection would never end. A connected leg is
            # closed like any other; only a dial still connecting is cancelled.
            if self.up is None or self.up.transport is None:
                self._dial_task.cancel()
            self._dial_task = None

    def tick(self, now: float) -> None:
        """Periodic: publish byte counts, enforce ``idle_timeout``."""
        if self._flush_bytes():
            self._idle_since = now
        elif (
            self.streaming
            and self.limits.idle_timeout > 0
            and now - self._idle_since >= self.limits.idle_timeout
            and not self.closing
        ):
            self.finish("timeout", "idle_timeout")

    def _flush_bytes(self) -> bool:
        """Publish the bytes moved since the last flush; True when any moved."""
        up, down = self.bytes_to_upstream, self.bytes_to_downstream
        moved = False
        if up != self._flushed[0]:
            self.metrics.to_upstream.inc(up - self._flushed[0])
            moved = True
        if down != self._flushed[1]:
            self.metrics.to_downstream.inc(down - self._flushed[1])
            moved = True
        self._flushed = (up, down)
        return moved

    def ended(self) -> None:
        self.listener.active.discard(self)
        self.listener.on_closed()
        self._flush_bytes()
        outcome = self.outcome or "ok"
        duration = time.perf_counter() - self.started
        self.metrics.active.dec()
        self.metrics.ended(outcome)
        self.metrics.duration.observe(duration)
        log_access(
            self.listener,
            client=self.client,
            peer_identity=self.peer.describe() if self.peer else None,
            outcome=outcome,
            reason=self.reason,
            handshake_error=self.handshake_error,
            bytes_to_upstream=self.bytes_to_upstream,
            bytes_to_downstream=self.bytes_to_downstream,
            duration_ms=round(duration * 1000, 3),
            tls_version=self.tls_version,
            cipher=self.cipher,
            resumed=self.resumed,
        )


class InboundConnection(ProxyConnection):
    """mTLS in from a peer, plaintext out to ``forward``."""

    def __init__(self, listener: InboundListener, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(listener, loop)
        self.spec = listener.spec
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        sslobj = listener.store.material.server_ctx.wrap_bio(incoming, outgoing, server_side=True)
        self.down = Leg(self, tls=sslobj, incoming=incoming, outgoing=outgoing)

    def leg_connected(self, leg: Leg) -> None:
        if leg is self.down:
            self.client = peer_address(leg.transport)
            self.arm_handshake_timer()
        else:
            self.start_streaming()

    def leg_handshake(self, leg: Leg) -> None:
        if not self.handshake_finished(leg):
            return
        assert self.peer is not None
        if not is_allowed(self.peer, self.spec.allow):
            self.refuse("denied", f"identity {self.peer.describe()} is not in allow", leg)
            return
        self.up = Leg(self)
        self.dial(self.spec.forward)

    def on_lost_before_streaming(self, leg: Leg, exc: Exception | None) -> None:
        if leg is self.down and not leg.handshake_done:
            self.handshake_failed("eof")
            self.finish("tls_error", "closed during handshake")
        else:
            self.finish("ok" if leg is self.down else "upstream_error", "closed before streaming")


class OutboundConnection(ProxyConnection):
    """Plaintext in from the local app, mTLS out to ``upstream``."""

    def __init__(self, listener: OutboundListener, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(listener, loop)
        self.spec = listener.spec
        self.down = Leg(self)
        spec = self.spec
        self.sessions = listener.sessions
        self.ctx = ctx = listener.store.material.client_ctx(verify_hostname=spec.server_identity is None)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        server_hostname = spec.sni or (None if is_ip(spec.upstream.host) else spec.upstream.host)
        sslobj = ctx.wrap_bio(incoming, outgoing, server_side=False, server_hostname=server_hostname)
        session = self.sessions.get(ctx)
        if session is not None and not resume(sslobj, ctx, session):
            sslobj.session = session  # Python's way: the same, with a copy of the session
        self.up = Leg(self, tls=sslobj, incoming=incoming, outgoing=outgoing)
        self._session_saved = False

    def leg_connected(self, leg: Leg) -> None:
        if leg is self.down:
            self.client = peer_address(leg.transport)
            self.dial(self.spec.upstream)
        else:
            self.arm_handshake_timer()

    def leg_handshake(self, leg: Leg) -> None:
        if not self.handshake_finished(leg):
            return
        assert self.peer is not None
        patterns = self.spec.server_identity
        if patterns is not None and not is_allowed(self.peer, patterns):
            self.refuse("denied", f"upstream identity {self.peer.describe()} is not in server_identity", leg)
            return
        self.start_streaming()

    def save_session(self) -> None:
        """Keep the upstream's ticket (it arrives just after the handshake) for the next connection."""
        up = self.up
        if self._session_saved or not self.streaming or up is None or up.tls is None:
            return
        if not self.sessions.wants(self.ctx):
            self._session_saved = True  # nothing to do for this connection
            return
        session = up.tls.session
        if session is not None and session.has_ticket:
            self.sessions.put(self.ctx, session)
            self._session_saved = True

    def tick(self, now: float) -> None:
        self.save_session()
        super().tick(now)

    def ended(self) -> None:
        if self.outcome == "ok":
            self.save_session()
        super().ended()

    def on_lost_before_streaming(self, leg: Leg, exc: Exception | None) -> None:
        if leg is self.up and not leg.handshake_done:
            self.handshake_failed("eof")
            self.finish("upstream_error", "upstream closed during handshake")
        else:
            self.finish("ok", "client closed before streaming")


@functools.lru_cache(maxsize=1024)
def _not_after(text: str) -> float:
    """A certificate's notAfter as epoch seconds; parsed once per distinct certificate (strptime
    showed in the new-connection profile)."""
    return ssl.cert_time_to_seconds(text)
