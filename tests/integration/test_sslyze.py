"""An outside opinion of the inbound listener's TLS: sslyze against Mozilla's "modern" profile.

The profile checks protocol versions (TLS 1.3 only), TLS 1.3 suites, key-exchange groups (X25519,
P-256, P-384), known vulnerabilities, and the certificate: key type and curve (ECDSA P-256/P-384),
signature algorithm, path validation and a lifespan of at most 90 days. The server certificate is
issued to fit: EC P-256 from ``sidecar.pki``, valid one day, DNS SAN localhost, and sslyze is given
our CA (``--certinfo_ca_file``) for path validation and a client certificate for the mTLS listener.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from support import (
    Backend,
    CertFactory,
    SidecarProcess,
    kill,
    start_sidecar,
    tls_section,
    write_config,
)

pytest.importorskip("sslyze", reason="sslyze is not installed (pip install sslyze, or the project's test extras)")


@pytest.fixture(scope="module")
def scanned(
    tmp_path_factory: pytest.TempPathFactory, ca: CertFactory
) -> Iterator[tuple[subprocess.CompletedProcess[str], dict[str, Any], SidecarProcess, Backend]]:
    folder: Path = tmp_path_factory.mktemp("sslyze")
    now = datetime.now(UTC)
    server = ca.leaf("orders", dns=("localhost",), not_after=now + timedelta(days=1))
    client = ca.leaf("frontend")
    backend = Backend()
    cfg = write_config(
        folder / "sslyze.yaml",
        {
            "tls": tls_section(server, ca.ca_file),
            "inbound": [
                {
                    "name": "orders",
                    "listen": "127.0.0.1:0",
                    "forward": backend.address,
                    "allow": ["spiffe://mesh.local/frontend"],
                }
            ],
            "limits": {"handshake_timeout": "2s", "drain_timeout": "1s"},
        },
    )
    sc = start_sidecar(cfg)
    out = folder / "sslyze.json"
    # sslyze's own OpenSSL must not pick up the sidecar's OPENSSL_CONF (it would narrow the client)
    env = {k: v for k, v in os.environ.items() if k != "OPENSSL_CONF"}
    try:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "sslyze",
                "--mozilla_config=modern",
                f"localhost:{sc.port('orders')}{{127.0.0.1}}",
                "--cert",
                str(client.cert),
                "--key",
                str(client.key),
                "--keyform",
                "PEM",
                "--certinfo_ca_file",
                str(ca.ca_file),
                "--json_out",
                str(out),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            check=False,
        )
        report = json.loads(out.read_text()) if out.exists() else {}
        yield result, report, sc, backend
        assert sc.stop() == 0
    finally:
        kill(sc)
        backend.close()


def test_inbound_is_compliant_with_mozilla_modern(
    scanned: tuple[subprocess.CompletedProcess[str], dict[str, Any], SidecarProcess, Backend],
) -> None:
    result, _, _, _ = scanned
    compliance = result.stdout[result.stdout.find("COMPLIANCE AGAINST") :]
    print(compliance)
    assert "OK - Compliant" in compliance, result.stdout[-4000:] + result.stderr[-2000:]
    assert "Not compliant" not in compliance
    assert result.returncode == 0


def test_scan_saw_tls13_only_with_modern_suites_and_groups(
    scanned: tuple[subprocess.CompletedProcess[str], dict[str, Any], SidecarProcess, Backend],
) -> None:
    _, report, _, _ = scanned
    [server] = report["server_scan_results"]
    assert server["connectivity_status"] == "COMPLETED" and server["scan_status"] == "COMPLETED"
    scan = server["scan_result"]
    for old in ("ssl_2_0", "ssl_3_0", "tls_1_0", "tls_1_1", "tls_1_2"):
        assert scan[f"{old}_cipher_suites"]["result"]["is_tls_version_supported"] is False, old
    suites = {c["cipher_suite"]["name"] for c in scan["tls_1_3_cipher_suites"]["result"]["accepted_cipher_suites"]}
    assert suites and suites <= {"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"}
    curves = {c["name"] for c in scan["elliptic_curves"]["result"]["supported_curves"]}
    assert curves and curves <= {"X25519", "secp256r1", "secp384r1"}, curves


def test_scan_went_through_mtls(
    scanned: tuple[subprocess.CompletedProcess[str], dict[str, Any], SidecarProcess, Backend],
) -> None:
    # the scan really talked to the sidecar, with the client certificate: some of its connections
    # passed the handshake and the allow check (and reached the app)
    _, _, sc, backend = scanned
    allowed = [r for r in sc.access("orders") if r.get("peer_identity") == "spiffe://mesh.local/frontend"]
    assert allowed, "no scan connection was authenticated as the client certificate"
    assert all(r["tls_version"] == "TLSv1.3" for r in allowed)
    assert backend.accepts >= 1
