"""Lifecycle: SIGTERM/SIGINT stop accepting at once, let open connections finish within
``drain_timeout``, cut the rest, and exit 0.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import ssl
import time
from pathlib import Path

import pytest
from support import (
    Backend,
    CertFactory,
    CertFiles,
    SidecarProcess,
    client_context,
    plain_connect,
    start_sidecar,
    tls_connect,
    tls_section,
    wait_for,
    write_config,
)

CHUNK = bytes(range(256)) * 256  # 64 KiB
CHUNKS = 10
CHUNK_GAP = 0.1  # the backend streams for about CHUNKS * CHUNK_GAP seconds


def slow_stream_handler(conn: socket.socket) -> None:
    """After a request line, stream CHUNKS chunks slowly, then close."""
    if not conn.recv(100):
        return
    for _ in range(CHUNKS):
        conn.sendall(CHUNK)
        time.sleep(CHUNK_GAP)


def start(tmp_path: Path, ca: CertFactory, leaf: CertFiles, backend: Backend, drain_timeout: str) -> SidecarProcess:
    cfg = write_config(
        tmp_path / "lifecycle.yaml",
        {
            "tls": tls_section(leaf, ca.ca_file),
            "inbound": [{"name": "app", "listen": "127.0.0.1:0", "forward": backend.address, "allow": ["*"]}],
            "limits": {"drain_timeout": drain_timeout},
        },
    )
    return start_sidecar(cfg)


def logged(sc: SidecarProcess, msg: str) -> dict[str, object] | None:
    return next((r for r in sc.logs() if r.get("msg") == msg), None)


def connect_refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_drains_transfer_in_flight_refuses_new_and_exits_0(
    sig: signal.Signals,
    tmp_path: Path,
    ca: CertFactory,
    server_leaf: CertFiles,
    client_leaf: CertFiles,
    sidecars: list[SidecarProcess],
) -> None:
    backend = Backend(slow_stream_handler)
    try:
        sc = start(tmp_path, ca, server_leaf, backend, drain_timeout="10s")
        sidecars.append(sc)
        port = sc.port("app")
        with tls_connect(port, client_context(client_leaf, ca.ca_file), timeout=10) as s:
            s.sendall(b"go\n")
            received = bytearray(s.recv(65536))
            assert received  # the transfer is under way
            signalled = time.monotonic()
            sc.signal(sig)
            wait_for(lambda: logged(sc, "draining"), timeout=5)
            assert connect_refused(port)  # stopped accepting at once...
            assert time.monotonic() - signalled < 2
            while data := s.recv(65536):  # ...while the open transfer runs to its end
                received += data
        assert bytes(received) == CHUNK * CHUNKS
        assert sc.proc.wait(10) == 0
        stopped = logged(sc, "stopped")
        assert stopped is not None and stopped["cut_connections"] == 0
        [rec] = sc.access("app")
        assert rec["outcome"] == "ok"
        assert rec["bytes_to_downstream"] == len(CHUNK) * CHUNKS
    finally:
        backend.close()


def test_drain_timeout_cuts_a_connection_that_never_ends(
    tmp_path: Path,
    ca: CertFactory,
    server_leaf: CertFiles,
    client_leaf: CertFiles,
    backend: Backend,
    sidecars: list[SidecarProcess],
) -> None:
    sc = start(tmp_path, ca, server_leaf, backend, drain_timeout="1s")
    sidecars.append(sc)
    with tls_connect(sc.port("app"), client_context(client_leaf, ca.ca_file), timeout=10) as s:
        s.sendall(b"hello")
        assert s.recv(100) == b"hello"  # established, and then it just stays open
        signalled = time.monotonic()
        sc.signal(signal.SIGTERM)
        assert sc.proc.wait(10) == 0
        elapsed = time.monotonic() - signalled
        cut = b"unset"
        with contextlib.suppress(ssl.SSLError, ConnectionResetError):
            cut = s.recv(100)
        assert cut in (b"", b"unset")  # the connection is gone (EOF or reset)
    assert 0.9 <= elapsed < 8, elapsed  # it waited for drain_timeout, and not much longer
    stopped = logged(sc, "stopped")
    assert stopped is not None and stopped["cut_connections"] == 1
    [rec] = sc.access("app")
    assert rec["reason"] == "drain_timeout"


def test_idle_sidecar_exits_0_promptly_on_sigterm(
    tmp_path: Path,
    ca: CertFactory,
    server_leaf: CertFiles,
    backend: Backend,
    sidecars: list[SidecarProcess],
) -> None:
    sc = start(tmp_path, ca, server_leaf, backend, drain_timeout="10s")
    sidecars.append(sc)
    port = sc.port("app")
    plain_connect(port).close()  # it is listening
    signalled = time.monotonic()
    sc.signal(signal.SIGTERM)
    assert sc.proc.wait(10) == 0
    assert time.monotonic() - signalled < 5  # no open connections: no reason to wait drain_timeout
    assert connect_refused(port)
