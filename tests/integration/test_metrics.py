"""Metrics (contract section 5) measured against real traffic through a real sidecar process.

One sidecar serves the module with a listener per test: the ``listener`` label keeps each test's
counts apart, so every assertion is an exact number. The backend answers every byte with two, so
the bytes each way differ and are known.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from datetime import datetime

import pytest
from support import (
    Backend,
    CertFactory,
    CertFiles,
    SidecarProcess,
    admin_request,
    client_context,
    doubler_handler,
    plain_connect,
    recv_exactly,
    refused,
    scrape,
    start_sidecar,
    tls_connect,
    tls_section,
    wait_for,
    write_config,
)

import sidecar
from sidecar.metrics import OUTCOMES, Metrics
from sidecar.tlserrors import REASONS

LISTENERS = ("counted", "open", "nocert", "mesh", "promtool")
ALLOW = ["spiffe://mesh.local/frontend"]


@pytest.fixture(scope="module")
def sc(tmp_path_factory: pytest.TempPathFactory, ca: CertFactory, server_leaf: CertFiles) -> Iterator[SidecarProcess]:
    backend = Backend(doubler_handler)
    cfg = write_config(
        tmp_path_factory.mktemp("metrics") / "sc.yaml",
        {
            "tls": tls_section(server_leaf, ca.ca_file),
            "inbound": [
                {"name": name, "listen": "127.0.0.1:0", "forward": backend.address, "allow": ALLOW}
                for name in LISTENERS
            ],
            "admin": {"listen": "127.0.0.1:0"},
        },
    )
    process = start_sidecar(cfg)
    yield process
    process.stop()
    backend.close()


def test_allowed_and_denied_connections_are_counted_with_their_bytes(
    sc: SidecarProcess, ca: CertFactory, client_leaf: CertFiles
) -> None:
    port = sc.port("counted")
    with tls_connect(port, client_context(client_leaf, ca.ca_file)) as s:
        s.sendall(b"u" * 1000)
        assert recv_exactly(s, 2000) == b"uu" * 1000
    assert refused(port, client_context(ca.leaf("stranger"), ca.ca_file))
    records = sc.wait_access(2, "counted")

    m = scrape(sc)
    inbound = {"listener": "counted", "direction": "inbound"}
    assert {o: m.value("sidecar_connections_total", **inbound, outcome=o) for o in OUTCOMES} == {
        "ok": 1,
        "denied": 1,
        "tls_error": 0,
        "upstream_error": 0,
        "timeout": 0,
        "limit": 0,
        "passthrough": 0,
    }
    assert m.value("sidecar_active_connections", **inbound) == 0
    # the refused peer sent its ping after the handshake, but not one byte of it was forwarded
    assert m.value("sidecar_bytes_total", listener="counted", flow="to_upstream") == 1000
    assert m.value("sidecar_bytes_total", listener="counted", flow="to_downstream") == 2000
    assert sum(r["bytes_to_upstream"] for r in records) == 1000
    assert sum(r["bytes_to_downstream"] for r in records) == 2000
    # both handshakes succeeded (the refusal is the allow list's, after the handshake)
    assert m.value("sidecar_handshake_seconds_count", listener="counted") == 2
    assert m.value("sidecar_handshake_seconds_bucket", listener="counted", le="+Inf") == 2
    assert 0 < m.value("sidecar_handshake_seconds_sum", listener="counted") < 2 * 10
    assert set(m.series("sidecar_handshake_failures_total", listener="counted").values()) == {0}
    assert m.value("sidecar_upstream_connect_seconds_count", listener="counted") == 1  # the denied one never dialed
    assert m.value("sidecar_connection_duration_seconds_count", **inbound) == 2


def test_bytes_are_published_while_the_connection_is_open(
    sc: SidecarProcess, ca: CertFactory, client_leaf: CertFiles
) -> None:
    inbound = {"listener": "open", "direction": "inbound"}
    with tls_connect(sc.port("open"), client_context(client_leaf, ca.ca_file)) as s:
        s.sendall(b"x" * 300)
        assert recv_exactly(s, 600) == b"xx" * 300

        def published() -> bool:
            m = scrape(sc)
            return m.value("sidecar_bytes_total", listener="open", flow="to_downstream") == 600

        wait_for(published, timeout=5)  # flushed every second while open
        m = scrape(sc)
        assert m.value("sidecar_bytes_total", listener="open", flow="to_upstream") == 300
        assert m.value("sidecar_active_connections", **inbound) == 1
        assert m.value("sidecar_connections_total", **inbound, outcome="ok") == 0  # counted when it ends
    sc.wait_access(1, "open")
    m = scrape(sc)
    assert m.value("sidecar_active_connections", **inbound) == 0
    assert m.value("sidecar_connections_total", **inbound, outcome="ok") == 1
    assert m.value("sidecar_bytes_total", listener="open", flow="to_upstream") == 300  # not counted twice
    assert m.value("sidecar_bytes_total", listener="open", flow="to_downstream") == 600


def test_client_without_certificate_is_a_handshake_failure(sc: SidecarProcess, ca: CertFactory) -> None:
    assert refused(sc.port("nocert"), client_context(None, ca.ca_file))
    [record] = sc.wait_access(1, "nocert")
    assert record["handshake_error"] == "no_client_cert"
    m = scrape(sc)
    failures = {
        dict(k)["reason"]: v for k, v in m.series("sidecar_handshake_failures_total", listener="nocert").items()
    }
    assert failures == {reason: (1 if reason == "no_client_cert" else 0) for reason in REASONS}
    assert m.value("sidecar_connections_total", listener="nocert", direction="inbound", outcome="tls_error") == 1
    assert m.value("sidecar_handshake_seconds_count", listener="nocert") == 0
    assert m.value("sidecar_bytes_total", listener="nocert", flow="to_upstream") == 0


def test_certificate_gauges_match_the_loaded_files(sc: SidecarProcess, ca: CertFactory, server_leaf: CertFiles) -> None:
    m = scrape(sc)
    expiry = server_leaf.issued.cert.not_valid_after_utc.timestamp()
    assert m.value("sidecar_cert_expiry_timestamp_seconds", cert="identity") == expiry
    assert m.value("sidecar_cert_expiry_timestamp_seconds", cert="ca") == ca.ca.cert.not_valid_after_utc.timestamp()
    certs = admin_request(sc, "GET", "/certs").json()
    loaded = datetime.fromisoformat(certs["identity"]["loaded_at"]).timestamp()
    assert abs(m.value("sidecar_cert_loaded_timestamp_seconds") - loaded) < 0.001
    assert m.value("sidecar_ready") == 1
    assert m.value("sidecar_build_info", version=sidecar.__version__) == 1
    assert m.value("sidecar_cert_reloads_total", result="ok") == 0
    assert m.value("sidecar_cert_reloads_total", result="error") == 0


def test_every_registered_metric_is_exposed(sc: SidecarProcess) -> None:
    m = scrape(sc)
    exposed = {fam.name for fam in m.families}
    assert {fam.name for fam in Metrics().registry.collect()} <= exposed
    answer = admin_request(sc, "GET", "/metrics")
    assert answer.headers["content-type"].startswith("text/plain; version=")


@pytest.fixture(scope="module")
def outbound(
    tmp_path_factory: pytest.TempPathFactory, sc: SidecarProcess, ca: CertFactory, client_leaf: CertFiles
) -> Iterator[SidecarProcess]:
    """A second sidecar whose outbound listeners dial the module sidecar's ``mesh`` listener."""
    upstream = f"127.0.0.1:{sc.port('mesh')}"

    def listener(name: str, identity: str) -> dict[str, object]:
        return {"name": name, "listen": "127.0.0.1:0", "upstream": upstream, "server_identity": [identity]}

    cfg = write_config(
        tmp_path_factory.mktemp("outbound") / "out.yaml",
        {
            "tls": tls_section(client_leaf, ca.ca_file),
            "outbound": [
                listener("to-orders", "spiffe://mesh.local/orders"),
                listener("to-billing", "spiffe://mesh.local/billing"),  # the upstream is orders: refused
                listener("refused-bytes", "spiffe://mesh.local/billing"),
            ],
            "admin": {"listen": "127.0.0.1:0"},
        },
    )
    process = start_sidecar(cfg)
    yield process
    process.stop()


def app_call_refused(port: int, payload: bytes) -> None:
    with plain_connect(port) as s:
        s.sendall(payload)
        s.settimeout(10)
        try:
            answer = s.recv(100)
        except ConnectionResetError:  # closed with our bytes unread: the kernel says so with a reset
            answer = b""
        assert answer == b""


def test_outbound_direction_is_labelled_and_counted(sc: SidecarProcess, outbound: SidecarProcess) -> None:
    with plain_connect(outbound.port("to-orders")) as s:
        s.sendall(b"o" * 1000)
        assert recv_exactly(s, 2000) == b"oo" * 1000
    app_call_refused(outbound.port("to-billing"), b"never forwarded")
    outbound.wait_access(1, "to-orders")
    outbound.wait_access(1, "to-billing")

    m = scrape(outbound)
    ok = {"listener": "to-orders", "direction": "outbound"}
    assert m.value("sidecar_connections_total", **ok, outcome="ok") == 1
    assert m.value("sidecar_connections_total", listener="to-billing", direction="outbound", outcome="denied") == 1
    assert m.value("sidecar_bytes_total", listener="to-orders", flow="to_upstream") == 1000
    assert m.value("sidecar_bytes_total", listener="to-orders", flow="to_downstream") == 2000
    assert m.value("sidecar_handshake_seconds_count", listener="to-orders") == 1
    assert m.value("sidecar_handshake_seconds_count", listener="to-billing") == 1  # refused after it
    assert m.value("sidecar_upstream_connect_seconds_count", listener="to-orders") == 1
    assert m.series("sidecar_connections_total", direction="inbound") == {}
    # the inbound side of the same connections, seen by the other sidecar: the refused call's
    # bytes never arrived there
    peer = scrape(sc)
    assert peer.value("sidecar_bytes_total", listener="mesh", flow="to_upstream") == 1000
    assert peer.value("sidecar_bytes_total", listener="mesh", flow="to_downstream") == 2000


def test_refused_outbound_calls_count_no_bytes(outbound: SidecarProcess) -> None:
    # The app's bytes often arrive while the upstream handshake is under way and are held; after a
    # refusal they are dropped, so they must not count as bytes toward the upstream. Twenty calls,
    # because whether the bytes arrive before the refusal is a matter of timing.
    for _ in range(20):
        app_call_refused(outbound.port("refused-bytes"), b"held, never forwarded")
    records = outbound.wait_access(20, "refused-bytes")
    assert {r["outcome"] for r in records} == {"denied"}
    assert scrape(outbound).value("sidecar_bytes_total", listener="refused-bytes", flow="to_upstream") == 0
    assert sum(r["bytes_to_upstream"] for r in records) == 0


def test_promtool_finds_no_problem_in_a_real_scrape(
    sc: SidecarProcess, ca: CertFactory, client_leaf: CertFiles
) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        print("promtool not found: install it with `apt-get install -y --no-install-recommends prometheus`")
        pytest.skip("promtool is not installed (Debian package `prometheus`)")
    with tls_connect(sc.port("promtool"), client_context(client_leaf, ca.ca_file)) as s:
        s.sendall(b"p")
        assert recv_exactly(s, 2) == b"pp"
    assert refused(sc.port("promtool"), client_context(None, ca.ca_file))
    sc.wait_access(2, "promtool")
    text = admin_request(sc, "GET", "/metrics").text
    assert "sidecar_handshake_seconds_bucket" in text
    proc = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip(), proc.stdout + proc.stderr
