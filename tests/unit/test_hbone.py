"""HBONE client and server connection objects, wired to each other in memory (and through real
TLS with ALPN h2): CONNECT, byte-exact streams, half-close, resets, statuses, flow control."""

from __future__ import annotations

import os
import random
import ssl
from pathlib import Path

import h2.config
import h2.connection
import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import DataFrame

from sidecar.hbone import HboneClient, HboneServer, TunnelSettings, TunnelUnavailable
from sidecar.hbone.authority import format_authority, parse_authority
from sidecar.hbone.events import (
    ConnectionTerminated,
    DialRequested,
    PeerSettingsChanged,
    StreamAccepted,
    StreamClosed,
    StreamData,
    StreamEnded,
    StreamRefused,
    StreamRejected,
    StreamReset,
    StreamWritable,
)
from sidecar.hbone.server import forwarded_for
from sidecar.identity import PeerIdentity, from_peercert
from tests.support import CertFactory, MemoryLink, TunnelWire

FRONTEND = PeerIdentity(uris=("spiffe://mesh.local/frontend",))
SMALL = TunnelSettings(stream_window=64 * 1024, connection_window=256 * 1024, max_frame_size=16384, send_buffer=32768)


def wire(settings: TunnelSettings | None = None) -> TunnelWire:
    server = HboneServer(now=0.0, settings=settings)
    w = TunnelWire(HboneClient(now=0.0, settings=settings), server)
    w.pump()
    return w


def open_accepted(w: TunnelWire, count: int = 1, port: int = 8080) -> list[int]:
    """Open streams, accept every dial the server asks for, and return the stream ids."""
    ids = [w.client.open_stream(f"10.0.0.1:{port}") for _ in range(count)]
    w.pump()
    for dial in w.of("server", DialRequested):
        if dial.stream_id in ids:
            w.server.accept(dial.stream_id)
    w.pump()
    assert {e.stream_id for e in w.of("client", StreamAccepted)} >= set(ids)
    return ids


def send_all(w: TunnelWire, conn: HboneClient | HboneServer, stream_id: int, data: bytes, chunk: int = 65536) -> None:
    """Feed ``data`` the way a driver would: a chunk at a time, pumping while ``send`` says pause."""
    for i in range(0, len(data), chunk):
        if not conn.send(stream_id, data[i : i + chunk]):
            w.pump()


def exchange_and_end(w: TunnelWire, ids: list[int], size: int, chunk: int = 65536) -> None:
    """Random bytes each way on every stream (a different length per stream), both ends finish;
    each side must have received exactly what the other sent."""
    data = {sid: os.urandom(size + sid) for sid in ids}
    for sid in ids:
        send_all(w, w.client, sid, data[sid], chunk)
        send_all(w, w.server, sid, data[sid][::-1], chunk)
        w.client.end_stream(sid)
        w.server.end_stream(sid)
    w.pump()
    for sid in ids:
        assert bytes(w.received["server", sid]) == data[sid]
        assert bytes(w.received["client", sid]) == data[sid][::-1]


# -- the request ---------------------------------------------------------------------------


def test_connect_carries_authority_and_forwarded_and_asks_for_a_dial() -> None:
    w = wire()
    sid = w.client.open_stream("10.1.2.3:8080", forwarded_for="127.0.0.1:40000")
    w.pump()
    assert w.of("server", DialRequested) == [DialRequested(sid, 8080, "10.1.2.3:8080", "127.0.0.1:40000")]
    assert w.of("client", StreamAccepted) == []  # no 200 until the dial succeeded
    w.server.accept(sid)
    w.pump()
    assert w.of("client", StreamAccepted) == [StreamAccepted(sid)]


def test_peer_settings_reach_the_client() -> None:
    w = wire(TunnelSettings(max_concurrent_streams=7))
    assert w.of("client", PeerSettingsChanged)[-1].max_concurrent_streams == 7
    assert w.client.peer_max_streams == 7


def test_a_refusal_before_the_dial_answers_403_and_drops_what_the_peer_sent() -> None:
    w = wire()
    sid = w.client.open_stream("10.0.0.1:9090")
    w.client.send(sid, b"must never reach an app")
    w.pump()
    assert w.of("server", DialRequested) == [DialRequested(sid, 9090, "10.0.0.1:9090", None)]
    w.server.refuse(sid, 403)  # the driver's relay refused this peer for that port
    w.pump()
    assert w.of("server", StreamData) == []
    assert w.of("server", StreamClosed) == [StreamClosed(sid)]
    assert w.of("client", StreamRejected) == [StreamRejected(sid, 403)]
    assert w.of("client", StreamClosed) == [StreamClosed(sid)]
    assert w.server.open_streams == 0 and w.client.open_streams == 0


@pytest.mark.parametrize(
    "authority", ["10.0.0.1", "10.0.0.1:0", "10.0.0.1:99999", "a@b:80", "host:80/x", "[zz]:80", ":80", "a b:80"]
)
def test_a_malformed_authority_gets_400_and_no_dial(authority: str) -> None:
    w = wire()
    sid = w.client.open_stream(authority)
    w.pump()
    assert w.of("server", DialRequested) == []
    assert w.of("server", StreamRefused) == [StreamRefused(sid, 400, "bad_authority")]
    assert w.of("client", StreamRejected) == [StreamRejected(sid, 400)]


def test_a_method_other_than_connect_gets_405_and_no_dial() -> None:
    raw = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    raw.initiate_connection()
    server = HboneServer(now=0.0)
    headers = [(":method", "GET"), (":scheme", "https"), (":authority", "10.0.0.1:8080"), (":path", "/")]
    raw.send_headers(1, headers, end_stream=True)
    server.receive_data(raw.data_to_send(), 0.0)
    events = server.events()
    assert [e for e in events if isinstance(e, DialRequested)] == []
    assert StreamRefused(1, 405, "method_not_allowed") in events
    answers = raw.receive_data(server.data_to_send())
    statuses = [dict(e.headers)[b":status"] for e in answers if type(e).__name__ == "ResponseReceived"]
    assert statuses == [b"405"]


def test_a_failed_dial_answers_503_and_drops_the_held_bytes() -> None:
    w = wire()
    sid = w.client.open_stream("10.0.0.1:8080")
    w.pump()
    w.server.refuse(sid, 503)
    w.pump()
    assert w.of("client", StreamRejected) == [StreamRejected(sid, 503)]
    assert w.of("client", StreamClosed) == [StreamClosed(sid)]
    assert w.of("server", StreamData) == []
    assert w.of("server", StreamClosed) == [StreamClosed(sid)]


def test_bytes_sent_before_the_200_wait_on_the_client_and_none_reach_the_server_early() -> None:
    w = wire()
    sid = w.client.open_stream("10.0.0.1:8080")
    w.client.send(sid, b"hello")
    w.client.end_stream(sid)
    w.pump()
    assert w.of("server", StreamData) == [] and w.of("server", StreamEnded) == []
    w.server.accept(sid)
    w.pump()
    assert bytes(w.received["server", sid]) == b"hello"
    assert w.of("server", StreamEnded) == [StreamEnded(sid)]


# -- data, half-close, reset ----------------------------------------------------------------


def test_many_concurrent_streams_are_byte_exact_both_ways() -> None:
    w = wire(SMALL)  # small windows: many window updates and interleaved frames
    ids = open_accepted(w, 40)
    up = {sid: os.urandom(50_000 + 997 * i) for i, sid in enumerate(ids)}
    down = {sid: os.urandom(30_000 + 1013 * i) for i, sid in enumerate(ids)}
    for sid in ids:
        send_all(w, w.client, sid, up[sid], chunk=7000)
        send_all(w, w.server, sid, down[sid], chunk=9000)
        w.client.end_stream(sid)
        w.server.end_stream(sid)
    w.pump()
    for sid in ids:
        assert bytes(w.received["server", sid]) == up[sid]
        assert bytes(w.received["client", sid]) == down[sid]
    assert {e.stream_id for e in w.of("client", StreamClosed)} == set(ids)
    assert {e.stream_id for e in w.of("server", StreamClosed)} == set(ids)
    assert w.of("client", StreamReset) == [] and w.of("server", StreamReset) == []


@pytest.mark.parametrize("first", ["client", "server"])
def test_half_close_leaves_the_other_direction_flowing(first: str) -> None:
    w = wire()
    (sid,) = open_accepted(w)
    closer, other = (w.client, w.server) if first == "client" else (w.server, w.client)
    other_side = "server" if first == "client" else "client"
    closer.end_stream(sid)
    w.pump()
    assert w.of(other_side, StreamEnded) == [StreamEnded(sid)]
    assert w.of(first, StreamEnded) == [] and w.of(first, StreamClosed) == []
    late = os.urandom(200_000)
    send_all(w, other, sid, late)
    w.pump()
    assert bytes(w.received[first, sid]) == late  # still flowing after the peer's FIN
    other.end_stream(sid)
    w.pump()
    assert w.of(first, StreamClosed) == [StreamClosed(sid)] and w.of(other_side, StreamClosed) == [StreamClosed(sid)]


@pytest.mark.parametrize("aborter", ["client", "server"])
def test_a_reset_reaches_the_other_side_and_spares_the_neighbours(aborter: str) -> None:
    w = wire()
    victim, neighbour = open_accepted(w, 2)
    conn = w.client if aborter == "client" else w.server
    other = "server" if aborter == "client" else "client"
    conn.reset(victim)
    w.pump()
    assert w.of(aborter, StreamClosed) == [StreamClosed(victim)]  # the aborting side's record ends too
    assert w.of(aborter, StreamReset) == []
    assert w.of(other, StreamReset) == [StreamReset(victim, ErrorCodes.CONNECT_ERROR, before_response=False)]
    assert w.of(other, StreamClosed) == [StreamClosed(victim)]
    payload = os.urandom(100_000)
    send_all(w, w.client, neighbour, payload)
    w.pump()
    assert bytes(w.received["server", neighbour]) == payload


def test_a_reset_before_the_200_is_reported_as_such() -> None:
    w = wire()
    sid = w.client.open_stream("10.0.0.1:8080")
    w.pump()
    w.server.reset(sid)
    w.pump()
    assert w.of("client", StreamReset) == [StreamReset(sid, ErrorCodes.CONNECT_ERROR, before_response=True)]


# -- flow control -----------------------------------------------------------------------------


def test_stalled_readers_stop_their_writers_and_do_not_stall_their_neighbours() -> None:
    """Five stalled streams whose windows add up to more than the connection window: with the
    connection window credited only on consumption they would starve the sixth."""
    w = wire(SMALL)
    *slow, fast = open_accepted(w, 6)
    assert len(slow) * SMALL.stream_window > SMALL.connection_window
    w.auto_consume["server"] = False  # the server's TCP side consumes nothing unless told
    for sid in slow:
        for _ in range(50):  # far more than a window: the writer must be told to stop
            if not w.client.send(sid, os.urandom(16384)):
                break
            w.pump()
        else:
            raise AssertionError("send never asked a stalled stream's reader to pause")
    w.pump()
    held = {sid: len(w.received["server", sid]) for sid in slow}
    assert all(n <= SMALL.stream_window for n in held.values())  # bounded by the stream window
    payload = os.urandom(1_000_000)
    for i in range(0, len(payload), 16384):
        w.client.send(fast, payload[i : i + 16384])
        w.pump()
        w.server.consumed(fast, len(w.received.pop(("server", fast), b"")))
    assert b"".join(e.data for e in w.of("server", StreamData, fast)) == payload
    assert {sid: len(w.received["server", sid]) for sid in slow} == held  # still stalled, not a byte more
    w.server.consumed(slow[0], held[slow[0]])  # one reader catches up: its writer may resume
    w.pump()
    assert w.of("client", StreamWritable, slow[0]) != []


def test_send_buffer_is_bounded_per_stream() -> None:
    w = wire(SMALL)
    (sid,) = open_accepted(w)
    w.auto_consume["server"] = False
    chunk = 16384
    sent = 0
    while w.client.send(sid, b"x" * chunk):
        sent += chunk
        assert sent < 10 * 1024 * 1024, "send never said pause"
    # what the client holds for the stream: at most send_buffer plus the chunk that crossed it
    assert w.client._streams[sid].queued <= SMALL.send_buffer + chunk


def test_a_peer_that_overruns_the_stream_window_loses_the_connection() -> None:
    """A client ignoring flow control: DATA past the window we granted is a connection error,
    so a peer can never make us hold more than a window per stream."""
    w = wire(SMALL)
    (sid,) = open_accepted(w)
    frame = DataFrame(sid)
    frame.data = b"z" * SMALL.max_frame_size
    flood = frame.serialize() * (SMALL.stream_window // SMALL.max_frame_size + 1)
    w.server.receive_data(flood, 0.0)
    events = w.server.events()
    assert any(isinstance(e, ConnectionTerminated) and e.local for e in events)
    assert StreamReset(sid, ErrorCodes.CONNECT_ERROR, before_response=False) in events
    assert sum(len(e.data) for e in events if isinstance(e, StreamData)) <= SMALL.stream_window


@pytest.mark.parametrize("cut", ["bytes", "random"])
def test_frames_split_anywhere_across_reads_arrive_exactly(cut: str) -> None:
    """DATA payloads are handed on as they arrive and other frames go to h2 whole, whatever the
    read boundaries: one byte at a time, or at random places."""
    rng = random.Random(17)

    def chop(data: bytes) -> list[bytes]:
        if cut == "bytes":
            return [data[i : i + 1] for i in range(len(data))]
        out, i = [], 0
        while i < len(data):
            n = rng.randint(1, 40_000)
            out.append(data[i : i + n])
            i += n
        return out

    w = wire(SMALL)
    w.chop = chop
    ids = open_accepted(w, 3)
    size = 50_000 if cut == "bytes" else 400_000
    exchange_and_end(w, ids, size, chunk=7_001)
    assert {e.stream_id for e in w.of("server", StreamClosed)} == set(ids)


def test_padded_data_is_unpadded_and_its_padding_credited() -> None:
    raw = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    raw.initiate_connection()
    server = HboneServer(now=0.0, settings=SMALL)
    raw.send_headers(1, [(b":method", b"CONNECT"), (b":authority", b"10.0.0.1:8080")])
    server.receive_data(raw.data_to_send(), 0.0)
    server.accept(1)
    raw.receive_data(server.data_to_send())
    for _ in range(16):  # 16 x (1000 + 200 padding) = 19,200 bytes of window: past a quarter of it
        raw.send_data(1, b"p" * 1000, pad_length=199)
        server.receive_data(raw.data_to_send(), 0.0)
    got = b"".join(bytes(e.data) for e in server.events() if isinstance(e, StreamData))
    assert got == b"p" * 16000
    server.consumed(1, 16000)
    assert server._h2._get_stream_by_id(1).inbound_flow_control_window == SMALL.stream_window  # padding too


def test_a_frame_larger_than_we_allow_fails_the_connection_at_its_header() -> None:
    w = wire(SMALL)
    (sid,) = open_accepted(w)
    header = (SMALL.max_frame_size + 1).to_bytes(3, "big") + b"\x00\x00" + sid.to_bytes(4, "big")
    w.server.receive_data(header, 0.0)  # refused before a byte of its payload is waited for
    assert any(isinstance(e, ConnectionTerminated) and e.local for e in w.server.events())


def test_large_frames_are_used_when_both_sides_allow_them() -> None:
    w = wire(TunnelSettings(max_frame_size=1024 * 1024))
    assert w.client._h2.max_outbound_frame_size == 1024 * 1024
    (sid,) = open_accepted(w)
    w.client.send(sid, b"y" * 1024 * 1024)
    out = w.client.data_to_send()
    assert len(out) == 1024 * 1024 + 9  # one DATA frame: 9 bytes of header, the rest payload
    w.server.receive_data(out, 0.0)
    assert [len(e.data) for e in w.server.events() if isinstance(e, StreamData)] == [1024 * 1024]


# -- connection lifecycle -----------------------------------------------------------------------


def test_graceful_goaway_lets_open_streams_finish_and_refuses_new_ones() -> None:
    w = wire()
    (sid,) = open_accepted(w)
    late = w.client.open_stream("10.0.0.1:8080")  # in flight when the server says goaway
    w.server.stop_streams()
    w.pump()
    assert not w.client.usable and not w.client.has_capacity
    with pytest.raises(TunnelUnavailable):
        w.client.open_stream("10.0.0.1:8080")
    assert w.of("client", ConnectionTerminated) == [ConnectionTerminated(0, local=False, reason="goaway")]
    assert w.of("client", StreamReset, late) == [StreamReset(late, ErrorCodes.REFUSED_STREAM, before_response=True)]
    assert w.of("server", DialRequested, late) == []
    payload = os.urandom(300_000)
    send_all(w, w.client, sid, payload)
    send_all(w, w.server, sid, payload[::-1])
    w.client.end_stream(sid)
    w.server.end_stream(sid)
    w.pump()
    assert bytes(w.received["server", sid]) == payload and bytes(w.received["client", sid]) == payload[::-1]
    assert w.of("client", StreamClosed, sid) == [StreamClosed(sid)]


def test_keepalive_pings_a_silent_peer_and_gives_up_on_a_dead_one() -> None:
    w = wire()
    (sid,) = open_accepted(w)
    w.client.tick(5.0)
    assert w.client.data_to_send() == b""  # not silent long enough
    w.now = 11.0
    w.client.tick(11.0)
    w.pump()  # the server answers the PING
    w.client.tick(40.0)
    assert w.client.usable
    w.client.tick(50.0)  # a PING goes out and this time nobody carries the answer back
    w.client.data_to_send()
    w.client.tick(71.0)
    events = w.client.events()
    assert ConnectionTerminated(0, local=True, reason="keepalive timeout") in events
    assert StreamReset(sid, ErrorCodes.CONNECT_ERROR, before_response=False) in events
    assert not w.client.usable


def test_the_client_opens_no_more_streams_than_the_peer_allows() -> None:
    w = wire(TunnelSettings(max_concurrent_streams=3))
    for _ in range(3):
        w.client.open_stream("10.0.0.1:8080")
    assert not w.client.has_capacity
    with pytest.raises(TunnelUnavailable):
        w.client.open_stream("10.0.0.1:8080")


# -- through real TLS ------------------------------------------------------------------------------


def _ctx(protocol: ssl._SSLMethod, cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(ca)
    ctx.set_alpn_protocols(["h2"])
    if protocol == ssl.PROTOCOL_TLS_SERVER:
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.check_hostname = False
    return ctx


def test_streams_through_real_mtls_with_alpn_h2_and_the_verified_identity(tmp_path: Path) -> None:
    ca = CertFactory(tmp_path)
    server_leaf, client_leaf = ca.leaf("orders"), ca.leaf("frontend")
    link = MemoryLink(
        _ctx(ssl.PROTOCOL_TLS_CLIENT, client_leaf.cert, client_leaf.key, ca.ca_file),
        _ctx(ssl.PROTOCOL_TLS_SERVER, server_leaf.cert, server_leaf.key, ca.ca_file),
    )
    link.handshake()
    assert link.client.selected_alpn_protocol() == "h2" and link.server.selected_alpn_protocol() == "h2"
    assert from_peercert(link.server.getpeercert()).uris == FRONTEND.uris
    w = TunnelWire(HboneClient(now=0.0), HboneServer(now=0.0), link)
    w.pump()
    ids = open_accepted(w, 10)
    denied = w.client.open_stream("10.0.0.1:9090")
    w.pump()
    w.server.refuse(denied, 403)
    exchange_and_end(w, ids, 300_000)
    assert w.of("client", StreamRejected) == [StreamRejected(denied, 403)]
    assert [d.port for d in w.of("server", DialRequested)] == [8080] * 10 + [9090]


# -- small pieces ---------------------------------------------------------------------------------------


def test_authority_round_trips() -> None:
    assert parse_authority("10.0.0.1:8080") == ("10.0.0.1", 8080)
    assert parse_authority("[::1]:15008") == ("::1", 15008)
    assert parse_authority("orders.mesh.local:80") == ("orders.mesh.local", 80)
    assert format_authority("::1", 15008) == "[::1]:15008"
    assert format_authority("10.0.0.1", 80) == "10.0.0.1:80"


def test_forwarded_for_reads_the_first_for() -> None:
    assert forwarded_for('for="127.0.0.1:80";host=example.com') == "127.0.0.1:80"
    assert forwarded_for('for="[::1]:80"') == "[::1]:80"
    assert forwarded_for("by=x;proto=https") is None
