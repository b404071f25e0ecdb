"""The capture listeners in one process: real sockets on loopback, real TLS, uvloop as in production.

On loopback no nat rule redirects anything, so these tests give the listeners a stand-in for the
conntrack lookup: the original destination the test registered for the client's source port. The
lookup itself, and every path through real nat rules, is proved in network namespaces
(``tests/netns``); the refusal of a connection that was *not* redirected uses the real lookup here.
Outbound can only be refused on loopback (its destinations are never loopback), so its mTLS and
passthrough paths are proved in the namespaces too; except through a tunnel: a tunnel route's
connections go to port 15008 of the original destination's address, and here a second stand-in
says where that is (a real ``hbone`` listener on loopback, ``HboneListener`` in this process). That
the tunnel really goes to ``<original destination>:15008`` is proved in
``tests/netns/test_netns_hbone.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvloop
from prometheus_client import CollectorRegistry
from support import TD, Backend, CertFactory, CertFiles, client_context, echo_handler, recv_exactly

from sidecar import transparent
from sidecar.capture import INBOUND_LISTENER
from sidecar.config import (
    Address,
    Hbone,
    HbonePort,
    InboundMode,
    Limits,
    Route,
    TLSFiles,
    Transparent,
    TransparentInbound,
    TransparentOutbound,
    TransparentPort,
    Tunnel,
    Unmatched,
    parse,
    parse_destination,
)
from sidecar.errors import SidecarError
from sidecar.hbone import events as ev
from sidecar.hbone.inbound import HboneListener, ServerTunnel
from sidecar.identity import parse_pattern
from sidecar.logs import ACCESS
from sidecar.metrics import DataMetrics
from sidecar.origdst import Socket, original_dst
from sidecar.tls import TLSStore
from sidecar.transparent import CaptureListener, InboundCapture, OutboundCapture, capture_listeners

LIMIT = 10.0
PEER_IP = "10.231.0.7"  # a destination the listeners only see as data: nothing is sent there
PEER_IP6 = "fd00:231::7"


@dataclass
class Rig:
    store: TLSStore
    registry: CollectorRegistry
    metrics: DataMetrics
    ca: CertFactory
    records: list[dict[str, Any]]
    dsts: dict[int, tuple[str, int]] = field(default_factory=dict)

    def lookup(self, sock: Socket) -> tuple[str, int] | None:
        """What conntrack would say: the destination registered for the client's source port, else
        what conntrack does say (for a connection straight to the capture port: nothing)."""
        registered = self.dsts.get(sock.getpeername()[1])  # type: ignore[attr-defined]
        return registered if registered is not None else original_dst(sock)

    def count(self, listener: str, outcome: str) -> float:
        direction = "inbound" if listener.endswith("inbound") else "outbound"
        labels = {"listener": listener, "direction": direction, "outcome": outcome}
        return self.registry.get_sample_value("sidecar_connections_total", labels) or 0.0

    def inbound(self, app_port: int, mode: InboundMode, limits: Limits | None = None) -> InboundCapture:
        """transparent-inbound for one app port, allowing spiffe://mesh.local/frontend there."""
        return InboundCapture(inbound_spec(app_port, mode), self.store, limits or Limits(), self.metrics, self.lookup)

    async def record(self, n: int = 1) -> list[dict[str, Any]]:
        """The access records, once there are ``n``."""
        await eventually(lambda: len(self.records) >= n)
        return self.records


async def eventually(predicate: Callable[[], Any]) -> None:
    deadline = time.monotonic() + LIMIT
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


class _Collect(logging.Handler):
    def __init__(self, out: list[dict[str, Any]]) -> None:
        super().__init__(logging.INFO)
        self.out = out

    def emit(self, record: logging.LogRecord) -> None:
        self.out.append({"level": record.levelname, **getattr(record, "fields", {})})


@contextlib.asynccontextmanager
async def make_rig(ca: CertFactory, leaf: CertFiles) -> AsyncIterator[Rig]:
    store = TLSStore(TLSFiles(leaf.cert, leaf.key, ca.ca_file), listeners=[INBOUND_LISTENER])
    await store.load()
    registry = CollectorRegistry()
    records: list[dict[str, Any]] = []
    handler, level = _Collect(records), ACCESS.level
    ACCESS.addHandler(handler)
    ACCESS.setLevel(logging.INFO)
    try:
        yield Rig(store, registry, DataMetrics(registry), ca, records)
    finally:
        ACCESS.removeHandler(handler)
        ACCESS.setLevel(level)


def inbound_spec(app_port: int, mode: InboundMode, allow: str = "spiffe://mesh.local/frontend") -> TransparentInbound:
    port = TransparentPort(app_port, (parse_pattern(allow),))
    return TransparentInbound(listen=Address("127.0.0.1", 0), ports=(port,), mode=mode)


@contextlib.asynccontextmanager
async def serving(listener: CaptureListener) -> AsyncIterator[int]:
    await listener.start()
    try:
        bound = listener.bound
        assert bound is not None
        yield bound.port
    finally:
        listener.stop_accepting()
        for conn in list(listener.active):
            conn.cut("test over")
        await listener.wait_closed()


def connect(rig: Rig, port: int, dst: tuple[str, int] | None, host: str = "127.0.0.1") -> socket.socket:
    """A client socket connected to the capture port, its original destination registered first."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(LIMIT)
    sock.bind((host, 0))
    if dst is not None:
        rig.dsts[sock.getsockname()[1]] = dst
    sock.connect((host, port))
    return sock


def tls_call(rig: Rig, port: int, dst: tuple[str, int], leaf: CertFiles | None, payload: bytes) -> bytes:
    """Connect as a meshed peer, send ``payload``, read as much back (empty: refused)."""
    ctx = client_context(leaf, rig.ca.ca_file)
    with connect(rig, port, dst) as raw, ctx.wrap_socket(raw, server_hostname="localhost") as s:
        try:
            s.sendall(payload)
            return recv_exactly(s, len(payload))
        except (ssl.SSLError, OSError, AssertionError):
            return b""


def plain_call(rig: Rig, port: int, dst: tuple[str, int] | None, payload: bytes, host: str = "127.0.0.1") -> bytes:
    with connect(rig, port, dst, host) as s:
        try:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            out = b""
            while chunk := s.recv(65536):
                out += chunk
            return out
        except OSError:
            return b""


def run(scenario: Callable[[Rig], Any]) -> Callable[[CertFactory, CertFiles], None]:
    def test(ca: CertFactory, server_leaf: CertFiles) -> None:
        async def main() -> None:
            async with make_rig(ca, server_leaf) as rig:
                await scenario(rig)

        uvloop.run(main())

    test.__name__, test.__doc__ = scenario.__name__, scenario.__doc__
    return test


# -- inbound, strict ------------------------------------------------------------------------------


@run
async def test_strict_inbound_lets_an_allowed_peer_reach_the_app_and_nobody_else(rig: Rig) -> None:
    app = Backend(echo_handler)
    listener = rig.inbound(app.port, InboundMode.STRICT)
    dst = (PEER_IP, app.port)
    try:
        async with serving(listener) as port:
            frontend, stranger = rig.ca.leaf("frontend"), rig.ca.leaf("stranger")
            assert await asyncio.to_thread(tls_call, rig, port, dst, frontend, b"hello app") == b"hello app"
            assert await asyncio.to_thread(tls_call, rig, port, dst, stranger, b"let me in") == b""
            assert await asyncio.to_thread(plain_call, rig, port, dst, b"GET / HTTP/1.0\r\n\r\n") == b""
            records = await rig.record(3)
    finally:
        app.close()
    assert app.accepts == 1  # the refused two never reached the app
    by_outcome = {r["outcome"]: r for r in records}
    assert set(by_outcome) == {"ok", "denied", "tls_error"}
    for r in records:
        assert (r["listener"], r["direction"], r["original_dst"]) == (
            "transparent-inbound",
            "inbound",
            f"{PEER_IP}:{app.port}",
        )
    assert by_outcome["ok"]["peer_identity"] == "spiffe://mesh.local/frontend"
    assert by_outcome["ok"]["tls_version"] == "TLSv1.3"
    assert "spiffe://mesh.local/stranger" in by_outcome["denied"]["reason"]
    assert [rig.count("transparent-inbound", o) for o in ("ok", "denied", "tls_error", "passthrough")] == [1, 1, 1, 0]


@run
async def test_inbound_refuses_a_port_it_does_not_capture_and_a_connection_not_redirected(rig: Rig) -> None:
    listener = rig.inbound(9, InboundMode.PERMISSIVE)
    async with serving(listener) as port:
        # straight to the capture port, IPv4 and IPv6: conntrack has no original destination for it
        assert await asyncio.to_thread(plain_call, rig, port, None, b"hello") == b""
        v6 = [s.getsockname()[1] for srv in listener.servers for s in srv.sockets if s.family == socket.AF_INET6]
        if v6:
            assert await asyncio.to_thread(plain_call, rig, v6[0], None, b"hello", "::1") == b""
        assert await asyncio.to_thread(plain_call, rig, port, (PEER_IP, 5432), b"hello") == b""
        records = await rig.record(3 if v6 else 2)
    assert [r["reason"] for r in records] == ["not_redirected"] * (2 if v6 else 1) + ["port_not_captured"]
    assert [r["original_dst"] for r in records] == [None] * (len(records) - 1) + [f"{PEER_IP}:5432"]
    assert {r["outcome"] for r in records} == {"denied"}
    assert rig.count("transparent-inbound", "denied") == len(records)


# -- inbound, permissive --------------------------------------------------------------------------


@run
async def test_permissive_inbound_lets_plaintext_through_and_still_checks_tls_peers(rig: Rig) -> None:
    app = Backend(echo_handler)
    listener = rig.inbound(app.port, InboundMode.PERMISSIVE)
    dst = (PEER_IP, app.port)
    request = b"GET / HTTP/1.1\r\nHost: app\r\n\r\n"
    try:
        async with serving(listener) as port:
            assert await asyncio.to_thread(plain_call, rig, port, dst, request) == request
            assert await asyncio.to_thread(tls_call, rig, port, dst, rig.ca.leaf("frontend"), b"meshed") == b"meshed"
            assert await asyncio.to_thread(tls_call, rig, port, dst, rig.ca.leaf("stranger"), b"meshed") == b""

            # one byte at a time: held until they decide, then handed on unchanged
            def dribble() -> bytes:
                with connect(rig, port, dst) as s:
                    for b in request:
                        s.sendall(bytes([b]))
                    s.shutdown(socket.SHUT_WR)
                    return recv_exactly(s, len(request))

            assert await asyncio.to_thread(dribble) == request
            records = await rig.record(4)
    finally:
        app.close()
    assert [r["outcome"] for r in records].count("passthrough") == 2
    assert app.accepts == 3  # the stranger never reached the app
    passed = [r for r in records if r["outcome"] == "passthrough"]
    assert all(r["peer_identity"] is None and r["tls_version"] is None for r in passed)
    assert {r["level"] for r in passed} == {"INFO"}  # expected in permissive mode: not a warning
    assert all(r["bytes_to_upstream"] == len(request) for r in passed)
    assert rig.count("transparent-inbound", "passthrough") == 2
    assert rig.count("transparent-inbound", "ok") == 1
    assert rig.count("transparent-inbound", "denied") == 1


def greeter(conn: socket.socket) -> None:
    conn.sendall(b"220 app ready\r\n")  # the server speaks first, as SMTP or MySQL
    echo_handler(conn)


@run
async def test_permissive_inbound_passes_a_silent_client_through_after_the_peek_timeout(rig: Rig) -> None:
    app = Backend(greeter)
    listener = rig.inbound(app.port, InboundMode.PERMISSIVE)

    def wait_for_greeting(port: int) -> tuple[bytes, float]:
        with connect(rig, port, (PEER_IP, app.port)) as s:
            t0 = time.monotonic()
            greeting = recv_exactly(s, 15)
            return greeting, time.monotonic() - t0

    try:
        async with serving(listener) as port:
            greeting, waited = await asyncio.to_thread(wait_for_greeting, port)
            records = await rig.record(1)
    finally:
        app.close()
    assert greeting == b"220 app ready\r\n"
    assert waited >= transparent.PEEK_TIMEOUT * 0.9  # it waited for a first byte that never came
    assert records[0]["outcome"] == "passthrough"
    assert records[0]["duration_ms"] >= transparent.PEEK_TIMEOUT * 900  # the wait is part of its life


@run
async def test_a_tls_looking_prefix_that_stalls_goes_to_the_handshake_and_its_timeout(rig: Rig) -> None:
    app = Backend(echo_handler)
    limits = Limits(handshake_timeout=0.5)
    listener = rig.inbound(app.port, InboundMode.PERMISSIVE, limits)

    def stall(port: int) -> bytes:
        with connect(rig, port, (PEER_IP, app.port)) as s:
            s.sendall(b"\x16\x03\x01")  # a ClientHello's record header, then nothing
            try:
                return s.recv(100)
            except OSError:
                return b""

    try:
        async with serving(listener) as port:
            assert await asyncio.to_thread(stall, port) == b""
            records = await rig.record(1)
    finally:
        app.close()
    assert (records[0]["outcome"], records[0]["handshake_error"]) == ("timeout", "timeout")
    assert app.accepts == 0


@run
async def test_a_client_that_leaves_before_its_first_bytes_is_recorded_and_never_reaches_the_app(rig: Rig) -> None:
    app = Backend(echo_handler)
    listener = rig.inbound(app.port, InboundMode.PERMISSIVE)

    try:
        async with serving(listener) as port:
            s = await asyncio.to_thread(connect, rig, port, (PEER_IP, app.port))
            await eventually(lambda: listener.choosing == 1)  # waiting for its first bytes
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()  # a reset, before a byte
            records = await rig.record(1)
            assert listener.peeking == set() and listener.choosing == 0
    finally:
        app.close()
    assert (records[0]["outcome"], records[0]["original_dst"]) == ("ok", f"{PEER_IP}:{app.port}")
    assert app.accepts == 0
    assert rig.count("transparent-inbound", "ok") == 1


@run
async def test_connections_waiting_for_their_first_bytes_count_toward_max_connections(rig: Rig) -> None:
    app = Backend(echo_handler)
    limits = Limits(max_connections=2)
    listener = rig.inbound(app.port, InboundMode.PERMISSIVE, limits)
    dst = (PEER_IP, app.port)
    try:
        async with serving(listener) as port:
            silent = [await asyncio.to_thread(connect, rig, port, dst) for _ in range(2)]
            await eventually(lambda: listener.choosing == 2)
            assert await asyncio.to_thread(plain_call, rig, port, dst, b"one too many") == b""
            records = await rig.record(1)
            assert records[0]["outcome"] == "limit"
            listener.stop_accepting()  # a drain decides the waiting ones now: plain TCP to the app
            assert listener.choosing == 0 and len(listener.active) == 2
            for s in silent:
                s.sendall(b"late")
                assert await asyncio.to_thread(recv_exactly, s, 4) == b"late"
                s.close()
    finally:
        app.close()
    assert app.accepts == 2


# -- outbound: only its refusals can be shown on loopback -----------------------------------------


@run
async def test_outbound_refuses_what_it_must_not_carry(rig: Rig) -> None:
    deny = TransparentOutbound(listen=Address("127.0.0.1", 0), unmatched=Unmatched.DENY)
    listener = OutboundCapture(deny, rig.store, Limits(), rig.metrics, rig.lookup)
    async with serving(listener) as port:
        assert await asyncio.to_thread(plain_call, rig, port, None, b"x") == b""  # straight to the port
        assert await asyncio.to_thread(plain_call, rig, port, (PEER_IP, 80), b"x") == b""  # no route, deny
        assert await asyncio.to_thread(plain_call, rig, port, ("127.0.0.1", 80), b"x") == b""  # never loopback
        assert await asyncio.to_thread(plain_call, rig, port, ("::1", 80), b"x") == b""
        records = await rig.record(4)
    assert [(r["reason"], r["original_dst"]) for r in records] == [
        ("not_redirected", None),
        ("no_route", f"{PEER_IP}:80"),
        ("loopback_destination", "127.0.0.1:80"),
        ("loopback_destination", "[::1]:80"),
    ]
    assert {(r["listener"], r["direction"], r["outcome"]) for r in records} == {
        ("transparent-outbound", "outbound", "denied")
    }
    assert rig.count("transparent-outbound", "denied") == 4


# -- outbound through HBONE tunnels: a route with `tunnel: hbone` -----------------------------------


@dataclass
class Tunnelled:
    """A capture listener whose route tunnels to a real hbone listener, and what that peer saw."""

    capture: OutboundCapture
    capture_port: int
    peer: HboneListener
    requests: list[ev.DialRequested]  # the CONNECTs the peer's tunnels parsed, in order


def handshakes(rig: Rig, listener: str) -> float:
    return rig.registry.get_sample_value("sidecar_handshake_seconds_count", {"listener": listener}) or 0.0


def pooled(rig: Rig) -> float:
    labels = {"listener": "transparent-outbound"}
    return rig.registry.get_sample_value("sidecar_hbone_pool_connections", labels) or 0.0


def tunnel_route(to: str, server_identity: str = f"{TD}/orders") -> Route:
    dest = parse_destination(to, "to", names=False, port_required=True)
    return Route(dest, (parse_pattern(server_identity),), None, Tunnel("hbone", None))


@contextlib.contextmanager
def connect_requests() -> Iterator[list[ev.DialRequested]]:
    """The CONNECT requests every hbone tunnel of this process parses, while inside: a spy on the
    peer, which still handles each one itself."""
    seen: list[ev.DialRequested] = []
    handle = ServerTunnel._on_event

    def spy(self: ServerTunnel, event: ev.Event) -> None:
        if isinstance(event, ev.DialRequested):
            seen.append(event)
        handle(self, event)

    ServerTunnel._on_event = spy  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        ServerTunnel._on_event = handle  # type: ignore[method-assign]


@contextlib.asynccontextmanager
async def tunnelled(
    rig: Rig, ports: dict[int, str], routes: tuple[Route, ...], identity: str = "frontend"
) -> AsyncIterator[Tunnelled]:
    """The peer: an hbone listener with the ``orders`` certificate letting ``ports[p]`` (an identity)
    reach 127.0.0.1:p. Us: transparent-outbound with ``routes`` and the ``identity`` certificate,
    whose tunnels reach that listener (the stand-in for ``<destination address>:15008``)."""
    orders = rig.ca.leaf("orders")
    peer_store = TLSStore(TLSFiles(orders.cert, orders.key, rig.ca.ca_file))
    allow = tuple(HbonePort(port, (parse_pattern(who),)) for port, who in ports.items())
    peer = HboneListener(
        Hbone(Address("127.0.0.1", 0), allow), peer_store, Limits(), rig.metrics.for_listener("hbone", "inbound")
    )
    mine = rig.ca.leaf(identity)
    store = TLSStore(TLSFiles(mine.cert, mine.key, rig.ca.ca_file))
    spec = TransparentOutbound(listen=Address("127.0.0.1", 0), routes=routes, unmatched=Unmatched.DENY)
    hbone_port: list[int] = []
    capture = OutboundCapture(
        spec, store, Limits(), rig.metrics, rig.lookup, upstream=lambda ip: Address("127.0.0.1", hbone_port[0])
    )
    await peer_store.load()
    await store.load()
    await peer.start()
    try:
        assert peer.bound is not None
        hbone_port.append(peer.bound.port)
        with connect_requests() as requests:
            async with serving(capture) as port:
                yield Tunnelled(capture, port, peer, requests)
    finally:
        peer.stop_accepting()
        await peer.wait_closed()


@run
async def test_a_tunnel_route_carries_captured_connections_as_streams_of_one_tunnel_per_peer_address(
    rig: Rig,
) -> None:
    """Eight captured connections to one address and two to another: ten CONNECT streams on two
    tunnels (one handshake per peer address, each end), every byte back, each stream asking for
    its own original destination, the IPv6 one in brackets."""
    app = Backend(echo_handler)
    routes = (tunnel_route(f"{PEER_IP}/32:*"), tunnel_route(f"[{PEER_IP6}]:{app.port}"))
    v4, v6 = (PEER_IP, app.port), (PEER_IP6, app.port)
    payloads = [os.urandom(100_000 + 4099 * i) for i in range(10)]
    dsts = [v4] * 8 + [v6] * 2
    try:
        async with tunnelled(rig, {app.port: f"{TD}/frontend"}, routes) as t:
            echoes = await asyncio.gather(
                *(asyncio.to_thread(plain_call, rig, t.capture_port, d, p) for d, p in zip(dsts, payloads, strict=True))
            )
            assert echoes == payloads
            records = await rig.record(20)  # each stream: ours and the peer's
            assert (handshakes(rig, "transparent-outbound"), handshakes(rig, "hbone")) == (2, 2)
            assert pooled(rig) == 2  # a pool per peer address, one tunnel each
            authorities = sorted(r.authority for r in t.requests)
            forwarded = {r.forwarded_for for r in t.requests}
        assert pooled(rig) == 0  # closed with the listener
    finally:
        app.close()
    assert authorities == [f"{PEER_IP}:{app.port}"] * 8 + [f"[{PEER_IP6}]:{app.port}"] * 2
    assert all(f is not None and f.startswith("127.0.0.1:") for f in forwarded)  # the app's address
    assert app.accepts == 10
    ours = [r for r in records if r["listener"] == "transparent-outbound"]
    assert sorted(r["original_dst"] for r in ours) == sorted(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in dsts)
    assert {(r["direction"], r["outcome"], r["peer_identity"], r["tls_version"]) for r in ours} == {
        ("outbound", "ok", f"{TD}/orders", "TLSv1.3")
    }
    assert sorted(r["bytes_to_upstream"] for r in ours) == sorted(len(p) for p in payloads)
    theirs = [r for r in records if r["listener"] == "hbone"]
    assert {(r["outcome"], r["peer_identity"]) for r in theirs} == {("ok", f"{TD}/frontend")}
    assert rig.count("transparent-outbound", "ok") == 10


@run
async def test_a_port_the_peer_does_not_let_us_reach_closes_the_app_connection_and_the_tunnel_stays(
    rig: Rig,
) -> None:
    """The peer answers 403 for a port whose ``allow`` does not name us, and for a port it does not
    list: each app connection is closed, nothing is dialled there, and the tunnel carries the
    next allowed connection without another handshake."""
    app, billing_only = Backend(echo_handler), Backend(echo_handler)
    unlisted = 9  # discard: never in hbone.ports
    ports = {app.port: f"{TD}/frontend", billing_only.port: f"{TD}/billing"}
    try:
        async with tunnelled(rig, ports, (tunnel_route(f"{PEER_IP}/32:*"),)) as t:
            for port in (billing_only.port, unlisted):
                assert await asyncio.to_thread(plain_call, rig, t.capture_port, (PEER_IP, port), b"no") == b""
            answer = await asyncio.to_thread(plain_call, rig, t.capture_port, (PEER_IP, app.port), b"yes")
            records = await rig.record(6)
            assert (handshakes(rig, "transparent-outbound"), handshakes(rig, "hbone")) == (1, 1)
    finally:
        app.close()
        billing_only.close()
    assert answer == b"yes"
    assert (billing_only.accepts, app.accepts) == (0, 1)
    ours = [r for r in records if r["listener"] == "transparent-outbound"]
    assert [(r["outcome"], r["original_dst"]) for r in ours] == [
        ("upstream_error", f"{PEER_IP}:{billing_only.port}"),
        ("upstream_error", f"{PEER_IP}:{unlisted}"),
        ("ok", f"{PEER_IP}:{app.port}"),
    ]
    assert all("403" in r["reason"] for r in ours[:2])
    theirs = [r for r in records if r["listener"] == "hbone"]
    assert sorted(r["outcome"] for r in theirs) == ["denied", "denied", "ok"]
    assert [rig.count("transparent-outbound", o) for o in ("ok", "upstream_error")] == [1, 2]


@run
async def test_a_peer_that_is_not_the_routes_server_identity_never_gets_a_stream(rig: Rig) -> None:
    """The route expects billing; the peer at that address is orders: the tunnel's handshake is
    refused once, and no CONNECT is ever sent on it."""
    app = Backend(echo_handler)
    route = tunnel_route(f"{PEER_IP}/32:*", server_identity=f"{TD}/billing")
    try:
        async with tunnelled(rig, {app.port: "*"}, (route,)) as t:
            assert await asyncio.to_thread(plain_call, rig, t.capture_port, (PEER_IP, app.port), b"x") == b""
            (record,) = await rig.record(1)
            assert t.requests == []
            assert pooled(rig) == 0
    finally:
        app.close()
    assert app.accepts == 0
    assert (record["listener"], record["outcome"]) == ("transparent-outbound", "upstream_error")
    assert f"{TD}/orders" in record["reason"] and "server_identity" in record["reason"]


@run
async def test_a_pool_let_go_closes_its_idle_tunnel(rig: Rig) -> None:
    """With room for one destination address, a second one takes the pool's place: the first
    pool's idle tunnel is closed at once, and only the second one stays."""
    app = Backend(echo_handler)
    kept = transparent.KEPT_DESTINATIONS
    transparent.KEPT_DESTINATIONS = 1
    routes = (tunnel_route(f"{PEER_IP}/32:*"), tunnel_route(f"[{PEER_IP6}]:*"))
    try:
        async with tunnelled(rig, {app.port: "*"}, routes) as t:
            assert await asyncio.to_thread(plain_call, rig, t.capture_port, (PEER_IP, app.port), b"one") == b"one"
            await eventually(lambda: pooled(rig) == 1)
            assert await asyncio.to_thread(plain_call, rig, t.capture_port, (PEER_IP6, app.port), b"two") == b"two"
            await eventually(lambda: pooled(rig) == 1 and len(t.peer.tunnels) == 1)
            assert handshakes(rig, "hbone") == 2
    finally:
        transparent.KEPT_DESTINATIONS = kept
        app.close()


# -- the uid ------------------------------------------------------------------------------------


def test_the_sidecar_must_run_as_transparent_uid(tmp_path: Path) -> None:
    cfg = parse(
        {
            "tls": {"cert": "c.pem", "key": "k.pem", "ca": "ca.pem"},
            "transparent": {"uid": 10001, "outbound": {"listen": "127.0.0.1:15001"}},
        },
        base_dir=tmp_path,
    )
    assert isinstance(cfg.transparent, Transparent)
    with pytest.raises(SidecarError, match=r"^transparent\.uid: the sidecar runs as uid \d+, not 10001"):
        capture_listeners(cfg, TLSStore(cfg.tls), DataMetrics(CollectorRegistry()))


# -- telling the app who is calling, through a capture port (contract section 9) -----------------


@run
async def test_a_captured_port_tells_the_app_who_is_calling(rig: Rig) -> None:
    """A transparent inbound port with ``proxy_protocol`` and ``client_cert_header``: the app reads a
    PROXY v2 header whose destination is where the caller was going (not the capture port), then
    the request carrying our x-forwarded-client-cert only."""
    got: list[tuple[bytes, bytes]] = []

    def recorder(conn: socket.socket) -> None:
        header = recv_exactly(conn, 16)
        header += recv_exactly(conn, struct.unpack("!H", header[14:16])[0])
        head = b""
        while b"\r\n\r\n" not in head and (chunk := conn.recv(65536)):
            head += chunk
        got.append((header, head))
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        conn.close()

    app = Backend(recorder)
    port_spec = TransparentPort(
        app.port, (parse_pattern("spiffe://mesh.local/frontend"),), proxy_protocol="conn", client_cert_header="xfcc"
    )
    spec = TransparentInbound(listen=Address("127.0.0.1", 0), ports=(port_spec,), mode=InboundMode.STRICT)
    listener = InboundCapture(spec, rig.store, Limits(), rig.metrics, rig.lookup)
    dst = (PEER_IP, app.port)
    request = b"GET / HTTP/1.1\r\nHost: orders\r\nX-Forwarded-Client-Cert: By=forged\r\n\r\n"

    def call(port: int) -> bytes:
        ctx = client_context(rig.ca.leaf("frontend"), rig.ca.ca_file)
        with connect(rig, port, dst) as raw, ctx.wrap_socket(raw, server_hostname="localhost") as s:
            s.sendall(request)
            out = b""
            while chunk := s.recv(65536):
                out += chunk
            return out

    try:
        async with serving(listener) as port:
            assert (await asyncio.to_thread(call, port)).endswith(b"ok")
            await eventually(lambda: got)
    finally:
        app.close()
    header, head = got[0]
    assert header[:12] == b"\r\n\r\n\x00\r\nQUIT\n" and header[13] == 0x11  # PROXY v2, TCP over IPv4
    src, dst_ip, _, dport = struct.unpack("!4s4sHH", header[16:28])
    assert (socket.inet_ntoa(dst_ip), dport) == dst  # the original destination, not the capture port
    assert socket.inet_ntoa(src) == "127.0.0.1"
    assert head.startswith(b"GET / HTTP/1.1\r\n")
    xfcc = [line for line in head.split(b"\r\n") if line.lower().startswith(b"x-forwarded-client-cert:")]
    assert len(xfcc) == 1 and b"URI=spiffe://mesh.local/frontend" in xfcc[0] and b"forged" not in xfcc[0]
