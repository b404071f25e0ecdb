"""The admin server (contract section 4): a real sidecar process answering real HTTP.

The read-only checks share one sidecar; anything that reloads, expires or drains gets its own.
Two tests run the sidecar in this process to reach states a process only passes through (not yet
bound) and to shorten the idle timeout.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest
from cryptography.hazmat.primitives import hashes
from support import (
    Backend,
    CertFactory,
    CertFiles,
    SidecarProcess,
    admin_address,
    admin_request,
    client_context,
    doubler_handler,
    http_request,
    peer_serial,
    scrape,
    start_sidecar,
    tls_connect,
    tls_exchange,
    tls_section,
    wait_for,
    write_config,
)

from sidecar import config as config_mod
from sidecar.admin import AdminServer
from sidecar.config import Address
from sidecar.server import Standalone

IDENTITY_KEYS = {"subject", "spiffe_ids", "dns_names", "serial", "not_before", "not_after", "sha256", "loaded_at"}


def sidecar_config(path: Path, leaf: CertFiles, ca: CertFactory, forward: str, **extra: object) -> Path:
    return write_config(
        path,
        {
            "tls": tls_section(leaf, ca.ca_file),
            "inbound": [
                {
                    "name": "orders",
                    "listen": "127.0.0.1:0",
                    "forward": forward,
                    "allow": ["spiffe://mesh.local/frontend"],
                }
            ],
            "admin": {"listen": "127.0.0.1:0"},
            **extra,
        },
    )


@pytest.fixture(scope="module")
def shared(
    tmp_path_factory: pytest.TempPathFactory, ca: CertFactory, server_leaf: CertFiles
) -> Iterator[SidecarProcess]:
    """One sidecar for the checks that change nothing."""
    backend = Backend()
    sc = start_sidecar(sidecar_config(tmp_path_factory.mktemp("admin") / "sc.yaml", server_leaf, ca, backend.address))
    yield sc
    sc.stop()
    backend.close()


def test_healthz_and_readyz_answer_200_with_json(shared: SidecarProcess) -> None:
    health = admin_request(shared, "GET", "/healthz")
    assert health.status == 200 and health.json() == {"status": "ok"}
    ready = admin_request(shared, "GET", "/readyz")
    assert ready.status == 200 and ready.json() == {"ready": True}
    assert ready.headers["content-type"].startswith("application/json")


def test_certs_describes_identity_cas_and_reloads(
    shared: SidecarProcess, ca: CertFactory, server_leaf: CertFiles
) -> None:
    answer = admin_request(shared, "GET", "/certs")
    assert answer.status == 200
    body = answer.json()
    assert set(body) == {"source", "identity", "ca_certs", "reloads"}
    assert body["source"] == "files"  # contract section 10
    ident = body["identity"]
    assert set(ident) == IDENTITY_KEYS
    cert = server_leaf.issued.cert
    assert ident["subject"] == "CN=orders"
    assert ident["spiffe_ids"] == ["spiffe://mesh.local/orders"]
    assert ident["dns_names"] == ["localhost"]
    assert ident["serial"] == format(cert.serial_number, "x")
    assert datetime.fromisoformat(ident["not_before"]) == cert.not_valid_before_utc
    assert datetime.fromisoformat(ident["not_after"]) == cert.not_valid_after_utc
    assert ident["sha256"] == cert.fingerprint(hashes.SHA256()).hex()
    loaded_at = datetime.fromisoformat(ident["loaded_at"])
    assert loaded_at.tzinfo is not None and abs(datetime.now(UTC) - loaded_at) < timedelta(minutes=5)
    [ca_entry] = body["ca_certs"]
    assert set(ca_entry) == {"subject", "not_after", "sha256"}
    assert ca_entry["subject"] == ca.ca.cert.subject.rfc4514_string()
    assert datetime.fromisoformat(ca_entry["not_after"]) == ca.ca.cert.not_valid_after_utc
    assert ca_entry["sha256"] == ca.ca.cert.fingerprint(hashes.SHA256()).hex()
    assert body["reloads"] == {"ok": 0, "error": 0, "last_error": None}


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("POST", "/metrics", "GET,HEAD"),
        ("POST", "/healthz", "GET,HEAD"),
        ("PUT", "/readyz", "GET,HEAD"),
        ("DELETE", "/certs", "GET,HEAD"),
        ("GET", "/reload", "POST"),
    ],
)
def test_other_methods_are_405_with_allow(shared: SidecarProcess, method: str, path: str, allow: str) -> None:
    answer = admin_request(shared, method, path)
    assert answer.status == 405
    assert answer.headers["allow"] == allow
    assert answer.json() == {"error": "Method Not Allowed"}


def test_unknown_path_is_404_json(shared: SidecarProcess) -> None:
    answer = admin_request(shared, "GET", "/admin/../etc/passwd")
    assert answer.status == 404 and answer.json() == {"error": "Not Found"}


@pytest.mark.parametrize("framing", ["Content-Length: 1000000", "Transfer-Encoding: chunked"])
def test_request_bodies_are_refused_unread(shared: SidecarProcess, framing: str) -> None:
    # only the headers are sent: the answer must come without the server waiting for the body
    with socket.create_connection(admin_address(shared), timeout=10) as s:
        s.sendall(f"POST /reload HTTP/1.1\r\nHost: admin\r\n{framing}\r\n\r\n".encode())
        answer = s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413 "), answer
    assert admin_request(shared, "GET", "/certs").json()["reloads"] == {"ok": 0, "error": 0, "last_error": None}


def test_silent_and_half_sent_admin_clients_stall_nothing(
    shared: SidecarProcess, ca: CertFactory, client_leaf: CertFiles
) -> None:
    host, port = admin_address(shared)
    idle = [socket.create_connection((host, port)) for _ in range(20)]
    slow = [socket.create_connection((host, port)) for _ in range(20)]
    try:
        for s in slow:
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # and never the rest
        started = time.monotonic()
        assert admin_request(shared, "GET", "/metrics").status == 200
        ctx = client_context(client_leaf, ca.ca_file)
        assert tls_exchange(shared.port("orders"), ctx, b"through") == b"through"
        assert time.monotonic() - started < 5  # generous: both take milliseconds
    finally:
        for s in idle + slow:
            s.close()


def test_reload_ok_then_broken_key_keeps_the_old_material(
    tmp_path: Path, ca: CertFactory, client_leaf: CertFiles, sidecars: list[SidecarProcess]
) -> None:
    folder = tmp_path / "orders"
    first = ca.leaf("orders", folder=folder)
    backend = Backend()
    try:
        sc = start_sidecar(sidecar_config(tmp_path / "sc.yaml", first, ca, backend.address))
        sidecars.append(sc)
        ctx = client_context(client_leaf, ca.ca_file)

        same = admin_request(sc, "POST", "/reload")
        assert same.status == 200, same.text
        assert same.json()["reloaded"] is True
        assert same.json()["identity"]["serial"] == format(first.serial, "x")
        assert scrape(sc).value("sidecar_cert_reloads_total", result="ok") == 1

        # a rotation on disk: let the watcher take it first, so the counts below are settled
        second = ca.leaf("orders", folder=folder)
        wait_for(lambda: peer_serial(sc.port("orders"), ctx) == second.serial)
        rotated = admin_request(sc, "POST", "/reload")
        assert rotated.status == 200, rotated.text
        assert set(rotated.json()["identity"]) == IDENTITY_KEYS
        assert rotated.json()["identity"]["serial"] == format(second.serial, "x")
        ok_before = scrape(sc).value("sidecar_cert_reloads_total", result="ok")
        assert ok_before >= 3  # two requests and the watcher

        errors_before = scrape(sc).value("sidecar_cert_reloads_total", result="error")
        second.key.write_bytes(b"garbage, not a key\n")
        broken = admin_request(sc, "POST", "/reload")
        assert broken.status == 500
        body = broken.json()
        assert body["reloaded"] is False
        assert str(second.key) in body["error"] and "not a valid PEM private key" in body["error"]
        assert body["identity"]["serial"] == format(second.serial, "x")  # the material kept
        after = scrape(sc)
        assert after.value("sidecar_cert_reloads_total", result="error") > errors_before
        assert after.value("sidecar_cert_reloads_total", result="ok") == ok_before
        # a new client still gets the good material, and traffic still flows
        assert peer_serial(sc.port("orders"), ctx) == second.serial
        certs = admin_request(sc, "GET", "/certs").json()
        assert certs["identity"]["serial"] == format(second.serial, "x")
        assert certs["reloads"]["error"] >= 1 and str(second.key) in certs["reloads"]["last_error"]
        assert tls_exchange(sc.port("orders"), ctx, b"still") == b"still"
    finally:
        backend.close()


def test_readyz_turns_503_when_the_identity_expires(
    tmp_path: Path, ca: CertFactory, client_leaf: CertFiles, sidecars: list[SidecarProcess]
) -> None:
    not_after = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=3)
    short = ca.leaf("orders", not_after=not_after)
    backend = Backend()
    try:
        sc = start_sidecar(sidecar_config(tmp_path / "sc.yaml", short, ca, backend.address))
        sidecars.append(sc)
        assert datetime.now(UTC) < not_after, "the machine is too slow for this test's 3 s certificate"
        assert admin_request(sc, "GET", "/readyz").status == 200
        before = scrape(sc)
        assert before.value("sidecar_ready") == 1
        assert before.value("sidecar_cert_expiry_timestamp_seconds", cert="identity") == not_after.timestamp()

        answer = wait_for(lambda: (a := admin_request(sc, "GET", "/readyz")).status == 503 and a, timeout=10)
        body = answer.json()
        assert body["ready"] is False
        assert "expired" in body["reason"] and not_after.isoformat() in body["reason"]
        assert body["reasons"] == [body["reason"]]
        assert scrape(sc).value("sidecar_ready") == 0
        assert admin_request(sc, "GET", "/healthz").status == 200  # alive, just not ready
    finally:
        backend.close()


def test_readyz_is_503_while_draining(
    tmp_path: Path, ca: CertFactory, server_leaf: CertFiles, client_leaf: CertFiles, sidecars: list[SidecarProcess]
) -> None:
    backend = Backend(doubler_handler)
    try:
        sc = start_sidecar(sidecar_config(tmp_path / "sc.yaml", server_leaf, ca, backend.address))
        sidecars.append(sc)
        with tls_connect(sc.port("orders"), client_context(client_leaf, ca.ca_file)) as held:
            held.sendall(b"a")
            assert held.recv(10) == b"aa"
            sc.signal(signal.SIGTERM)
            answer = wait_for(lambda: (a := admin_request(sc, "GET", "/readyz")).status == 503 and a)
            assert "draining" in answer.json()["reasons"]
            held.sendall(b"b")  # the open connection still works while draining
            assert held.recv(10) == b"bb"
        assert sc.proc.wait(10) == 0
    finally:
        backend.close()


def test_admin_port_in_use_is_a_clean_error(tmp_path: Path, ca: CertFactory, server_leaf: CertFiles) -> None:
    taken = socket.create_server(("127.0.0.1", 0))
    try:
        port = taken.getsockname()[1]
        cfg = sidecar_config(
            tmp_path / "sc.yaml", server_leaf, ca, "127.0.0.1:1", admin={"listen": f"127.0.0.1:{port}"}
        )
        proc = subprocess.run(
            [sys.executable, "-m", "sidecar", "run", "-c", str(cfg)], capture_output=True, text=True, timeout=20
        )
    finally:
        taken.close()
    assert proc.returncode == 2
    assert f"admin.listen: cannot listen on 127.0.0.1:{port}" in proc.stderr
    assert "Traceback" not in proc.stderr


# -- in this process: states a running process only passes through ---------------------------


async def _in_process(
    tmp_path: Path, ca: CertFactory, leaf: CertFiles, idle_timeout: float = 5.0
) -> tuple[Standalone, AdminServer]:
    path = write_config(
        tmp_path / "sc.yaml",
        {
            "tls": tls_section(leaf, ca.ca_file),
            "inbound": [
                {
                    "name": "orders",
                    "listen": "127.0.0.1:0",
                    "forward": "127.0.0.1:1",
                    "allow": ["spiffe://mesh.local/x"],
                }
            ],
        },
    )
    sidecar = Standalone(config_mod.load(path))
    admin = AdminServer(sidecar.control, Address("127.0.0.1", 0), idle_timeout=idle_timeout)
    await sidecar.control.store.load()
    await admin.start()
    return sidecar, admin


async def test_readyz_is_503_until_every_listener_is_bound(
    tmp_path: Path, ca: CertFactory, server_leaf: CertFiles
) -> None:
    sidecar, admin = await _in_process(tmp_path, ca, server_leaf)
    assert admin.bound is not None
    url = f"http://{admin.bound}/readyz"
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(url) as resp:
                assert resp.status == 503
                assert await resp.json() == {
                    "ready": False,
                    "reason": "listener orders is not bound",
                    "reasons": ["listener orders is not bound"],
                }
            for listener in sidecar.runtime.listeners:
                await listener.start()
            async with session.get(url) as resp:
                assert resp.status == 200
    finally:
        await sidecar.close()
        await admin.stop()


async def test_idle_and_half_sent_connections_are_closed(
    tmp_path: Path, ca: CertFactory, server_leaf: CertFiles
) -> None:
    _sidecar, admin = await _in_process(tmp_path, ca, server_leaf, idle_timeout=0.3)
    assert admin.bound is not None
    try:
        silent = await asyncio.open_connection(admin.bound.host, admin.bound.port)
        half = await asyncio.open_connection(admin.bound.host, admin.bound.port)
        half[1].write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        for reader, writer in (silent, half):
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server, nothing sent
            writer.close()
        answer = await asyncio.to_thread(http_request, (admin.bound.host, admin.bound.port), "GET", "/healthz")
        assert answer.status == 200
    finally:
        await admin.stop()
