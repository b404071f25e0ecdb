"""HBONE against an independent implementation: a small peer on Go's standard library
(``tests/interop/hbone_peer.go``: net/http's HTTP/2 and crypto/tls, as Istio's own Go HBONE code
uses), built here with the Go toolchain (Debian ``golang-go``) and no module downloads.

Both ways: Go's HTTP/2 client opening CONNECT streams on our ``hbone`` listener, and our pooled
outbound tunnel opening CONNECT streams on Go's HTTP/2 server. Skips, saying why, without ``go``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from support import (
    TD,
    Backend,
    CertFactory,
    SidecarProcess,
    plain_connect,
    scrape,
    start_sidecar,
    tls_section,
    wait_for,
    write_config,
)

SOURCE = Path(__file__).resolve().parent.parent / "interop" / "hbone_peer.go"
LIMIT = 30.0


@pytest.fixture(scope="module")
def go_peer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    go = shutil.which("go")
    if go is None:
        pytest.skip("Go is not installed (Debian golang-go): the HBONE interop tests need it")
    out = tmp_path_factory.mktemp("go")
    env = {
        **os.environ,
        "GOCACHE": str(out / "cache"),
        "GOPATH": str(out / "gopath"),
        "GO111MODULE": "off",  # the standard library only: nothing to download
        "GOPROXY": "off",
        "CGO_ENABLED": "0",
    }
    binary = out / "hbone-peer"
    subprocess.run([go, "build", "-o", str(binary), str(SOURCE)], check=True, env=env, timeout=300, cwd=out)
    return binary


def _tls_args(leaf: Any, ca: CertFactory) -> list[str]:
    return ["-cert", str(leaf.cert), "-key", str(leaf.key), "-ca", str(ca.ca_file)]


def test_go_clients_streams_on_our_listener(
    go_peer: Path, tmp_path: Path, ca: CertFactory, backend: Backend, sidecars: list[SidecarProcess]
) -> None:
    closed_port = _unused_port()
    inbound = start_sidecar(
        write_config(
            tmp_path / "in.yaml",
            {
                "tls": tls_section(ca.leaf("orders", folder=tmp_path / "in"), ca.ca_file),
                "hbone": {
                    "listen": "127.0.0.1:0",
                    "ports": [
                        {"port": backend.port, "allow": [f"{TD}/frontend"]},
                        {"port": closed_port, "allow": [f"{TD}/admin"]},
                    ],
                },
                "admin": {"listen": "127.0.0.1:0"},
            },
        )
    )
    sidecars.append(inbound)
    frontend = ca.leaf("frontend", folder=tmp_path / "go")
    addr = f"127.0.0.1:{inbound.port('hbone')}"

    def go_client(authority: str, streams: int) -> dict[str, Any]:
        argv = [str(go_peer), "client", "-addr", addr, *_tls_args(frontend, ca), "-authority", authority]
        argv += ["-streams", str(streams), "-bytes", "300000"]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=LIMIT, check=True)
        result: dict[str, Any] = json.loads(done.stdout)
        return result

    seen = go_client(f"10.1.2.3:{backend.port}", 16)
    assert seen["handshakes"] == 1  # Go multiplexed all 16 streams on one connection
    assert [s["status"] for s in seen["streams"]] == [200] * 16
    assert all(s["exact"] and s["proto"] == "HTTP/2.0" and not s.get("error") for s in seen["streams"]), seen
    refused = go_client(f"10.1.2.3:{closed_port}", 1)  # allowed for another identity only
    assert refused["streams"][0]["status"] == 403
    records = inbound.wait_access(17, "hbone")
    assert sorted(r["outcome"] for r in records) == ["denied"] + ["ok"] * 16
    assert backend.accepts == 16
    handshakes = scrape(inbound).value("sidecar_handshake_seconds_count", listener="hbone")
    assert handshakes == 2  # one TLS connection per Go client run


def test_our_pool_streams_on_gos_server(
    go_peer: Path, tmp_path: Path, ca: CertFactory, backend: Backend, sidecars: list[SidecarProcess]
) -> None:
    orders = ca.leaf("orders", folder=tmp_path / "go")
    peer = subprocess.Popen(
        [str(go_peer), "server", "-listen", "127.0.0.1:0", *_tls_args(orders, ca)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        lines = _lines(peer)
        first = next(lines)
        assert first.startswith("listening "), first
        addr = first.split()[1]
        connections: list[str] = []
        threading.Thread(target=lambda: connections.extend(lines), daemon=True).start()
        outbound = start_sidecar(
            write_config(
                tmp_path / "out.yaml",
                {
                    "tls": tls_section(ca.leaf("frontend", folder=tmp_path / "out"), ca.ca_file),
                    "outbound": [
                        {
                            "name": "orders",
                            "listen": "127.0.0.1:0",
                            "upstream": addr,
                            "server_identity": [f"{TD}/orders"],
                            "tunnel": {"protocol": "hbone", "target_port": backend.port},
                        }
                    ],
                    "admin": {"listen": "127.0.0.1:0"},
                },
            )
        )
        sidecars.append(outbound)
        payloads = [os.urandom(250_000 + i) for i in range(16)]
        with ThreadPoolExecutor(len(payloads)) as pool:
            echoes = list(pool.map(lambda p: _exchange(outbound.port("orders"), p), payloads))
        assert echoes == payloads
        assert connections == ["tls-connection"]  # one pooled connection carried every stream
        records = outbound.wait_access(16, "orders")
        assert {r["outcome"] for r in records} == {"ok"}
        assert {r["peer_identity"] for r in records} == {f"{TD}/orders"}
        assert backend.accepts == 16
        wait_for(lambda: scrape(outbound).value("sidecar_hbone_pool_connections", listener="orders") == 1)
    finally:
        peer.kill()
        peer.wait()


def _exchange(port: int, payload: bytes) -> bytes:
    import socket

    with plain_connect(port) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while data := s.recv(1 << 20):
            chunks.append(data)
        return b"".join(chunks)


def _lines(proc: subprocess.Popen[str]) -> Iterator[str]:
    assert proc.stdout is not None
    for line in proc.stdout:
        yield line.strip()


def _unused_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
