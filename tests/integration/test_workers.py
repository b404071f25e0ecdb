"""``workers: N``: several processes serve one sidecar's listeners.

What must hold with workers that holds without: every connection is served and counted once,
``/metrics`` is the sum over the workers, a reload reaches every worker before new handshakes,
SIGTERM drains every worker and the sidecar exits 0, a worker that dies comes back, and no worker
outlives its supervisor.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from support import (
    TD,
    Backend,
    CertFactory,
    CertFiles,
    SidecarProcess,
    admin_request,
    children,
    client_context,
    peer_serial,
    refused,
    running_pair,
    scrape,
    start_sidecar,
    tls_connect,
    tls_exchange,
    tls_section,
    wait_for,
    write_config,
)

WORKERS = 2
CONNECTIONS = 40  # spread by the kernel's hash: the chance that one worker gets none is 2**-39


def start_workers(
    tmp_path: Path,
    ca: CertFactory,
    cert: CertFiles,
    backend: Backend,
    *,
    drain_timeout: str = "10s",
    env: dict[str, str] | None = None,
) -> SidecarProcess:
    cfg = write_config(
        tmp_path / "workers.yaml",
        {
            "tls": tls_section(cert, ca.ca_file),
            "inbound": [
                {"name": "orders", "listen": "127.0.0.1:0", "forward": backend.address, "allow": [f"{TD}/frontend"]}
            ],
            "admin": {"listen": "127.0.0.1:0"},
            "limits": {"drain_timeout": drain_timeout},
            "workers": WORKERS,
        },
    )
    return start_sidecar(cfg, env=env)


@pytest.fixture
def served(
    tmp_path: Path, ca: CertFactory, backend: Backend, sidecars: list[SidecarProcess]
) -> tuple[SidecarProcess, CertFiles, Path]:
    folder = tmp_path / "orders"
    first = ca.leaf("orders", folder=folder)
    sc = start_workers(tmp_path, ca, first, backend)
    sidecars.append(sc)
    return sc, first, folder


def test_connections_spread_over_workers_and_metrics_are_their_sum(
    served: tuple[SidecarProcess, CertFiles, Path], ca: CertFactory, client_leaf: CertFiles, backend: Backend
) -> None:
    sc, _, _ = served
    assert len(children(sc.proc.pid)) == WORKERS
    ctx = client_context(client_leaf, ca.ca_file)
    for i in range(CONNECTIONS):
        payload = f"hello {i:03d}".encode()
        assert tls_exchange(sc.port("orders"), ctx, payload) == payload
    stranger = ca.leaf("stranger")
    accepts = backend.accepts
    assert refused(sc.port("orders"), client_context(stranger, ca.ca_file))  # not in allow
    assert refused(sc.port("orders"), client_context(None, ca.ca_file))  # no client certificate
    records = sc.wait_access(CONNECTIONS + 2, "orders")
    assert backend.accepts == accepts  # the refused never reached the app
    assert {r["worker"] for r in records} == set(range(WORKERS))  # every worker served some

    def settled() -> object:
        s = scrape(sc)
        return s if s.value("sidecar_active_connections", listener="orders", direction="inbound") == 0 else None

    s = wait_for(settled)
    assert s.value("sidecar_connections_total", listener="orders", direction="inbound", outcome="ok") == CONNECTIONS
    assert s.value("sidecar_connections_total", listener="orders", direction="inbound", outcome="denied") == 1
    assert s.value("sidecar_handshake_failures_total", listener="orders", reason="no_client_cert") == 1
    assert s.value("sidecar_bytes_total", listener="orders", flow="to_upstream") == CONNECTIONS * len(b"hello 000")
    assert s.value("sidecar_handshake_seconds_count", listener="orders") == CONNECTIONS + 1
    assert list(s.series("sidecar_build_info").values()) == [1]  # the supervisor's, once
    assert s.value("sidecar_ready") == 1
    names = [fam.name for fam in s.families]
    assert len(names) == len(set(names)), names  # one family per name: the workers' sum, not copies
    promtool = shutil.which("promtool")
    if promtool is None:
        print("promtool not found: install it with `apt-get install -y --no-install-recommends prometheus`")
        pytest.skip("promtool is not installed (Debian package `prometheus`)")
    check = subprocess.run([promtool, "check", "metrics"], input=s.text, capture_output=True, text=True, timeout=30)
    assert check.returncode == 0 and not (check.stdout + check.stderr).strip(), check.stdout + check.stderr


def test_a_reload_reaches_every_worker_and_counts_once(
    served: tuple[SidecarProcess, CertFiles, Path], ca: CertFactory, client_leaf: CertFiles
) -> None:
    sc, first, folder = served
    ctx = client_context(client_leaf, ca.ca_file)
    port = sc.port("orders")
    assert peer_serial(port, ctx) == first.serial
    second = ca.leaf("orders", folder=folder)  # key, then cert, renamed into place
    wait_for(lambda: admin_request(sc, "GET", "/certs").json()["identity"]["serial"] == f"{second.serial:x}", 5)
    # /certs answers for the supervisor; each worker was handed the material before that answer
    assert {peer_serial(port, ctx) for _ in range(CONNECTIONS)} == {second.serial}
    answer = admin_request(sc, "POST", "/reload")
    assert answer.status == 200, answer
    assert {peer_serial(port, ctx) for _ in range(CONNECTIONS)} == {second.serial}
    s = scrape(sc)
    assert s.value("sidecar_cert_reloads_total", result="ok") == 2  # the watch and the POST, not x workers
    assert s.value("sidecar_cert_reloads_total", result="error") == 0


def test_a_worker_that_does_not_apply_a_reload_fails_it_by_name_and_is_restarted_with_it(
    tmp_path: Path, ca: CertFactory, client_leaf: CertFiles, backend: Backend, sidecars: list[SidecarProcess]
) -> None:
    folder = tmp_path / "orders"
    ca.leaf("orders", folder=folder)
    sc = start_workers(
        tmp_path, ca, ca.leaf("orders", folder=folder), backend, env={"SIDECAR_WORKER_PUSH_TIMEOUT": "1"}
    )
    sidecars.append(sc)
    stuck = children(sc.proc.pid)[0]
    os.kill(stuck, signal.SIGSTOP)  # alive, but answers nothing
    try:
        answer = admin_request(sc, "POST", "/reload")
    finally:
        with contextlib.suppress(ProcessLookupError):  # the supervisor may have killed and reaped it already
            os.kill(stuck, signal.SIGCONT)
    assert answer.status == 500, answer
    assert re.fullmatch(r"worker \d: no answer to the reload within 1 s", answer.json()["error"]), answer.json()
    assert answer.json()["reloaded"] is False
    wait_for(lambda: stuck not in children(sc.proc.pid) and len(children(sc.proc.pid)) == WORKERS, 10)
    wait_for(lambda: admin_request(sc, "GET", "/readyz").status == 200, 10)
    s = scrape(sc)
    assert s.value("sidecar_cert_reloads_total", result="error") == 1
    # every worker, the restarted one too, serves what a later rotation brings
    third = ca.leaf("orders", folder=folder)
    wait_for(lambda: admin_request(sc, "GET", "/certs").json()["identity"]["serial"] == f"{third.serial:x}", 5)
    ctx = client_context(client_leaf, ca.ca_file)
    assert {peer_serial(sc.port("orders"), ctx) for _ in range(CONNECTIONS)} == {third.serial}
    assert scrape(sc).value("sidecar_cert_reloads_total", result="ok") == 1


def test_a_killed_worker_is_restarted_and_service_goes_on(
    served: tuple[SidecarProcess, CertFiles, Path], ca: CertFactory, client_leaf: CertFiles
) -> None:
    sc, _, _ = served
    ctx = client_context(client_leaf, ca.ca_file)
    for i in range(CONNECTIONS):
        assert tls_exchange(sc.port("orders"), ctx, b"before %d" % i) == b"before %d" % i
    sc.wait_access(CONNECTIONS, "orders")
    victim = children(sc.proc.pid)[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: any(r.get("msg") == "worker exited; restarting it" for r in sc.logs()), 5)
    wait_for(lambda: len(children(sc.proc.pid)) == WORKERS and victim not in children(sc.proc.pid), 10)
    wait_for(lambda: admin_request(sc, "GET", "/readyz").status == 200, 10)
    for i in range(CONNECTIONS):
        assert tls_exchange(sc.port("orders"), ctx, b"again %d" % i) == b"again %d" % i
    sc.wait_access(2 * CONNECTIONS, "orders")
    s = scrape(sc)
    # the dead worker's counts are kept; its live gauge is dropped, not left stuck
    assert s.value("sidecar_connections_total", listener="orders", direction="inbound", outcome="ok") == 2 * CONNECTIONS
    assert s.value("sidecar_active_connections", listener="orders", direction="inbound") == 0


def test_sigterm_drains_every_worker_and_exits_0(
    tmp_path: Path, ca: CertFactory, server_leaf: CertFiles, client_leaf: CertFiles, sidecars: list[SidecarProcess]
) -> None:
    chunk, count = bytes(range(256)) * 256, 10

    def slow_stream(conn: socket.socket) -> None:
        if conn.recv(100):
            for _ in range(count):
                conn.sendall(chunk)
                time.sleep(0.1)

    backend = Backend(slow_stream)
    try:
        sc = start_workers(tmp_path, ca, server_leaf, backend)
        sidecars.append(sc)
        workers = children(sc.proc.pid)
        with tls_connect(sc.port("orders"), client_context(client_leaf, ca.ca_file)) as s:
            s.sendall(b"go\n")
            received = bytearray(s.recv(65536))
            assert received
            sc.signal(signal.SIGTERM)
            while data := s.recv(65536):  # the transfer in flight runs to its end
                received += data
        assert hashlib.sha256(received).digest() == hashlib.sha256(chunk * count).digest()
        assert sc.proc.wait(20) == 0
        assert not [pid for pid in workers if os.path.exists(f"/proc/{pid}")]
        [rec] = sc.access("orders")
        assert rec["outcome"] == "ok" and rec["bytes_to_downstream"] == len(chunk) * count
    finally:
        backend.close()


def test_workers_do_not_outlive_a_killed_supervisor(
    tmp_path: Path, ca: CertFactory, server_leaf: CertFiles, backend: Backend, sidecars: list[SidecarProcess]
) -> None:
    sc = start_workers(tmp_path, ca, server_leaf, backend, drain_timeout="1s")
    sidecars.append(sc)
    workers = children(sc.proc.pid)
    assert len(workers) == WORKERS
    sc.proc.kill()  # the supervisor alone: no chance to tell anyone
    sc.proc.wait()
    wait_for(lambda: not [pid for pid in workers if os.path.exists(f"/proc/{pid}")], 10)


def test_a_pair_of_multi_worker_sidecars_carries_data_intact(tmp_path: Path, ca: CertFactory) -> None:
    backend = Backend()  # echo
    try:
        with running_pair(tmp_path, ca, {"echo": backend.address}, workers=WORKERS) as (inbound, outbound):
            data = os.urandom(4 * 1024 * 1024)
            for _ in range(4):
                with socket.create_connection(("127.0.0.1", outbound.port("echo")), timeout=10) as s:
                    s.sendall(data)
                    s.shutdown(socket.SHUT_WR)
                    got = bytearray()
                    while chunk := s.recv(1 << 20):
                        got += chunk
                assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
            assert len(outbound.wait_access(4, "echo")) == 4
            assert len(inbound.wait_access(4, "echo")) == 4
    finally:
        backend.close()


def test_a_second_sigint_stops_waiting_for_open_connections_in_every_worker(
    tmp_path: Path, ca: CertFactory, server_leaf: CertFiles, client_leaf: CertFiles, sidecars: list[SidecarProcess]
) -> None:
    backend = Backend()  # echo: the connection below stays open until cut
    try:
        sc = start_workers(tmp_path, ca, server_leaf, backend, drain_timeout="60s")
        sidecars.append(sc)
        workers = children(sc.proc.pid)
        with tls_connect(sc.port("orders"), client_context(client_leaf, ca.ca_file)) as s:
            s.sendall(b"hello")
            assert s.recv(100) == b"hello"
            sc.signal(signal.SIGINT)
            wait_for(lambda: any(r.get("msg") == "draining" and "worker" in r for r in sc.logs()), 5)
            sc.signal(signal.SIGINT)
            assert sc.proc.wait(15) == 0  # far sooner than drain_timeout
        assert not [pid for pid in workers if os.path.exists(f"/proc/{pid}")]
        [rec] = sc.access("orders")
        assert rec["reason"] == "drain_timeout"  # cut, and logged as cut
    finally:
        backend.close()
