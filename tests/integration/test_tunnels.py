"""HBONE tunnels end to end: two real ``sidecar run`` processes, the app's connections carried as
CONNECT streams over one pooled mTLS connection between them, real backends on 127.0.0.1.

app -> outbound listener with ``tunnel: hbone`` (frontend) ==tunnel==> hbone listener (orders)
-> 127.0.0.1:<port> backend. Raw HTTP/2 clients stand in for third-party peers where a test needs
what our own client never sends.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import (
    TD,
    Backend,
    CertFactory,
    H2Client,
    SidecarProcess,
    client_context,
    echo_handler,
    plain_connect,
    recv_exactly,
    scrape,
    start_sidecar,
    tls_section,
    wait_for,
    write_config,
)

LIMIT = 10.0


def inbound_config(
    folder: Path, ca: CertFactory, ports: dict[int, list[str]], listen: str = "127.0.0.1:0", workers: int = 1
) -> Path:
    return write_config(
        folder / "hbone-in.yaml",
        {
            "tls": tls_section(ca.leaf("orders", folder=folder / "in-certs"), ca.ca_file),
            "hbone": {
                "listen": listen,
                "ports": [{"port": port, "allow": allow} for port, allow in ports.items()],
            },
            "admin": {"listen": "127.0.0.1:0"},
            "limits": {"drain_timeout": "5s"},
            "workers": workers,
        },
    )


def outbound_config(
    folder: Path,
    ca: CertFactory,
    hbone_port: int,
    targets: dict[str, int],
    *,
    identity: str = "frontend",
    workers: int = 1,
) -> Path:
    return write_config(
        folder / f"hbone-out-{identity}.yaml",
        {
            "tls": tls_section(ca.leaf(identity, folder=folder / f"{identity}-certs"), ca.ca_file),
            "outbound": [
                {
                    "name": name,
                    "listen": "127.0.0.1:0",
                    "upstream": f"127.0.0.1:{hbone_port}",
                    "server_identity": [f"{TD}/orders"],
                    "tunnel": {"protocol": "hbone", "target_port": port},
                }
                for name, port in targets.items()
            ],
            "admin": {"listen": "127.0.0.1:0"},
            "workers": workers,
        },
    )


@dataclass
class Mesh:
    inbound: SidecarProcess
    outbound: SidecarProcess
    backend: Backend

    @property
    def app_port(self) -> int:
        return self.outbound.port("orders")


def start_tunnelled(
    folder: Path, ca: CertFactory, sidecars: list[SidecarProcess], port: int
) -> tuple[SidecarProcess, SidecarProcess]:
    """An hbone sidecar letting anyone verified reach ``port``, and an outbound one tunnelling
    ``orders`` to it; both are stopped after the test."""
    inbound = start_sidecar(inbound_config(folder, ca, {port: ["*"]}))
    sidecars.append(inbound)
    outbound = start_sidecar(outbound_config(folder, ca, inbound.port("hbone"), {"orders": port}))
    sidecars.append(outbound)
    return inbound, outbound


@pytest.fixture
def mesh(tmp_path: Path, ca: CertFactory, backend: Backend, sidecars: list[SidecarProcess]) -> Mesh:
    inbound = start_sidecar(inbound_config(tmp_path, ca, {backend.port: [f"{TD}/frontend"]}))
    sidecars.append(inbound)
    outbound = start_sidecar(outbound_config(tmp_path, ca, inbound.port("hbone"), {"orders": backend.port}))
    sidecars.append(outbound)
    return Mesh(inbound, outbound, backend)


def exchange(port: int, payload: bytes) -> bytes:
    """Send ``payload`` through, half-close, and read the echo to its end."""
    with plain_connect(port) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        return read_to_end(s)


def read_to_end(s: socket.socket) -> bytes:
    chunks = []
    while data := s.recv(1 << 20):
        chunks.append(data)
    return b"".join(chunks)


def value(sc: SidecarProcess, name: str, **labels: str) -> float:
    return scrape(sc).value(name, **labels)


def outcomes(sc: SidecarProcess, listener: str, direction: str) -> dict[str, float]:
    series = scrape(sc).series("sidecar_connections_total", listener=listener, direction=direction)
    return {dict(k)["outcome"]: v for k, v in series.items() if v}


# -- many streams, one connection -----------------------------------------------------------------------


def test_many_concurrent_streams_are_byte_exact_over_one_tls_connection(mesh: Mesh) -> None:
    payloads = [os.urandom(200_000 + 7919 * i) for i in range(24)]
    with ThreadPoolExecutor(len(payloads)) as pool:
        echoes = list(pool.map(lambda p: exchange(mesh.app_port, p), payloads))
    assert echoes == payloads
    wait_for(lambda: len(mesh.inbound.access("hbone")) == len(payloads))
    # one handshake carried every stream: counted on both ends, once
    assert value(mesh.inbound, "sidecar_handshake_seconds_count", listener="hbone") == 1
    assert value(mesh.outbound, "sidecar_handshake_seconds_count", listener="orders") == 1
    assert value(mesh.outbound, "sidecar_hbone_pool_connections", listener="orders") == 1
    assert outcomes(mesh.inbound, "hbone", "inbound") == {"ok": len(payloads)}
    sent = sum(len(p) for p in payloads)
    assert value(mesh.inbound, "sidecar_bytes_total", listener="hbone", flow="to_upstream") == sent
    assert value(mesh.inbound, "sidecar_bytes_total", listener="hbone", flow="to_downstream") == sent
    records = mesh.inbound.access("hbone")
    assert {r["peer_identity"] for r in records} == {f"{TD}/frontend"}
    assert sorted(r["bytes_to_upstream"] for r in records) == sorted(len(p) for p in payloads)
    assert {r["direction"] for r in records} == {"inbound"}
    assert mesh.backend.accepts == len(payloads)


def test_with_two_workers_each_side_every_worker_pools_its_own_tunnel(
    tmp_path: Path, ca: CertFactory, backend: Backend, sidecars: list[SidecarProcess]
) -> None:
    inbound = start_sidecar(inbound_config(tmp_path, ca, {backend.port: ["*"]}, workers=2))
    sidecars.append(inbound)
    outbound = start_sidecar(outbound_config(tmp_path, ca, inbound.port("hbone"), {"orders": backend.port}, workers=2))
    sidecars.append(outbound)
    payloads = [os.urandom(50_000 + i) for i in range(16)]
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(lambda p: exchange(outbound.port("orders"), p), payloads)) == payloads
    wait_for(lambda: len(inbound.access("hbone")) == len(payloads))
    tunnels = value(outbound, "sidecar_hbone_pool_connections", listener="orders")
    assert 1 <= tunnels <= 2  # summed over the live workers: at most one each
    assert value(inbound, "sidecar_handshake_seconds_count", listener="hbone") == tunnels
    assert outcomes(inbound, "hbone", "inbound") == {"ok": len(payloads)}


def test_each_stream_half_closes_on_its_own(mesh: Mesh) -> None:
    """The app finishes sending on one stream; the backend's answer still flows back on it, while
    a neighbour stream on the same tunnel is still open both ways."""
    with plain_connect(mesh.app_port) as neighbour, plain_connect(mesh.app_port) as s:
        neighbour.sendall(b"still here")
        assert recv_exactly(neighbour, 10) == b"still here"
        s.sendall(b"question")
        s.shutdown(socket.SHUT_WR)  # END_STREAM toward the backend: it sees its EOF and closes
        assert read_to_end(s) == b"question"
        neighbour.sendall(b" and here")
        assert recv_exactly(neighbour, 9) == b" and here"
    assert value(mesh.inbound, "sidecar_handshake_seconds_count", listener="hbone") == 1


# -- resets --------------------------------------------------------------------------------------------


def _rst_close(s: socket.socket) -> None:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def test_an_app_reset_reaches_the_backend_as_a_reset(tmp_path: Path, ca: CertFactory, sidecars: list[Any]) -> None:
    seen: list[str] = []
    got_data = threading.Event()

    def handler(conn: socket.socket) -> None:
        conn.recv(100)
        got_data.set()
        try:
            while conn.recv(100):
                pass
            seen.append("eof")
        except ConnectionResetError:
            seen.append("reset")

    backend = Backend(handler)
    try:
        _, outbound = start_tunnelled(tmp_path, ca, sidecars, backend.port)
        s = plain_connect(outbound.port("orders"))
        s.sendall(b"x")
        assert got_data.wait(LIMIT)
        _rst_close(s)  # TCP RST -> RST_STREAM -> TCP RST
        wait_for(lambda: seen)
        assert seen == ["reset"]
    finally:
        backend.close()


def test_a_backend_reset_reaches_the_app_as_a_reset(tmp_path: Path, ca: CertFactory, sidecars: list[Any]) -> None:
    def handler(conn: socket.socket) -> None:
        conn.recv(100)
        _rst_close(conn)

    backend = Backend(handler)
    try:
        _, outbound = start_tunnelled(tmp_path, ca, sidecars, backend.port)
        with plain_connect(outbound.port("orders")) as s:
            s.sendall(b"x")
            with pytest.raises(ConnectionResetError):
                while s.recv(100):
                    pass
    finally:
        backend.close()


# -- refusals: nothing is dialled -----------------------------------------------------------------------


def test_a_peer_not_allowed_never_gets_a_stream_dialled(
    tmp_path: Path, ca: CertFactory, backend: Backend, sidecars: list[Any]
) -> None:
    inbound = start_sidecar(inbound_config(tmp_path, ca, {backend.port: [f"{TD}/frontend"]}))
    sidecars.append(inbound)
    stranger = start_sidecar(
        outbound_config(tmp_path, ca, inbound.port("hbone"), {"orders": backend.port}, identity="stranger")
    )
    sidecars.append(stranger)
    for _ in range(3):
        with plain_connect(stranger.port("orders")) as s:
            s.sendall(b"must never reach the app")
            assert read_to_end(s) == b""  # the app connection is closed: the peer answered 403
    (denied, *_) = inbound.wait_access(3, "hbone")
    assert denied["outcome"] == "denied" and denied["peer_identity"] == f"{TD}/stranger"
    assert f"not in hbone.ports[port {backend.port}].allow" in denied["reason"]
    out = stranger.wait_access(3, "orders")
    assert {r["outcome"] for r in out} == {"upstream_error"} and "403" in out[0]["reason"]
    assert backend.accepts == 0
    assert outcomes(inbound, "hbone", "inbound") == {"denied": 3}
    assert value(inbound, "sidecar_handshake_seconds_count", listener="hbone") == 1  # the tunnel stood


def _frontend(ca: CertFactory, folder: Path) -> ssl.SSLContext:
    return client_context(ca.leaf("frontend", folder=folder / "raw"), ca.ca_file)


def test_a_refused_stream_leaves_its_neighbours_running(mesh: Mesh, ca: CertFactory, tmp_path: Path) -> None:
    """One TLS connection, a raw HTTP/2 client: streams to the allowed port keep flowing while a
    stream to a port that is not listed gets 403, and a port nobody listens on gets 503."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: its port is free of any app
    client = H2Client(mesh.inbound.port("hbone"), _frontend(ca, tmp_path))
    try:
        good = [client.connect(f"10.9.9.9:{mesh.backend.port}") for _ in range(3)]
        client.pump(lambda: all(client.status.get(s) == 200 for s in good))
        for sid in good:
            client.send(sid, b"first %d;" % sid)
        refused = client.connect(f"10.9.9.9:{closed.getsockname()[1]}")
        client.send(refused, b"must never reach an app")
        client.pump(lambda: refused in client.status)
        assert client.status[refused] == 403
        for sid in good:
            client.send(sid, b"second", end_stream=True)
        client.pump(lambda: all(s in client.ended for s in good))
        assert [bytes(client.data[s]) for s in good] == [b"first %d;second" % s for s in good]
        assert refused not in client.data
    finally:
        client.close()
        closed.close()
    assert mesh.backend.accepts == 3
    records = mesh.inbound.wait_access(4, "hbone")
    assert sorted(r["outcome"] for r in records) == ["denied", "ok", "ok", "ok"]


def test_a_failed_dial_answers_503(tmp_path: Path, ca: CertFactory, sidecars: list[Any]) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    inbound = start_sidecar(inbound_config(tmp_path, ca, {port: ["*"]}))
    sidecars.append(inbound)
    client = H2Client(inbound.port("hbone"), _frontend(ca, tmp_path))
    try:
        sid = client.connect(f"127.0.0.1:{port}")
        client.pump(lambda: sid in client.status)
        assert client.status[sid] == 503
    finally:
        client.close()
        closed.close()
    (record,) = inbound.wait_access(1, "hbone")
    assert record["outcome"] == "upstream_error" and "refused" in record["reason"].lower()


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ([(":method", "GET"), (":scheme", "https"), (":authority", "x:80"), (":path", "/")], 405),
        ([(":method", "CONNECT"), (":authority", "no-port")], 400),
        ([(":method", "CONNECT"), (":authority", "10.0.0.1:0")], 400),
    ],
)
def test_what_is_not_a_connect_to_host_port_is_refused_and_counted(
    mesh: Mesh, ca: CertFactory, tmp_path: Path, headers: list[tuple[str, str]], status: int
) -> None:
    client = H2Client(mesh.inbound.port("hbone"), _frontend(ca, tmp_path))
    try:
        sid = client.request(headers, end_stream=True)
        client.pump(lambda: sid in client.status)
        assert client.status[sid] == status
    finally:
        client.close()
    (record,) = mesh.inbound.wait_access(1, "hbone")
    assert record["outcome"] == "denied" and record["reason"].startswith(str(status))
    assert mesh.backend.accepts == 0


@pytest.mark.parametrize("alpn", [(), ("http/1.1",)])
def test_a_client_that_does_not_offer_h2_fails_the_handshake(
    mesh: Mesh, ca: CertFactory, tmp_path: Path, alpn: tuple[str, ...]
) -> None:
    ctx = _frontend(ca, tmp_path)
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    from support import tls_connect

    with tls_connect(mesh.inbound.port("hbone"), ctx) as s:
        assert s.selected_alpn_protocol() is None
        with contextlib.suppress(ConnectionResetError, ssl.SSLError):
            assert s.recv(100) == b""  # closed without a byte of HTTP/2
    wait_for(lambda: value(mesh.inbound, "sidecar_handshake_failures_total", listener="hbone", reason="protocol"))
    assert value(mesh.inbound, "sidecar_handshake_failures_total", listener="hbone", reason="protocol") == 1
    assert mesh.inbound.access("hbone") == []  # a tunnel writes no access record
    lines = [r for r in mesh.inbound.logs() if r.get("msg") == "tunnel handshake failed"]
    assert lines and lines[0]["reason"] == "protocol"


# -- flow control: a stalled stream stalls nobody else ---------------------------------------------------


def test_a_slow_reader_on_one_stream_does_not_stall_the_others(
    tmp_path: Path, ca: CertFactory, sidecars: list[Any]
) -> None:
    """The first app connection's backend never reads; a second connection on the same tunnel
    moves its bytes both ways all the same."""
    stalled = threading.Event()
    first = threading.Lock()

    def first_never_reads(conn: socket.socket) -> None:
        if first.acquire(blocking=False):
            stalled.wait(30)
            return
        echo_handler(conn)

    backend = Backend(first_never_reads)
    try:
        inbound, outbound = start_tunnelled(tmp_path, ca, sidecars, backend.port)
        slow = plain_connect(outbound.port("orders"))
        slow.setblocking(False)
        chunk = os.urandom(1 << 20)
        pushed, blocked_since = 0, None
        deadline = time.monotonic() + LIMIT
        while time.monotonic() < deadline:  # until the whole path toward the stalled backend is full
            try:
                pushed += slow.send(chunk)
                blocked_since = None
            except BlockingIOError:
                blocked_since = blocked_since or time.monotonic()
                if time.monotonic() - blocked_since > 0.5:
                    break
                time.sleep(0.02)
        assert blocked_since is not None, "nothing ever stopped the writer"
        payload = os.urandom(3 << 20)
        assert exchange(outbound.port("orders"), payload) == payload  # same tunnel, not stalled
        assert value(inbound, "sidecar_handshake_seconds_count", listener="hbone") == 1
        slow.close()
    finally:
        stalled.set()
        backend.close()


# -- the pool: restarts, reloads, drains ---------------------------------------------------------------


def test_a_dial_given_up_leaves_nothing_behind(tmp_path: Path, ca: CertFactory, sidecars: list[SidecarProcess]) -> None:
    """The upstream accepts TCP and never speaks TLS. The app connection waiting for that dial
    gives up at connect_timeout, and with it the half-made tunnel goes at once: no handshake left
    to time out later, nothing counted as the peer's handshake failure, no stray error."""
    mute = socket.create_server(("127.0.0.1", 0))
    try:
        cfg = outbound_config(tmp_path, ca, mute.getsockname()[1], {"orders": 8080})
        data = yaml.safe_load(cfg.read_text())
        data["limits"] = {"connect_timeout": "500ms", "handshake_timeout": "3s"}
        outbound = start_sidecar(write_config(cfg, data))
        sidecars.append(outbound)
        with plain_connect(outbound.port("orders")) as app:
            upstream, _ = mute.accept()  # the pool's dial reached the upstream, which stays mute
            with upstream:
                upstream.settimeout(2.0)  # well before handshake_timeout
                assert upstream.recv(1 << 16)  # the ClientHello
                assert upstream.recv(1 << 16) == b""  # then the dial is dropped
                assert read_to_end(app) == b""
        (record,) = outbound.wait_access(1, "orders")
        assert record["outcome"] == "upstream_error" and "timed out" in record["reason"]
        time.sleep(2.0)  # past handshake_timeout: a dial left behind would have timed out by now
        failures = scrape(outbound).series("sidecar_handshake_failures_total", listener="orders")
        assert sum(failures.values()) == 0
        assert not any(r.get("level") == "error" or "raw" in r for r in outbound.logs())
        assert value(outbound, "sidecar_hbone_pool_connections", listener="orders") == 0
    finally:
        mute.close()


def test_the_pool_dials_again_after_the_peer_restarts(
    tmp_path: Path, ca: CertFactory, backend: Backend, sidecars: list[Any]
) -> None:
    inbound = start_sidecar(inbound_config(tmp_path, ca, {backend.port: ["*"]}))
    sidecars.append(inbound)
    hbone_port = inbound.port("hbone")
    outbound = start_sidecar(outbound_config(tmp_path, ca, hbone_port, {"orders": backend.port}))
    sidecars.append(outbound)
    assert exchange(outbound.port("orders"), b"before") == b"before"
    assert inbound.stop() == 0
    again = start_sidecar(inbound_config(tmp_path, ca, {backend.port: ["*"]}, listen=f"127.0.0.1:{hbone_port}"))
    sidecars.append(again)
    wait_for(lambda: _echoes(outbound.port("orders"), b"after"), timeout=LIMIT)
    assert value(again, "sidecar_handshake_seconds_count", listener="hbone") == 1
    assert value(outbound, "sidecar_hbone_pool_connections", listener="orders") == 1


def _echoes(port: int, payload: bytes) -> bool:
    try:
        return exchange(port, payload) == payload
    except OSError:
        return False


@contextlib.contextmanager
def live_stream(port: int) -> Iterator[socket.socket]:
    """An app connection echoing through the tunnel before the body runs, and still after it, to
    its graceful end (our FIN, then the backend's, back through END_STREAM each way)."""
    live = plain_connect(port)
    try:
        live.sendall(b"one")
        assert recv_exactly(live, 3) == b"one"
        yield live
        live.sendall(b"two")  # the stream opened before still flows
        assert recv_exactly(live, 3) == b"two"
        live.shutdown(socket.SHUT_WR)
        assert read_to_end(live) == b""
    finally:
        live.close()


def logged(sc: SidecarProcess, msg: str) -> None:
    wait_for(lambda: any(r.get("msg") == msg for r in sc.logs()))


def test_a_reload_retires_the_pooled_tunnel_without_breaking_a_live_stream(mesh: Mesh) -> None:
    with live_stream(mesh.app_port):
        mesh.outbound.signal(signal.SIGHUP)  # new material: the pooled tunnel takes no new streams
        logged(mesh.outbound, "certificates reloaded")
        assert exchange(mesh.app_port, b"new stream") == b"new stream"  # on a new tunnel
        assert value(mesh.inbound, "sidecar_handshake_seconds_count", listener="hbone") == 2
        assert value(mesh.outbound, "sidecar_hbone_pool_connections", listener="orders") == 2
    # its last stream gone, the retired tunnel closes
    wait_for(lambda: value(mesh.outbound, "sidecar_hbone_pool_connections", listener="orders") == 1)


def test_a_reload_on_the_hbone_side_sends_goaway_and_the_pool_moves_on(mesh: Mesh) -> None:
    with live_stream(mesh.app_port):
        mesh.inbound.signal(signal.SIGHUP)  # GOAWAY on the tunnel accepted under the old material
        logged(mesh.inbound, "certificates reloaded")
        wait_for(lambda: _echoes(mesh.app_port, b"new"))  # the client saw the GOAWAY: a new tunnel
        assert value(mesh.inbound, "sidecar_handshake_seconds_count", listener="hbone") == 2
    wait_for(lambda: value(mesh.outbound, "sidecar_hbone_pool_connections", listener="orders") == 1)


def test_a_drain_lets_open_streams_finish(mesh: Mesh) -> None:
    with live_stream(mesh.app_port):
        mesh.inbound.signal(signal.SIGTERM)  # GOAWAY on the tunnel: the open stream finishes
        logged(mesh.inbound, "draining")
    assert mesh.inbound.proc.wait(LIMIT) == 0
    (record,) = mesh.inbound.access("hbone")
    assert record["outcome"] == "ok" and record["bytes_to_upstream"] == 6
    assert not any(r.get("msg") == "stopped" and r.get("cut_connections") for r in mesh.inbound.logs())


def test_readyz_counts_the_hbone_listener(mesh: Mesh) -> None:
    from support import admin_request

    answer = admin_request(mesh.inbound, "GET", "/readyz")
    assert answer.status == 200, answer.text
