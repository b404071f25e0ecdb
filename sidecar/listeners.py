"""Listening sockets: accepting connections, refusing past ``max_connections``, and knowing which
connections are open on each listener.

A ``Listener`` hands every accepted connection to a ``Connection`` (the driver) with the
listener's policy, and hears back once, when it has ended, with its ``Record``: it counts it and
writes the access record. ``BaseListener`` is the part every listener shares (the sockets, the
connections open, their records, the limit); a subclass says what an accepted connection becomes
(``accepted``): transparent mode's choose a policy per connection (``sidecar/transparent.py``), the
HBONE listener's become tunnels whose streams are its connections (``sidecar/hbone/inbound.py``).
With ``workers: N`` the supervisor binds each listener N times with SO_REUSEPORT (``bind_shares``)
and its workers serve those sockets (``start(sockets)``).
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable

from .config import Address, Limits
from .connection import Connection, ConnectionPolicy
from .legs import peer_address
from .metrics import ListenerMetrics
from .record import Direction, Outcome, Record, log_access

BACKLOG = 4096


class BaseListener:
    """A listening address and the connections open on it; ``accepted`` says what a new one becomes."""

    def __init__(
        self, name: str, direction: Direction, listen: Address, limits: Limits, metrics: ListenerMetrics
    ) -> None:
        self.name = name
        self.direction = direction
        self.listen = listen
        self.limits = limits
        self.metrics = metrics
        self.active: set[Connection] = set()
        self.choosing = 0  # accepted, not yet given a policy (they count toward max_connections)
        self.servers: list[asyncio.Server] = []
        self.shares: list[list[socket.socket]] = []  # a supervisor's: the sockets its workers serve
        self.on_closed: Callable[[], None] = lambda: None

    async def start(self, sockets: list[socket.socket] | None = None) -> None:
        """Listen on ``listen``, or serve ``sockets`` bound by a supervisor (``bind_shares``)."""
        loop = asyncio.get_running_loop()
        if sockets is None:
            server = await loop.create_server(
                self._accept, self.hosts(), self.listen.port, reuse_address=True, backlog=BACKLOG, start_serving=True
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
        host, port = self.hosts(), self.listen.port
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

    def hosts(self) -> str | list[str] | None:
        """The addresses to bind ``listen``'s port on (None: every address, IPv4 and IPv6)."""
        return self.listen.host or None

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

    async def wait_closed(self) -> None:
        for server in self.servers:
            await server.wait_closed()

    def publish_bytes(self) -> None:
        for conn in self.active:
            conn.publish_bytes()

    def tick(self, now: float) -> None:
        """Once a second: byte counters, and idle deadlines (a connection may end meanwhile)."""
        for conn in list(self.active):
            conn.publish_bytes()
            conn.tick(now)

    def finished(self, conn: Connection, record: Record) -> None:
        """``conn`` has ended: count it, write its access record."""
        self.active.discard(conn)
        self.metrics.finished(record)
        log_access(record)
        self.on_closed()

    def open(self, policy: ConnectionPolicy) -> Connection:
        """A connection with ``policy``, open on this listener until it has ended (``finished``)."""
        conn = Connection(self, policy, asyncio.get_running_loop())
        self.active.add(conn)
        self.metrics.opened()
        return conn

    def accepted(self) -> asyncio.Protocol:
        """The protocol of a connection just accepted (within ``max_connections``)."""
        raise NotImplementedError

    def _accept(self) -> asyncio.Protocol:
        if len(self.active) + self.choosing >= self.limits.max_connections:
            return Refuse(self)
        return self.accepted()


class Listener(BaseListener):
    """Every connection gets the same policy."""

    def __init__(self, policy: ConnectionPolicy, listen: Address, limits: Limits, metrics: ListenerMetrics) -> None:
        super().__init__(policy.name, policy.direction, listen, limits, metrics)
        self.policy = policy

    def accepted(self) -> asyncio.Protocol:
        return self.open(self.policy).down


class Refuse(asyncio.Protocol):
    """Over ``max_connections``: close at once, count, log."""

    def __init__(self, listener: BaseListener) -> None:
        self.listener = listener

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        client = peer_address(transport)
        transport.abort()  # type: ignore[attr-defined]
        listener = self.listener
        listener.metrics.ended(Outcome.LIMIT)
        log_access(Record(listener.name, listener.direction, client, Outcome.LIMIT, reason="max_connections"))
