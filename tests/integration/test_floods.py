"""Floods against a real ``sidecar run``: stalled handshakes, failing handshakes, and more
connections than the process has file descriptors. Each time the legitimate client still gets
through, every bad connection is closed and counted, and the app sees none of them.

Every flood is bounded in count (a few hundred connections) and in time (generous liveness
bounds, never a timing assertion).
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import threading
from collections import Counter
from pathlib import Path

import pytest
from support import (
    Backend,
    CertFactory,
    CertFiles,
    SidecarProcess,
    client_context,
    inbound_config,
    plain_connect,
    refused,
    start_sidecar,
    tls_exchange,
    wait_for,
)

STALLED = 300
FAILING = 120
# The first bytes of a TLS ClientHello record header and handshake header, then nothing more.
PARTIAL_HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"


def config(path: Path, ca: CertFactory, leaf: CertFiles, backend: Backend) -> Path:
    allow = ["spiffe://mesh.local/frontend"]
    return inbound_config(
        path, leaf, ca.ca_file, {"orders": (backend.address, allow)}, limits={"handshake_timeout": "1s"}
    )


def closed_by_peer(sock: socket.socket, timeout: float = 15.0) -> bool:
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


@pytest.fixture
def inbound(
    tmp_path: Path, ca: CertFactory, server_leaf: CertFiles, backend: Backend, sidecars: list[SidecarProcess]
) -> SidecarProcess:
    sc = start_sidecar(config(tmp_path / "in.yaml", ca, server_leaf, backend))
    sidecars.append(sc)
    return sc


def test_stalled_handshakes_time_out_while_a_peer_gets_through(
    inbound: SidecarProcess, ca: CertFactory, client_leaf: CertFiles, backend: Backend
) -> None:
    port = inbound.port("orders")
    flood = []
    try:
        for i in range(STALLED):
            s = plain_connect(port)
            if i % 2:
                s.sendall(PARTIAL_HELLO)  # half a ClientHello: OpenSSL waits for the rest
            flood.append(s)
        assert tls_exchange(port, client_context(client_leaf, ca.ca_file), b"through the flood") == b"through the flood"
        assert all(closed_by_peer(s) for s in flood)  # handshake_timeout (1 s) closed every one
    finally:
        for s in flood:
            s.close()
    records = inbound.wait_access(STALLED + 1, timeout=30)
    outcomes = Counter((r["outcome"], r["handshake_error"]) for r in records)
    assert outcomes == {("timeout", "timeout"): STALLED, ("ok", None): 1}
    assert backend.accepts == 1


def test_failing_handshakes_from_many_clients_leave_the_peer_served(
    inbound: SidecarProcess, ca: CertFactory, rogue_ca: CertFactory, client_leaf: CertFiles, backend: Backend
) -> None:
    port = inbound.port("orders")
    contexts = [client_context(None, ca.ca_file), client_context(rogue_ca.leaf("frontend"), ca.ca_file)]
    failures: list[str] = []

    def attacker(n: int) -> None:
        for i in range(FAILING // 6):
            if not refused(port, contexts[(n + i) % 2]):
                failures.append(f"attacker {n} got through on try {i}")

    threads = [threading.Thread(target=attacker, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    try:
        for i in range(5):
            payload = b"legit %d" % i
            assert tls_exchange(port, client_context(client_leaf, ca.ca_file), payload) == payload
    finally:
        for t in threads:
            t.join(60)
    assert not failures
    records = inbound.wait_access(FAILING + 5, timeout=30)
    outcomes = Counter(r["outcome"] for r in records)
    assert outcomes == {"tls_error": FAILING, "ok": 5}
    assert {r["handshake_error"] for r in records if r["outcome"] == "tls_error"} <= {"no_client_cert", "untrusted"}
    assert backend.accepts == 5


def test_running_out_of_descriptors_is_survived(
    tmp_path: Path,
    ca: CertFactory,
    server_leaf: CertFiles,
    client_leaf: CertFiles,
    backend: Backend,
    sidecars: list[SidecarProcess],
) -> None:
    sc = start_sidecar(config(tmp_path / "in.yaml", ca, server_leaf, backend), max_fds=64)
    sidecars.append(sc)
    port = sc.port("orders")
    ctx = client_context(client_leaf, ca.ca_file)
    assert tls_exchange(port, ctx, b"before") == b"before"  # everything opened lazily is open now
    in_use = len(os.listdir(f"/proc/{sc.proc.pid}/fd"))
    assert in_use < 40, in_use  # room for a few connections, not for the flood
    flood = []
    try:
        for _ in range(120):  # twice what the process may hold
            with contextlib.suppress(OSError):
                flood.append(plain_connect(port, timeout=2))
        wait_for(lambda: len(os.listdir(f"/proc/{sc.proc.pid}/fd")) >= 60, timeout=10)  # it is full
    finally:
        for s in flood:
            s.close()
    assert sc.proc.poll() is None  # still running

    def served() -> bool:
        with contextlib.suppress(OSError, ssl.SSLError):
            return tls_exchange(port, ctx, b"after the flood", timeout=5) == b"after the flood"
        return False

    assert wait_for(served, timeout=20, interval=0.5)
    assert backend.accepts >= 2
    # every descriptor given back (one more is allowed: libuv's reserve for the next EMFILE)
    wait_for(lambda: len(os.listdir(f"/proc/{sc.proc.pid}/fd")) <= in_use + 1, timeout=20)
    assert "Traceback" not in sc.log_path.read_text()
