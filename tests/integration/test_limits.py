"""Limits: flow control keeps memory bounded, a dead upstream is a clean upstream_error,
``max_connections`` refuses at once, ``idle_timeout`` closes idle connections only.

Flow control runs through an outbound+inbound pair with plain sockets at both ends, so both
directions cross both sidecars and both kinds of leg (plain and TLS) on each.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import select
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from support import (
    Backend,
    BlackHole,
    CertFactory,
    CertFiles,
    SidecarProcess,
    client_context,
    echo_handler,
    kill,
    plain_connect,
    running_pair,
    start_sidecar,
    tls_client,
    tls_connect,
    tls_exchange,
    tls_section,
    unlistened_socket,
    wait_for,
    write_config,
)

ATTEMPT = 256 << 20  # what a fast sender tries to push
STALL = 1.0  # seconds without progress that count as "the sender is blocked"
RSS_GROWTH_KIB = 32 << 10  # allowed growth of a sidecar's RSS while the sender pushes
BLOCK = os.urandom(1 << 20)


@dataclass
class Pushed:
    """What a fast non-blocking sender managed to send before it was held back."""

    sent: int = 0
    sha: hashlib._Hash = field(default_factory=hashlib.sha256)
    blocked: bool = False  # it stopped because the other side stopped taking bytes


def push_until_blocked(sock: socket.socket, limit: int = ATTEMPT, stall: float = STALL) -> Pushed:
    """Send BLOCK again and again without blocking until ``limit`` or no progress for ``stall``."""
    out = Pushed()
    sock.setblocking(False)
    last = time.monotonic()
    try:
        while out.sent < limit:
            _, writable, _ = select.select([], [sock], [], 0.1)
            offset = out.sent % len(BLOCK)
            if writable:
                try:
                    n = sock.send(BLOCK[offset:])
                except BlockingIOError:
                    n = 0
                if n:
                    out.sha.update(BLOCK[offset : offset + n])
                    out.sent += n
                    last = time.monotonic()
            if time.monotonic() - last > stall:
                out.blocked = True
                break
    finally:
        sock.setblocking(True)
    return out


def read_all(sock: socket.socket) -> tuple[int, str]:
    h = hashlib.sha256()
    n = 0
    while data := sock.recv(262144):
        h.update(data)
        n += len(data)
    return n, h.hexdigest()


class FlowBackends:
    def __init__(self) -> None:
        self.release = threading.Event()  # the slow reader starts reading
        self.stall_result: tuple[int, str] | None = None
        self.flood_pushed: Pushed | None = None
        self.flood_blocked = threading.Event()
        self.stall = Backend(self._stall)
        self.flood = Backend(self._flood)
        self.down_sock = unlistened_socket()  # refuses, until a test listens on it
        self.dead_sock = unlistened_socket()  # refuses for good
        self.blackhole = BlackHole()  # connecting there hangs until connect_timeout

    def _stall(self, conn: socket.socket) -> None:
        self.release.wait(60)
        self.stall_result = read_all(conn)

    def _flood(self, conn: socket.socket) -> None:
        self.flood_pushed = push_until_blocked(conn)
        self.flood_blocked.set()
        conn.shutdown(socket.SHUT_WR)  # FIN after what is queued
        with contextlib.suppress(OSError):
            conn.recv(1)  # wait until the client is done

    def close(self) -> None:
        self.release.set()
        self.stall.close()
        self.flood.close()
        self.down_sock.close()
        self.dead_sock.close()
        self.blackhole.close()


@pytest.fixture(scope="module")
def flow() -> Iterator[FlowBackends]:
    b = FlowBackends()
    yield b
    b.close()


@pytest.fixture(scope="module")
def pair(
    tmp_path_factory: pytest.TempPathFactory, ca: CertFactory, flow: FlowBackends
) -> Iterator[tuple[SidecarProcess, SidecarProcess]]:
    forwards = {
        "stall": flow.stall.address,
        "flood": flow.flood.address,
        "down": f"127.0.0.1:{flow.down_sock.getsockname()[1]}",
        "dead": f"127.0.0.1:{flow.dead_sock.getsockname()[1]}",
        "blackhole": flow.blackhole.address,
    }
    limits = {"handshake_timeout": "2s", "connect_timeout": "500ms"}
    with running_pair(tmp_path_factory.mktemp("flow"), ca, forwards, limits=limits) as pair:
        yield pair


# -- flow control --------------------------------------------------------------------------------


def test_slow_upstream_reader_slows_the_app_and_memory_stays_bounded(
    pair: tuple[SidecarProcess, SidecarProcess], flow: FlowBackends
) -> None:
    inbound, outbound = pair
    rss_before = [sc.rss_kib() for sc in pair]
    accepts = flow.stall.accepts
    with plain_connect(outbound.port("stall"), timeout=30) as s:
        # start pushing once both hops stream (the backend was dialed); pushing during the
        # handshake is test_app_bytes_are_not_hoarded_while_the_upstream_handshake_stalls
        wait_for(lambda: flow.stall.accepts > accepts)
        pushed = push_until_blocked(s)
        rss_during = [sc.rss_kib() for sc in pair]
        assert pushed.blocked, f"the app pushed {pushed.sent >> 20} MiB without being held back"
        assert pushed.sent < ATTEMPT // 2  # what kernel buffers hold, not what a sidecar hoards
        for before, during in zip(rss_before, rss_during, strict=True):
            assert during - before < RSS_GROWTH_KIB, (rss_before, rss_during)
        flow.release.set()  # the reader wakes up: everything held back arrives, in order
        s.shutdown(socket.SHUT_WR)
        assert s.recv(10) == b""
    wait_for(lambda: flow.stall_result is not None, timeout=30)
    assert flow.stall_result == (pushed.sent, pushed.sha.hexdigest())
    for sc in (outbound, inbound):
        assert sc.wait_access(1, "stall")[-1]["outcome"] == "ok"


def test_slow_app_reader_slows_the_upstream_and_memory_stays_bounded(
    pair: tuple[SidecarProcess, SidecarProcess], flow: FlowBackends
) -> None:
    _inbound, outbound = pair
    rss_before = [sc.rss_kib() for sc in pair]
    with plain_connect(outbound.port("flood"), timeout=30) as s:
        # the app reads nothing while the backend pushes as fast as it can
        assert flow.flood_blocked.wait(60)
        rss_during = [sc.rss_kib() for sc in pair]
        pushed = flow.flood_pushed
        assert pushed is not None
        assert pushed.blocked, f"the backend pushed {pushed.sent >> 20} MiB without being held back"
        assert pushed.sent < ATTEMPT // 2
        for before, during in zip(rss_before, rss_during, strict=True):
            assert during - before < RSS_GROWTH_KIB, (rss_before, rss_during)
        assert read_all(s) == (pushed.sent, pushed.sha.hexdigest())


def test_app_bytes_are_not_hoarded_while_the_upstream_handshake_stalls(limited: SidecarProcess) -> None:
    # The app writes at once (as HTTP clients do) while the upstream has not answered the handshake:
    # at most one read may be held (legs.py), the rest must stay in the app's socket.
    rss_before = limited.rss_kib()
    with plain_connect(limited.port("silent"), timeout=30) as s:
        pushed = push_until_blocked(s)
        rss_during = limited.rss_kib()
    assert pushed.blocked, f"the app pushed {pushed.sent >> 20} MiB to a sidecar that had no upstream yet"
    assert pushed.sent < ATTEMPT // 2
    assert rss_during - rss_before < RSS_GROWTH_KIB, (rss_before, rss_during)


# -- upstream down -------------------------------------------------------------------------------


def test_forward_to_closed_port_is_upstream_error_and_sidecar_keeps_serving(
    pair: tuple[SidecarProcess, SidecarProcess], flow: FlowBackends, ca: CertFactory
) -> None:
    inbound, _ = pair
    frontend = ca.leaf("frontend")
    conn = tls_client(inbound.port("down"), frontend, ca.ca_file)
    try:
        # (the client sends nothing: bytes racing a close already made would draw a TCP reset;
        # test_upstream_timeout_closes_client_cleanly_after_it_wrote covers a client that wrote)
        try:
            assert conn.recv() == b""
        except ConnectionResetError:
            pytest.fail("the client's connection was reset instead of closed")
    finally:
        conn.close()
    rec = inbound.wait_access(1, "down")[-1]
    assert rec["outcome"] == "upstream_error"
    assert rec["peer_identity"] == "spiffe://mesh.local/frontend"
    # the app comes up on that port: the same listener now gets through
    flow.down_sock.listen(8)
    threading.Thread(target=_echo_once, args=(flow.down_sock,), daemon=True).start()
    assert tls_exchange(inbound.port("down"), client_context(frontend, ca.ca_file), b"now?") == b"now?"
    assert inbound.wait_access(2, "down")[-1]["outcome"] == "ok"


def test_upstream_error_closes_client_tls_with_close_notify(
    pair: tuple[SidecarProcess, SidecarProcess], ca: CertFactory
) -> None:
    inbound, _ = pair
    conn = tls_client(inbound.port("dead"), ca.leaf("frontend"), ca.ca_file)
    try:
        assert conn.recv() == b""
        assert conn.clean_eof is True  # a TLS close_notify, not just a TCP FIN
    finally:
        conn.close()
    assert inbound.wait_access(1, "dead")[-1]["outcome"] == "upstream_error"


def test_upstream_timeout_closes_client_cleanly_after_it_wrote(
    pair: tuple[SidecarProcess, SidecarProcess], ca: CertFactory
) -> None:
    # The dial hangs until connect_timeout, so the client's request (headers, then body) is surely
    # in before the sidecar gives up; the close_notify comes first in the stream either way.
    inbound, _ = pair
    conn = tls_client(inbound.port("blackhole"), ca.leaf("frontend"), ca.ca_file)
    try:
        conn.sendall(b"POST / HTTP/1.1\r\nHost: orders\r\nContent-Length: 4\r\n\r\n")
        time.sleep(0.1)
        conn.sendall(b"body")
        try:
            assert conn.recv() == b""
        except ConnectionResetError:
            pytest.fail("the client's connection was reset instead of closed")
        assert conn.clean_eof is True
    finally:
        conn.close()
    rec = inbound.wait_access(1, "blackhole")[-1]
    assert rec["outcome"] == "upstream_error" and "timed out" in rec["reason"]


def _echo_once(sock: socket.socket) -> None:
    conn, _ = sock.accept()
    with conn:
        echo_handler(conn)


# -- max_connections -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def echo_backend() -> Iterator[Backend]:
    b = Backend()
    yield b
    b.close()


@pytest.fixture(scope="module")
def silent_upstream() -> Iterator[socket.socket]:
    """Listens (the kernel completes TCP handshakes) but never accepts: a TLS handshake that stalls."""
    s = socket.create_server(("127.0.0.1", 0), backlog=16)
    yield s
    s.close()


@pytest.fixture(scope="module")
def limited(
    tmp_path_factory: pytest.TempPathFactory,
    ca: CertFactory,
    server_leaf: CertFiles,
    echo_backend: Backend,
    silent_upstream: socket.socket,
) -> Iterator[SidecarProcess]:
    cfg = write_config(
        tmp_path_factory.mktemp("limited") / "limited.yaml",
        {
            "tls": tls_section(server_leaf, ca.ca_file),
            "inbound": [{"name": "limited", "listen": "127.0.0.1:0", "forward": echo_backend.address, "allow": ["*"]}],
            "outbound": [
                {
                    "name": "silent",
                    "listen": "127.0.0.1:0",
                    "upstream": f"127.0.0.1:{silent_upstream.getsockname()[1]}",
                    "server_identity": ["*"],
                }
            ],
            "limits": {"max_connections": 2, "handshake_timeout": "5s", "drain_timeout": "1s"},
        },
    )
    sc = start_sidecar(cfg)
    yield sc
    try:
        assert sc.stop() == 0
    finally:
        kill(sc)


def test_connection_beyond_max_connections_is_closed_at_once_and_logged(
    limited: SidecarProcess, ca: CertFactory, client_leaf: CertFiles, echo_backend: Backend
) -> None:
    port = limited.port("limited")
    ctx = client_context(client_leaf, ca.ca_file)
    first, second = tls_connect(port, ctx), tls_connect(port, ctx)
    try:
        for s in (first, second):
            s.sendall(b"hold")
            assert s.recv(10) == b"hold"
        started = time.monotonic()
        with pytest.raises((ssl.SSLError, OSError)), tls_connect(port, ctx) as third:
            third.sendall(b"over the limit")
            if third.recv(100) == b"":
                raise ConnectionResetError("closed")
        assert time.monotonic() - started < 2.5  # at once, not after handshake_timeout (5s)
        [rec] = limited.wait_access(1, "limited")
        assert rec["outcome"] == "limit"
        assert echo_backend.accepts == 2
        for s in (first, second):  # the two in the limit are untouched
            s.sendall(b"still")
            assert s.recv(10) == b"still"
    finally:
        first.close()
        second.close()
    records = limited.wait_access(3, "limited")
    assert sorted(r["outcome"] for r in records) == ["limit", "ok", "ok"]
    # room again: a new connection works
    assert tls_exchange(port, ctx, b"room again") == b"room again"
    assert echo_backend.accepts == 3


# -- idle_timeout --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def idle_sidecar(
    tmp_path_factory: pytest.TempPathFactory, ca: CertFactory, server_leaf: CertFiles, echo_backend: Backend
) -> Iterator[SidecarProcess]:
    cfg = write_config(
        tmp_path_factory.mktemp("idle") / "idle.yaml",
        {
            "tls": tls_section(server_leaf, ca.ca_file),
            "inbound": [{"name": "idle", "listen": "127.0.0.1:0", "forward": echo_backend.address, "allow": ["*"]}],
            "limits": {"idle_timeout": "1s"},
        },
    )
    sc = start_sidecar(cfg)
    yield sc
    try:
        assert sc.stop() == 0
    finally:
        kill(sc)


def test_idle_connection_is_closed_and_active_one_is_not(
    idle_sidecar: SidecarProcess, ca: CertFactory, client_leaf: CertFiles
) -> None:
    port = idle_sidecar.port("idle")
    ctx = client_context(client_leaf, ca.ca_file)
    with tls_connect(port, ctx) as idle, tls_connect(port, ctx) as active:
        for s in (idle, active):
            s.sendall(b"hi")
            assert s.recv(10) == b"hi"
        idle.settimeout(0.2)
        started = time.monotonic()
        closed_after = None
        while time.monotonic() - started < 6:
            active.sendall(b".")  # the active one talks every 0.2 s
            assert active.recv(10) == b"."
            try:
                if idle.recv(10) == b"":
                    closed_after = time.monotonic() - started
                    break
            except TimeoutError:
                continue
            except (ssl.SSLError, ConnectionResetError):
                closed_after = time.monotonic() - started
                break
        assert closed_after is not None, "the idle connection was not closed within 6 s"
        assert closed_after >= 0.8  # not before idle_timeout
        for _ in range(3):  # the active one outlived it and still works
            active.sendall(b"alive")
            assert active.recv(10) == b"alive"
    records = idle_sidecar.wait_access(2, "idle")
    by_outcome = {r["outcome"]: r for r in records}
    assert by_outcome["timeout"]["reason"] == "idle_timeout"
    assert by_outcome["timeout"]["bytes_to_upstream"] == 2
    assert by_outcome["ok"]["bytes_to_upstream"] > 2
