"""Access records (contract section 6): one per connection, the contract's fields, never a secret.

A real sidecar process writes its log to a file; the tests read it back line by line.
"""

from __future__ import annotations

import signal
import uuid
from pathlib import Path

import pytest
from support import (
    Backend,
    CertFactory,
    CertFiles,
    SidecarProcess,
    admin_request,
    client_context,
    doubler_handler,
    recv_exactly,
    refused,
    start_sidecar,
    tls_connect,
    tls_section,
    wait_for,
    write_config,
)

CONTRACT_FIELDS = {
    "listener",
    "direction",
    "client",
    "peer_identity",
    "outcome",
    "bytes_to_upstream",
    "bytes_to_downstream",
    "duration_ms",
    "tls_version",
    "cipher",
}


def start(tmp_path: Path, leaf: CertFiles, ca: CertFactory, backend: Backend, log: dict[str, str]) -> SidecarProcess:
    cfg = write_config(
        tmp_path / "sc.yaml",
        {
            "tls": tls_section(leaf, ca.ca_file),
            "inbound": [
                {
                    "name": "orders",
                    "listen": "127.0.0.1:0",
                    "forward": backend.address,
                    "allow": ["spiffe://mesh.local/frontend"],
                }
            ],
            "admin": {"listen": "127.0.0.1:0"},
            "log": log,
        },
    )
    return start_sidecar(cfg)


@pytest.fixture
def doubler() -> Backend:
    return Backend(doubler_handler)


def test_one_record_per_connection_with_the_contract_fields(
    tmp_path: Path,
    ca: CertFactory,
    server_leaf: CertFiles,
    client_leaf: CertFiles,
    doubler: Backend,
    sidecars: list[SidecarProcess],
) -> None:
    sc = start(tmp_path, server_leaf, ca, doubler, {"level": "info", "format": "json"})
    sidecars.append(sc)
    port = sc.port("orders")
    with tls_connect(port, client_context(client_leaf, ca.ca_file)) as s:
        client = "{}:{}".format(*s.getsockname()[:2])
        s.sendall(b"a" * 700)
        assert recv_exactly(s, 1400) == b"aa" * 700
    assert refused(port, client_context(ca.leaf("stranger"), ca.ca_file))
    assert refused(port, client_context(None, ca.ca_file))
    ok, denied, failed = sc.wait_access(3)
    assert len(sc.access()) == 3

    for rec in (ok, denied, failed):
        assert set(rec) >= CONTRACT_FIELDS, rec
        assert rec["listener"] == "orders" and rec["direction"] == "inbound"
        assert rec["client"].startswith("127.0.0.1:")
        assert isinstance(rec["duration_ms"], float) and rec["duration_ms"] >= 0
    assert ok["client"] == client
    assert ok["outcome"] == "ok" and ok["level"] == "info"
    assert ok["peer_identity"] == "spiffe://mesh.local/frontend"
    assert (ok["bytes_to_upstream"], ok["bytes_to_downstream"]) == (700, 1400)
    assert ok["tls_version"] == "TLSv1.3"
    assert ok["cipher"].startswith("TLS_")
    assert ok["duration_ms"] > 0

    assert denied["outcome"] == "denied" and denied["level"] == "warning"
    assert denied["peer_identity"] == "spiffe://mesh.local/stranger"
    assert (denied["bytes_to_upstream"], denied["bytes_to_downstream"]) == (0, 0)
    assert denied["tls_version"] == "TLSv1.3"

    assert failed["outcome"] == "tls_error"
    assert failed["peer_identity"] is None
    assert failed["handshake_error"] == "no_client_cert"
    assert failed["tls_version"] is None and failed["cipher"] is None


def test_debug_logs_hold_no_key_and_no_payload(
    tmp_path: Path,
    ca: CertFactory,
    client_leaf: CertFiles,
    doubler: Backend,
    sidecars: list[SidecarProcess],
) -> None:
    leaf = ca.leaf("orders", folder=tmp_path / "orders")
    key_lines = [line for line in leaf.key.read_text().splitlines() if line and not line.startswith("-----")]
    sc = start(tmp_path, leaf, ca, doubler, {"level": "debug", "format": "json"})
    sidecars.append(sc)
    payload = f"payload-{uuid.uuid4()}".encode()
    with tls_connect(sc.port("orders"), client_context(client_leaf, ca.ca_file)) as s:
        s.sendall(payload)
        assert recv_exactly(s, 2 * len(payload)) == payload * 2
    assert refused(sc.port("orders"), client_context(ca.leaf("stranger"), ca.ca_file))
    # every reload path: a good one, a key that does not parse, a key of another cert, SIGHUP
    assert admin_request(sc, "POST", "/reload").status == 200
    leaf.key.write_text(leaf.key.read_text().replace("A", "B", 5))
    assert admin_request(sc, "POST", "/reload").status == 500
    leaf.key.write_bytes(ca.leaf("other").key.read_bytes())
    assert admin_request(sc, "POST", "/reload").status == 500
    sc.signal(signal.SIGHUP)
    wait_for(lambda: sc.log_path.read_text().count("certificate reload failed") >= 3)
    assert admin_request(sc, "GET", "/metrics").status == 200
    assert admin_request(sc, "GET", "/certs").status == 200
    assert sc.stop() == 0

    text = sc.log_path.read_text()
    records = sc.logs()
    access = sc.access()
    assert [r["outcome"] for r in access] == ["ok", "denied"]
    assert access[0]["bytes_to_upstream"] == len(payload)
    assert "PRIVATE KEY" not in text
    assert "BEGIN" not in text
    assert not [line for line in key_lines if line in text]
    assert payload.decode() not in text
    assert not [r for r in records if r.get("logger") == "aiohttp.access"]  # admin requests are not access-logged
