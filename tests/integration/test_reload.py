"""Hot reload: new handshakes see new material within seconds; nothing live is cut; bad writes are survived."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import ssl
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from support import (
    Backend,
    CertFactory,
    CertFiles,
    SidecarProcess,
    client_context,
    recv_exactly,
    refused,
    start_sidecar,
    tls_connect,
    tls_exchange,
    wait_for,
    write_config,
)

from sidecar import pki

RELOAD_BOUND = 5.0  # generous liveness bound; the contract promises 2 s


def served_serial(port: int, ctx: ssl.SSLContext) -> int:
    with tls_connect(port, ctx) as s:
        der = s.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def wait_serial(port: int, ctx: ssl.SSLContext, serial: int, timeout: float = RELOAD_BOUND) -> float:
    """Seconds until new handshakes present ``serial``."""
    started = time.monotonic()
    wait_for(lambda: served_serial(port, ctx) == serial, timeout=timeout, interval=0.02)
    return time.monotonic() - started


def rotate(ca: CertFactory, folder: Path, name: str = "orders") -> CertFiles:
    """Re-issue into ``folder`` the way ``sidecar pki issue`` does: key, then cert, each renamed into place."""
    return ca.leaf(name, folder=folder)


def start_inbound(
    tmp_path: Path, cert: Path, key: Path, ca_file: Path, backend: Backend, crl: Path | None = None
) -> SidecarProcess:
    tls = {"cert": str(cert), "key": str(key), "ca": str(ca_file)}
    if crl is not None:
        tls["crl"] = str(crl)
    cfg = write_config(
        tmp_path / "in.yaml",
        {
            "tls": tls,
            "inbound": [
                {"name": "orders", "listen": "127.0.0.1:0", "forward": backend.address, "allow": ["*"]},
            ],
        },
    )
    return start_sidecar(cfg)


@pytest.fixture
def served(
    tmp_path: Path, ca: CertFactory, backend: Backend, sidecars: list[SidecarProcess]
) -> tuple[SidecarProcess, CertFiles, Path]:
    folder = tmp_path / "orders"
    first = ca.leaf("orders", folder=folder)
    sc = start_inbound(tmp_path, first.cert, first.key, ca.ca_file, backend)
    sidecars.append(sc)
    return sc, first, folder


def test_rotation_by_rename_is_seen_by_new_handshakes(
    served: tuple[SidecarProcess, CertFiles, Path], ca: CertFactory, client_leaf: CertFiles
) -> None:
    sc, first, folder = served
    ctx = client_context(client_leaf, ca.ca_file)
    port = sc.port("orders")
    assert served_serial(port, ctx) == first.serial
    second = rotate(ca, folder)
    latency = wait_serial(port, ctx, second.serial)
    print(f"reload latency (rename on disk -> first handshake with the new serial): {latency * 1000:.0f} ms")
    assert any(r.get("msg") == "certificates reloaded" for r in sc.logs())


def test_streams_survive_three_rotations(
    served: tuple[SidecarProcess, CertFiles, Path], ca: CertFactory, client_leaf: CertFiles
) -> None:
    sc, _first, folder = served
    ctx = client_context(client_leaf, ca.ca_file)
    port = sc.port("orders")
    results: list[bool] = []
    errors: list[BaseException] = []
    stop_at = time.monotonic() + 4.0

    def stream() -> None:
        try:
            with tls_connect(port, ctx) as s:
                sent, got = hashlib.sha256(), hashlib.sha256()
                while time.monotonic() < stop_at:
                    chunk = os.urandom(16384)
                    s.sendall(chunk)
                    sent.update(chunk)
                    got.update(recv_exactly(s, len(chunk)))
                    time.sleep(0.01)
                results.append(sent.digest() == got.digest())
        except BaseException as exc:  # recorded and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=stream) for _ in range(10)]
    for t in threads:
        t.start()
    for _ in range(3):
        time.sleep(0.8)
        new = rotate(ca, folder)
        wait_serial(port, ctx, new.serial)
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert results == [True] * 10
    assert not [r for r in sc.access() if r["outcome"] != "ok"]


@pytest.mark.parametrize("damage", ["key_mismatch", "truncated_pem", "empty_file"])
def test_bad_write_keeps_old_material_then_good_write_wins(
    damage: str, served: tuple[SidecarProcess, CertFiles, Path], ca: CertFactory, client_leaf: CertFiles
) -> None:
    sc, first, folder = served
    ctx = client_context(client_leaf, ca.ca_file)
    port = sc.port("orders")
    cert = folder / "cert.pem"
    if damage == "key_mismatch":
        other = pki.issue(ca.ca, common_name="other", spiffe_ids=["spiffe://mesh.local/other"])
        pki.write_atomic(folder / "key.pem", other.key_pem(), 0o600)
    elif damage == "truncated_pem":
        pki.write_atomic(cert, cert.read_bytes()[:200])
    else:
        pki.write_atomic(cert, b"")
    wait_for(lambda: any(r.get("msg", "").startswith("certificate reload failed") for r in sc.logs()), RELOAD_BOUND)
    assert served_serial(port, ctx) == first.serial
    assert tls_exchange(port, ctx) == b"ping"
    second = rotate(ca, folder)
    wait_serial(port, ctx, second.serial)


def test_cert_written_before_its_key_is_picked_up_when_the_key_arrives(
    served: tuple[SidecarProcess, CertFiles, Path], ca: CertFactory, client_leaf: CertFiles
) -> None:
    sc, first, folder = served
    ctx = client_context(client_leaf, ca.ca_file)
    port = sc.port("orders")
    new = pki.issue(ca.ca, common_name="orders", spiffe_ids=["spiffe://mesh.local/orders"], dns_names=["localhost"])
    pki.write_atomic(folder / "cert.pem", new.cert_pem())
    wait_for(lambda: any(r.get("msg", "").startswith("certificate reload failed") for r in sc.logs()), RELOAD_BOUND)
    assert served_serial(port, ctx) == first.serial
    pki.write_atomic(folder / "key.pem", new.key_pem(), 0o600)
    wait_serial(port, ctx, new.cert.serial_number)


def _k8s_volume(root: Path, issued: pki.Issued, stamp: str) -> None:
    """Write a Secret volume the way the kubelet does: a timestamped folder, ``..data`` swapped by rename."""
    data_dir = root / f"..{stamp}"
    data_dir.mkdir()
    (data_dir / "tls.crt").write_bytes(issued.cert_pem())
    (data_dir / "tls.key").write_bytes(issued.key_pem())
    os.chmod(data_dir / "tls.key", 0o600)
    old = os.readlink(root / "..data") if (root / "..data").is_symlink() else None
    os.symlink(data_dir.name, root / "..data_tmp")
    os.replace(root / "..data_tmp", root / "..data")
    for name in ("tls.crt", "tls.key"):
        if not (root / name).is_symlink():
            os.symlink(f"..data/{name}", root / name)
    if old:
        shutil.rmtree(root / old)


def test_kubernetes_secret_symlink_swap(
    tmp_path: Path, ca: CertFactory, client_leaf: CertFiles, backend: Backend, sidecars: list[SidecarProcess]
) -> None:
    vol = tmp_path / "secret"
    vol.mkdir()
    first = pki.issue(ca.ca, common_name="orders", spiffe_ids=["spiffe://mesh.local/orders"], dns_names=["localhost"])
    _k8s_volume(vol, first, "2026_11_23_09_00_00.1")
    sc = start_inbound(tmp_path, vol / "tls.crt", vol / "tls.key", ca.ca_file, backend)
    sidecars.append(sc)
    ctx = client_context(client_leaf, ca.ca_file)
    port = sc.port("orders")
    assert served_serial(port, ctx) == first.cert.serial_number
    second = pki.issue(ca.ca, common_name="orders", spiffe_ids=["spiffe://mesh.local/orders"], dns_names=["localhost"])
    _k8s_volume(vol, second, "2026_11_23_10_00_00.2")
    wait_serial(port, ctx, second.cert.serial_number)


def test_delete_and_recreate(
    served: tuple[SidecarProcess, CertFiles, Path], ca: CertFactory, client_leaf: CertFiles
) -> None:
    sc, first, folder = served
    ctx = client_context(client_leaf, ca.ca_file)
    port = sc.port("orders")
    (folder / "cert.pem").unlink()
    (folder / "key.pem").unlink()
    time.sleep(1.5)  # the sidecar notices the files are gone and keeps serving the old pair
    assert served_serial(port, ctx) == first.serial
    new = pki.issue(ca.ca, common_name="orders", spiffe_ids=["spiffe://mesh.local/orders"], dns_names=["localhost"])
    (folder / "key.pem").write_bytes(new.key_pem())
    (folder / "cert.pem").write_bytes(new.cert_pem())
    wait_serial(port, ctx, new.cert.serial_number)


def test_sighup_forces_a_reload(
    served: tuple[SidecarProcess, CertFiles, Path], ca: CertFactory, client_leaf: CertFiles
) -> None:
    sc, _first, _folder = served
    sc.signal(signal.SIGHUP)
    wait_for(lambda: any(r.get("msg") == "reload requested" and r.get("by") == "SIGHUP" for r in sc.logs()))
    wait_for(lambda: any(r.get("msg") == "certificates reloaded" for r in sc.logs()))


def test_ca_bundle_rotation_adds_and_removes_trust(
    tmp_path: Path,
    ca: CertFactory,
    rogue_ca: CertFactory,
    server_leaf: CertFiles,
    backend: Backend,
    sidecars: list[SidecarProcess],
) -> None:
    bundle = tmp_path / "bundle.pem"
    pki.write_atomic(bundle, ca.ca.cert_pem())
    sc = start_inbound(tmp_path, server_leaf.cert, server_leaf.key, bundle, backend)
    sidecars.append(sc)
    port = sc.port("orders")
    newcomer = client_context(rogue_ca.leaf("newcomer"), ca.ca_file)
    assert refused(port, newcomer)
    pki.write_atomic(bundle, ca.ca.cert_pem() + rogue_ca.ca.cert_pem())
    wait_for(lambda: not refused(port, newcomer), RELOAD_BOUND)
    assert tls_exchange(port, newcomer) == b"ping"
    pki.write_atomic(bundle, ca.ca.cert_pem())
    wait_for(lambda: refused(port, newcomer), RELOAD_BOUND)
    assert tls_exchange(port, client_context(ca.leaf("frontend"), ca.ca_file)) == b"ping"


def test_crl_revokes_a_client_after_reload(
    tmp_path: Path, ca: CertFactory, server_leaf: CertFiles, backend: Backend, sidecars: list[SidecarProcess]
) -> None:
    victim = ca.leaf("victim")
    bystander = ca.leaf("bystander")
    crl = tmp_path / "crl.pem"
    pki.write_atomic(crl, pki.make_crl(ca.ca, []))
    sc = start_inbound(tmp_path, server_leaf.cert, server_leaf.key, ca.ca_file, backend, crl=crl)
    sidecars.append(sc)
    port = sc.port("orders")
    victim_ctx = client_context(victim, ca.ca_file)
    assert tls_exchange(port, victim_ctx) == b"ping"
    pki.write_atomic(crl, pki.make_crl(ca.ca, [victim.serial]))
    wait_for(lambda: refused(port, victim_ctx), RELOAD_BOUND)
    accepts_before = backend.accepts
    assert refused(port, victim_ctx)
    assert tls_exchange(port, client_context(bystander, ca.ca_file)) == b"ping"
    revoked = [r for r in sc.access() if r.get("handshake_error") == "revoked"]
    assert revoked
    assert backend.accepts == accepts_before + 1  # only the bystander reached the app


def test_outbound_refuses_a_revoked_upstream(
    tmp_path: Path,
    ca: CertFactory,
    client_leaf: CertFiles,
    backend: Backend,
    sidecars: list[SidecarProcess],
) -> None:
    upstream_leaf = ca.leaf("billing")
    upstream = start_inbound(tmp_path, upstream_leaf.cert, upstream_leaf.key, ca.ca_file, backend)
    sidecars.append(upstream)
    crl = tmp_path / "out-crl.pem"
    pki.write_atomic(crl, pki.make_crl(ca.ca, [upstream_leaf.serial]))
    cfg = write_config(
        tmp_path / "out.yaml",
        {
            "tls": {"cert": str(client_leaf.cert), "key": str(client_leaf.key), "ca": str(ca.ca_file), "crl": str(crl)},
            "outbound": [
                {
                    "name": "billing",
                    "listen": "127.0.0.1:0",
                    "upstream": f"127.0.0.1:{upstream.port('orders')}",
                    "server_identity": ["spiffe://mesh.local/billing"],
                }
            ],
        },
    )
    out = start_sidecar(cfg)
    sidecars.append(out)
    import socket

    with socket.create_connection(("127.0.0.1", out.port("billing")), timeout=10) as s:
        s.sendall(b"secret app bytes")
        assert s.recv(100) == b""
    [rec] = out.wait_access(1)
    assert rec["outcome"] == "tls_error" and rec["handshake_error"] == "revoked"
    assert backend.received == 0 and backend.accepts == 0
