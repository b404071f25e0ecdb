"""One conformance check run against every kind of leg: plain TCP, TLS where we are the server,
TLS where we are the client, and a stream of an HBONE tunnel (an HTTP/2 CONNECT stream over TLS
with ALPN h2, whose far end is an HBONE client). Real sockets on 127.0.0.1, real TLS, uvloop as in
production.

Each test joins the leg under test (``leg``, whose far end the test drives as ``far``) to a plain
leg (``other``, whose far end is the raw socket ``back``), as a connection does when it streams;
the test plays the legs' owner, recording what they report.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvloop
from prometheus_client import CollectorRegistry
from support import CertFactory, CertFiles, client_context, server_context, tcp_pair

from sidecar import legs as legs_mod
from sidecar.config import Limits
from sidecar.errors import PeerError, TLSFailure
from sidecar.hbone import HboneClient, HboneServer, TunnelSettings
from sidecar.hbone import events as ev
from sidecar.hbone.streamleg import StreamLeg
from sidecar.hbone.tunnel import Tunnel
from sidecar.legs import WRITE_HIGH_WATER, Leg, TLSLeg
from sidecar.metrics import DataMetrics
from sidecar.record import Outcome
from sidecar.relay import Side
from sidecar.tlsio import TLSEngine

KINDS = ("plain", "tls-server", "tls-client", "stream")
LIMIT = 10.0  # generous liveness bound for every step


@dataclass
class Owner:
    """The legs' owner, as the connection driver is: records what they report."""

    loop: asyncio.AbstractEventLoop
    events: list[tuple[str, Side, Any]] = field(default_factory=list)
    outcome: Outcome | None = None

    def leg_connected(self, leg: Leg) -> None:
        self.events.append(("connected", leg.side, None))

    def leg_secured(self, leg: TLSLeg) -> None:
        self.events.append(("secured", leg.side, leg.tls.negotiated().version))

    def leg_failed(self, leg: Leg, error: PeerError) -> None:
        self.events.append(("failed", leg.side, error))

    def leg_eof(self, leg: Leg) -> None:
        self.events.append(("eof", leg.side, None))

    def leg_lost(self, leg: Leg, exc: Exception | None) -> None:
        self.events.append(("lost", leg.side, exc))

    def seen(self, kind: str) -> list[tuple[str, Side, Any]]:
        return [e for e in self.events if e[0] == kind]

    async def wait(self, kind: str, side: Side) -> tuple[str, Side, Any]:
        async with asyncio.timeout(LIMIT):
            while True:
                for e in self.events:
                    if e[0] == kind and e[1] is side:
                        return e
                await asyncio.sleep(0.005)


class PlainEnd:
    """The far end of a plain leg: a raw socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()

    async def start(self) -> None:
        pass

    async def send(self, data: bytes) -> None:
        await self.loop.sock_sendall(self.sock, data)

    async def recv(self) -> bytes:
        """Some bytes, or b"" at the end of data."""
        return await self.loop.sock_recv(self.sock, 65536)

    async def send_eof(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)


class TLSEnd(PlainEnd):
    """The far end of a TLS leg: an ``SSLObject`` of the opposite role over the raw socket."""

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, *, server_side: bool) -> None:
        super().__init__(sock)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        hostname = None if server_side else "localhost"
        self.closed_cleanly = False  # close_notify received
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_side=server_side, server_hostname=hostname)

    async def _flush(self) -> None:
        if self.outgoing.pending:
            await super().send(self.outgoing.read())

    async def _fill(self) -> bool:
        data = await super().recv()
        if not data:
            return False
        self.incoming.write(data)
        return True

    async def start(self) -> None:
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._fill():
                    raise ConnectionResetError("the leg closed during the handshake") from None
        await self._flush()

    async def send(self, data: bytes) -> None:
        self.obj.write(data)
        await self._flush()

    async def recv(self) -> bytes:
        while True:
            try:
                data = self.obj.read(65536)
                if not data:  # close_notify (CPython returns b"" until we have sent ours)
                    self.closed_cleanly = True
                return data
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._fill():
                    return b""
            except ssl.SSLZeroReturnError:
                self.closed_cleanly = True
                return b""

    async def send_eof(self) -> None:
        with contextlib.suppress(ssl.SSLWantReadError):
            self.obj.unwrap()
        await self._flush()
        await super().send_eof()


def tls_level(end: PlainEnd) -> bool:
    """Whether the leg's own end of data shows at the far end as TLS close_notify (a stream's is
    END_STREAM, inside the tunnel's TLS)."""
    return isinstance(end, TLSEnd) and not isinstance(end, StreamEnd)


class StreamEnd(TLSEnd):
    """The far end of a stream leg: an HBONE client over TLS (ALPN h2) over the raw socket, with
    one CONNECT stream; a reader task feeds it, and what ``recv`` hands out is credited back."""

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext) -> None:
        ctx.set_alpn_protocols(["h2"])
        super().__init__(sock, ctx, server_side=False)
        self.mux = HboneClient(now=0.0)
        self.sid = 0
        self.buf = bytearray()
        self.ended = self.gone = self.writable = False
        self.reset_code: int | None = None
        self.changed = asyncio.Event()
        self.reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await super().start()  # the TLS handshake
        assert self.obj.selected_alpn_protocol() == "h2"
        self.sid = self.mux.open_stream("127.0.0.1:8080")
        await self._send_frames()
        self.reader = asyncio.ensure_future(self._read())

    async def _send_frames(self) -> None:
        out = self.mux.data_to_send()
        if out:
            self.obj.write(out)
        await self._flush()

    async def _read(self) -> None:
        with contextlib.suppress(OSError):
            while data := await PlainEnd.recv(self):
                self.incoming.write(data)
                with contextlib.suppress(ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                    while chunk := self.obj.read(1 << 20):
                        self.mux.receive_data(chunk, 0.0)
                for e in self.mux.events():
                    if isinstance(e, ev.StreamData):
                        self.buf += e.data
                    elif isinstance(e, ev.StreamEnded):
                        self.ended = True
                    elif isinstance(e, ev.StreamReset):
                        self.reset_code = e.error_code
                    elif isinstance(e, ev.StreamWritable):
                        self.writable = True
                await self._send_frames()
                self.changed.set()
        self.gone = True
        self.changed.set()

    async def _until(self, ready: Callable[[], bool]) -> None:
        while not ready():
            self.changed.clear()
            await self.changed.wait()

    async def send(self, data: bytes) -> None:
        """Queue ``data`` on the stream; returns once the stream takes more (its queue drained)."""
        self.writable = False
        full = not self.mux.send(self.sid, data)
        await self._send_frames()
        if full:
            await self._until(lambda: self.writable or self.reset_code is not None or self.gone)

    async def recv(self) -> bytes:
        await self._until(lambda: bool(self.buf) or self.ended or self.reset_code is not None or self.gone)
        if self.buf:
            data, self.buf = bytes(self.buf), bytearray()
            self.mux.consumed(self.sid, len(data))
            await self._send_frames()
            return data
        if self.reset_code is not None:
            raise ConnectionResetError(f"RST_STREAM {self.reset_code}")
        return b""

    async def send_eof(self) -> None:
        self.mux.end_stream(self.sid)
        await self._send_frames()


class RigTunnel(Tunnel):
    """Our end of the stream kind's tunnel: a server tunnel that reports each CONNECT it gets."""

    def __init__(self, engine: TLSEngine) -> None:
        loop = asyncio.get_running_loop()
        metrics = DataMetrics(CollectorRegistry()).for_listener("legs", "inbound")
        super().__init__(HboneServer(now=0.0), engine, client=False, limits=Limits(), metrics=metrics, loop=loop)
        self.requested: asyncio.Future[int] = loop.create_future()

    def accept(self, stream_id: int) -> None:
        assert isinstance(self.mux, HboneServer)
        self.mux.accept(stream_id)
        self.pump()

    def refuse(self, stream_id: int, status: int) -> None:
        assert isinstance(self.mux, HboneServer)
        self.mux.refuse(stream_id, status)
        self.pump()

    def _on_event(self, event: ev.Event) -> None:
        if isinstance(event, ev.DialRequested) and not self.requested.done():
            self.requested.set_result(event.stream_id)


async def read_exactly(end: PlainEnd, n: int) -> bytes:
    buf = bytearray()
    async with asyncio.timeout(LIMIT):
        while len(buf) < n:
            chunk = await end.recv()
            assert chunk, f"end of data after {len(buf)} of {n} bytes"
            buf += chunk
    return bytes(buf)


async def read_to_end(end: PlainEnd) -> bytes:
    buf = bytearray()
    async with asyncio.timeout(LIMIT):
        while chunk := await end.recv():
            buf += chunk
    return bytes(buf)


@dataclass
class Rig:
    owner: Owner
    leg: Leg  # under test
    far: PlainEnd  # drives ``leg``'s far end
    other: Leg  # plain, joined to ``leg`` when streaming
    back: PlainEnd  # ``other``'s far end

    def join(self) -> None:
        self.leg.other, self.other.other = self.other, self.leg
        self.leg.start_streaming(self.other)
        self.other.start_streaming(self.leg)


@dataclass
class Certs:
    ca: CertFactory
    server: CertFiles
    client: CertFiles
    rogue: CertFactory


@pytest.fixture
def certs(ca: CertFactory, server_leaf: CertFiles, client_leaf: CertFiles, rogue_ca: CertFactory) -> Certs:
    return Certs(ca, server_leaf, client_leaf, rogue_ca)


@contextlib.asynccontextmanager
async def make_rig(kind: str, certs: Certs) -> AsyncIterator[Rig]:
    ca, server_leaf, client_leaf = certs.ca, certs.server, certs.client
    loop = asyncio.get_running_loop()
    owner = Owner(loop)
    mine, theirs = await tcp_pair()
    leg: Leg
    far: PlainEnd
    if kind == "stream":
        sctx = server_context(server_leaf, ca.ca_file)
        sctx.set_alpn_protocols(["h2"])
        tunnel = RigTunnel(TLSEngine(sctx, server_side=True))
        far = StreamEnd(theirs, client_context(client_leaf, ca.ca_file))
        await loop.connect_accepted_socket(lambda: tunnel.leg, mine)
        await asyncio.wait_for(far.start(), LIMIT)
        sid = await asyncio.wait_for(tunnel.requested, LIMIT)
        leg = StreamLeg(owner, Side.DOWN)
        leg.attach(tunnel, sid, incoming=True)
        tunnel.legs[sid] = leg
        leg.begin()
    elif kind == "plain":
        leg, far = Leg(owner, Side.DOWN), PlainEnd(theirs)
    elif kind == "tls-server":
        engine = TLSEngine(server_context(server_leaf, ca.ca_file), server_side=True)
        leg, far = (
            TLSLeg(owner, Side.DOWN, engine, client=False),
            TLSEnd(theirs, client_context(client_leaf, ca.ca_file), server_side=False),
        )
    else:
        ctx = client_context(client_leaf, ca.ca_file)
        engine = TLSEngine(ctx, server_side=False, server_hostname="localhost")
        leg, far = (
            TLSLeg(owner, Side.DOWN, engine, client=True),
            TLSEnd(theirs, server_context(server_leaf, ca.ca_file), server_side=True),
        )
    if kind != "stream":
        await loop.connect_accepted_socket(lambda: leg, mine)
        await asyncio.wait_for(far.start(), LIMIT)
    if kind.startswith("tls"):
        await owner.wait("secured", Side.DOWN)
    other_mine, other_theirs = await tcp_pair()
    other = Leg(owner, Side.UP)
    await loop.connect_accepted_socket(lambda: other, other_mine)
    try:
        yield Rig(owner, leg, far, other, PlainEnd(other_theirs))
    finally:
        for lg in (leg, other):
            lg.abort()
        if isinstance(far, StreamEnd) and far.reader is not None:
            far.reader.cancel()
        for sock in (theirs, other_theirs):
            sock.close()
        await asyncio.sleep(0)


def taking(rig: Rig) -> bool:
    """Whether ``rig.leg`` still takes what its far end sends: a socket reading, a stream whose
    window the far end may still send into."""
    if isinstance(rig.far, StreamEnd):
        return rig.far.mux._h2.local_flow_control_window(rig.far.sid) > 0
    assert rig.leg.transport is not None
    return rig.leg.transport.is_reading()


def queued_toward_far(leg: Leg) -> int:
    """What ``leg`` holds for its far end: a socket's write buffer, a stream's send queue."""
    if isinstance(leg, StreamLeg):
        assert leg.host is not None and leg.stream_id is not None
        return leg.host.mux._streams[leg.stream_id].queued  # type: ignore[attr-defined]
    assert leg.transport is not None
    return leg.transport.get_write_buffer_size()


def on_every_leg(scenario: Callable[[Rig], Awaitable[None]]) -> Callable[[str, Certs], None]:
    """Run ``scenario`` under uvloop (as in production) against each kind of leg."""

    def test(kind: str, certs: Certs) -> None:
        async def run() -> None:
            async with make_rig(kind, certs) as rig:
                await scenario(rig)

        uvloop.run(run())

    test.__name__, test.__doc__ = scenario.__name__, scenario.__doc__
    return pytest.mark.parametrize("kind", KINDS)(test)


def under_uvloop(scenario: Callable[[Certs], Awaitable[None]]) -> Callable[[Certs], None]:
    def test(certs: Certs) -> None:
        uvloop.run(scenario(certs))

    test.__name__, test.__doc__ = scenario.__name__, scenario.__doc__
    return test


# -- the conformance check ---------------------------------------------------------------------------


@on_every_leg
async def test_bytes_arrive_exactly_as_sent_both_ways_at_once(rig: Rig) -> None:
    rig.join()
    up, down = os.urandom(3 * 1024 * 1024 + 17), os.urandom(2 * 1024 * 1024 + 5)

    async def send_in_odd_chunks(end: PlainEnd, data: bytes) -> None:
        for i, start in enumerate(range(0, len(data), 70001)):
            await end.send(data[start : start + 70001])
            if i % 7 == 0:
                await asyncio.sleep(0)

    results = await asyncio.gather(
        send_in_odd_chunks(rig.far, up),
        send_in_odd_chunks(rig.back, down),
        read_exactly(rig.back, len(up)),
        read_exactly(rig.far, len(down)),
    )
    assert results[2] == up and results[3] == down
    assert (rig.leg.received, rig.other.received) == (len(up), len(down))


@on_every_leg
async def test_the_far_end_finishing_is_passed_on_while_the_other_way_flows(rig: Rig) -> None:
    rig.join()
    await rig.far.send(b"last words")
    await rig.far.send_eof()
    assert await read_to_end(rig.back) == b"last words"  # then the end of data, passed on
    await rig.owner.wait("eof", Side.DOWN)
    await rig.back.send(b"still answering")
    assert await read_exactly(rig.far, 15) == b"still answering"


@on_every_leg
async def test_ending_our_sending_keeps_the_leg_reading(rig: Rig) -> None:
    rig.join()
    await rig.back.send(b"bye")
    await rig.back.send_eof()  # -> rig.leg.send_eof(): FIN (after close_notify on TLS)
    assert await read_to_end(rig.far) == b"bye"
    assert rig.far.closed_cleanly if tls_level(rig.far) else True
    assert rig.leg.write_eof
    await rig.far.send(b"but I still talk")
    assert await read_exactly(rig.back, 16) == b"but I still talk"


@on_every_leg
async def test_a_slow_reader_pauses_the_writer_and_memory_stays_bounded(rig: Rig) -> None:
    rig.join()
    assert rig.other.transport is not None
    assert rig.other.transport.get_write_buffer_limits() == (legs_mod.WRITE_LOW_WATER, WRITE_HIGH_WATER)
    chunk = os.urandom(64 * 1024)
    sent = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + LIMIT
    # ``back`` reads nothing: ``other``'s buffer passes its high-water mark and ``leg`` stops reading
    while taking(rig):
        assert loop.time() < deadline, "the leg never stopped reading"
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(rig.far.send(chunk), 0.5)
            sent += len(chunk)
    # a stream may deliver what was in flight within its window: that window bounds it
    in_flight = TunnelSettings().stream_window if isinstance(rig.leg, StreamLeg) else 0
    assert rig.other.transport.get_write_buffer_size() <= WRITE_HIGH_WATER + in_flight + 512 * 1024
    got = await read_exactly(rig.back, sent)  # the reader catches up: reading resumes, nothing lost
    assert len(got) == sent
    assert taking(rig)


@on_every_leg
async def test_a_slow_far_end_pauses_the_other_leg_and_memory_stays_bounded(rig: Rig) -> None:
    rig.join()
    assert rig.other.transport is not None
    chunk = os.urandom(64 * 1024)
    sent = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + LIMIT
    # ``far`` reads nothing: what ``leg`` holds for it passes its limit and ``other`` stops reading
    while rig.other.transport.is_reading():
        assert loop.time() < deadline, "the other leg never stopped reading"
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(rig.back.send(chunk), 0.5)
            sent += len(chunk)
    limit = TunnelSettings().send_buffer if isinstance(rig.leg, StreamLeg) else WRITE_HIGH_WATER
    assert queued_toward_far(rig.leg) <= limit + 512 * 1024
    got = await read_exactly(rig.far, sent)  # the far end catches up: the other leg reads again
    assert len(got) == sent
    async with asyncio.timeout(LIMIT):
        while not rig.other.transport.is_reading():  # noqa: ASYNC110 - polling the transport's own state
            await asyncio.sleep(0.005)


@on_every_leg
async def test_before_streaming_a_leg_holds_one_read_and_stops(rig: Rig) -> None:
    await rig.far.send(b"early")
    loop = asyncio.get_running_loop()
    if isinstance(rig.leg, StreamLeg):
        await asyncio.sleep(0.1)  # the peer sends no DATA before our 200: nothing can arrive
    else:
        assert rig.leg.transport is not None
        async with asyncio.timeout(LIMIT):
            while rig.leg.transport.is_reading():  # noqa: ASYNC110 - polling the transport's own state
                await asyncio.sleep(0.005)
    assert rig.leg.received == 0  # held, not handed on
    rig.join()
    assert await read_exactly(rig.back, 5) == b"early"
    assert rig.leg.received == 5
    assert loop is not None


@on_every_leg
async def test_a_graceful_close_ends_our_sending_and_lingers_until_the_far_end_finishes(rig: Rig) -> None:
    rig.join()
    rig.leg.close()
    assert await read_to_end(rig.far) == b""  # end of data (close_notify first, on TLS)
    assert rig.far.closed_cleanly if tls_level(rig.far) else True
    await rig.far.send(b"dropped while lingering")  # read and dropped: no reset for unread bytes
    if isinstance(rig.leg, StreamLeg):
        assert not rig.leg.lost
    else:
        assert rig.leg.transport is not None and not rig.leg.transport.is_closing()
    await rig.far.send_eof()
    await rig.owner.wait("lost", Side.DOWN)
    assert rig.other.received == 0 and not rig.owner.seen("failed")


@pytest.mark.parametrize("kind", KINDS)
def test_lingering_ends_after_linger_seconds(kind: str, certs: Certs, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(legs_mod, "LINGER_SECONDS", 0.2)

    async def scenario(rig: Rig) -> None:
        rig.join()
        rig.leg.close()
        assert await read_to_end(rig.far) == b""
        await rig.owner.wait("lost", Side.DOWN)  # the far end never finished: closed after the linger

    async def run() -> None:
        async with make_rig(kind, certs) as rig:
            await scenario(rig)

    uvloop.run(run())


@on_every_leg
async def test_an_abort_closes_at_once_without_ending_cleanly(rig: Rig) -> None:
    rig.join()
    rig.leg.abort()
    async with asyncio.timeout(LIMIT):
        with contextlib.suppress(ConnectionResetError):
            while await rig.far.recv():
                pass
    if tls_level(rig.far):
        assert not rig.far.closed_cleanly  # no close_notify: the far end can tell it was cut
    await rig.owner.wait("lost", Side.DOWN)


# -- TLS legs: handshake failures, each named ----------------------------------------------------------


async def _tls_leg(owner: Owner, engine: TLSEngine, *, client: bool) -> tuple[TLSLeg, socket.socket]:
    loop = asyncio.get_running_loop()
    mine, theirs = await tcp_pair()
    leg = TLSLeg(owner, Side.DOWN, engine, client=client)
    await loop.connect_accepted_socket(lambda: leg, mine)
    return leg, theirs


@under_uvloop
async def test_a_client_without_certificate_fails_the_server_legs_handshake_named(certs: Certs) -> None:
    ca, server_leaf = certs.ca, certs.server
    owner = Owner(asyncio.get_running_loop())
    engine = TLSEngine(server_context(server_leaf, ca.ca_file), server_side=True)
    leg, theirs = await _tls_leg(owner, engine, client=False)
    far = TLSEnd(theirs, client_context(None, ca.ca_file), server_side=False)
    with contextlib.suppress(ssl.SSLError, ConnectionResetError):
        await asyncio.wait_for(far.start(), LIMIT)
        await far.recv()  # TLS 1.3: the client learns of the refusal after its Finished
    _, _, error = await owner.wait("failed", Side.DOWN)
    assert isinstance(error, TLSFailure) and error.reason == "no_client_cert"
    assert not owner.seen("secured")
    leg.abort()
    theirs.close()


@under_uvloop
async def test_an_untrusted_server_fails_the_client_legs_handshake_named(certs: Certs) -> None:
    owner = Owner(asyncio.get_running_loop())
    engine = TLSEngine(client_context(certs.client, certs.ca.ca_file), server_side=False, server_hostname="localhost")
    leg, theirs = await _tls_leg(owner, engine, client=True)
    rogue = certs.rogue.leaf("orders")
    far = TLSEnd(theirs, server_context(rogue, certs.rogue.ca_file), server_side=True)
    with pytest.raises(ssl.SSLError, match=r"UNKNOWN_CA"):  # our alert tells the far end why
        await asyncio.wait_for(far.start(), LIMIT)
    _, _, error = await owner.wait("failed", Side.DOWN)
    assert isinstance(error, TLSFailure) and error.reason == "untrusted"
    leg.abort()
    theirs.close()


@under_uvloop
async def test_the_far_end_leaving_mid_handshake_is_an_eof_failure(certs: Certs) -> None:
    ca, server_leaf = certs.ca, certs.server
    owner = Owner(asyncio.get_running_loop())
    engine = TLSEngine(server_context(server_leaf, ca.ca_file), server_side=True)
    leg, theirs = await _tls_leg(owner, engine, client=False)
    theirs.shutdown(socket.SHUT_WR)  # FIN before a ClientHello
    _, _, error = await owner.wait("failed", Side.DOWN)
    assert isinstance(error, PeerError) and error.reason == "eof"
    leg.abort()
    theirs.close()
