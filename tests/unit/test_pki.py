"""Tests for sidecar.pki: what it issues must pass a real TLS 1.3 handshake, both ways.

Handshakes run in memory (``ssl.MemoryBIO``), so no sockets are opened.
"""

from __future__ import annotations

import os
import ssl
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sidecar import pki
from sidecar.errors import PKIError
from tests.support import MemoryLink

# --- in-memory TLS --------------------------------------------------------------------------------


def _write(tmp_path: Path, name: str, issued: pki.Issued) -> tuple[Path, Path]:
    cert, key = tmp_path / f"{name}.pem", tmp_path / f"{name}-key.pem"
    cert.write_bytes(issued.cert_pem())
    key.write_bytes(issued.key_pem())
    return cert, key


def _server_ctx(cert: Path, key: Path, trust: str | Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    _load_trust(ctx, trust)
    ctx.load_cert_chain(cert, key)
    return ctx


def _client_ctx(cert: Path, key: Path, trust: str | Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname and CERT_REQUIRED by default
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    _load_trust(ctx, trust)
    ctx.load_cert_chain(cert, key)
    return ctx


def _load_trust(ctx: ssl.SSLContext, trust: str | Path) -> None:
    if isinstance(trust, Path):
        ctx.load_verify_locations(cafile=trust)  # a file may also hold CRLs
    else:
        ctx.load_verify_locations(cadata=trust)


def _handshake(
    client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext, server_hostname: str
) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """Run both ends of a handshake in memory, then echo one message."""
    link = MemoryLink(client_ctx, server_ctx, server_hostname)
    link.handshake()
    return link.client, link.server


def _peer(obj: ssl.SSLObject) -> dict[str, Any]:
    """The verified peer certificate as ``ssl`` decodes it (there is one after a handshake)."""
    cert = obj.getpeercert()
    assert cert is not None
    return dict(cert)


def _uris(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "certs"
    pki.init_ca(directory, trust_domain="mesh.local")
    return directory


# --- handshakes -----------------------------------------------------------------------------------


def test_issued_leaves_complete_mtls_handshake_as_server_and_client(ca_dir: Path) -> None:
    pki.issue_to_dir(ca_dir, "billing", dns_names=["billing.mesh.local"])
    pki.issue_to_dir(ca_dir, "orders")
    ca_pem = (ca_dir / "ca.pem").read_text()
    server_ctx = _server_ctx(ca_dir / "billing/cert.pem", ca_dir / "billing/key.pem", ca_pem)
    client_ctx = _client_ctx(ca_dir / "orders/cert.pem", ca_dir / "orders/key.pem", ca_pem)

    client, server = _handshake(client_ctx, server_ctx, "billing.mesh.local")

    assert client.version() == server.version() == "TLSv1.3"
    client_seen_by_server = _peer(server)
    assert ("URI", "spiffe://mesh.local/orders") in client_seen_by_server["subjectAltName"]
    server_seen_by_client = _peer(client)
    assert ("URI", "spiffe://mesh.local/billing") in server_seen_by_client["subjectAltName"]
    assert ("DNS", "billing.mesh.local") in server_seen_by_client["subjectAltName"]


def test_one_leaf_serves_both_roles(tmp_path: Path) -> None:
    ca = pki.new_ca()
    leaf = pki.issue(ca, common_name="both", spiffe_ids=["spiffe://mesh.local/both"], dns_names=["both.local"])
    cert, key = _write(tmp_path, "both", leaf)
    ca_pem = ca.cert_pem().decode()

    client, server = _handshake(_client_ctx(cert, key, ca_pem), _server_ctx(cert, key, ca_pem), "both.local")

    assert int(_peer(client)["serialNumber"], 16) == leaf.cert.serial_number  # OpenSSL may pad a leading 0
    assert int(_peer(server)["serialNumber"], 16) == leaf.cert.serial_number


def test_hostname_mismatch_and_foreign_ca_are_refused(tmp_path: Path) -> None:
    # Proves the handshake helper really verifies: the positive tests are not vacuous.
    ca, other = pki.new_ca(), pki.new_ca("other CA")
    server_cert, server_key = _write(tmp_path, "server", pki.issue(ca, common_name="s", dns_names=["s.local"]))
    client_cert, client_key = _write(tmp_path, "client", pki.issue(ca, common_name="c"))
    ca_pem, other_pem = ca.cert_pem().decode(), other.cert_pem().decode()

    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        _handshake(
            _client_ctx(client_cert, client_key, ca_pem),
            _server_ctx(server_cert, server_key, ca_pem),
            "wrong.local",
        )
    # (OpenSSL's server completes its chain from its own trust store, so the client sees the root.)
    with pytest.raises(ssl.SSLCertVerificationError, match="self-signed certificate in certificate chain"):
        _handshake(
            _client_ctx(client_cert, client_key, other_pem),
            _server_ctx(server_cert, server_key, ca_pem),
            "s.local",
        )


def test_intermediate_chain_verifies_with_only_the_root_trusted(tmp_path: Path) -> None:
    root = pki.new_ca("root", trust_domain="mesh.local")
    intermediate = pki.new_ca("intermediate", issuer=root)
    server = pki.issue(intermediate, common_name="s", dns_names=["s.local"])
    client = pki.issue(intermediate, common_name="c", spiffe_ids=["spiffe://mesh.local/c"])

    assert intermediate.chain == (root.cert,)
    assert server.chain == (intermediate.cert,)  # the self-signed root is not sent
    assert pki.trust_domain_of(intermediate) == "mesh.local"  # inherited from the root

    root_only = root.cert_pem().decode()
    server_files, client_files = _write(tmp_path, "s", server), _write(tmp_path, "c", client)
    c, s = _handshake(_client_ctx(*client_files, root_only), _server_ctx(*server_files, root_only), "s.local")

    assert ("URI", "spiffe://mesh.local/c") in _peer(s)["subjectAltName"]
    assert _peer(c)["subject"] == ((("commonName", "s"),),)


def test_revoked_client_is_refused_when_crl_is_checked(tmp_path: Path) -> None:
    ca = pki.new_ca()
    server_files = _write(tmp_path, "s", pki.issue(ca, common_name="s", dns_names=["s.local"]))
    good, revoked = pki.issue(ca, common_name="good"), pki.issue(ca, common_name="revoked")
    trust = tmp_path / "trust.pem"
    trust.write_bytes(ca.cert_pem() + pki.make_crl(ca, [revoked.cert.serial_number]))

    def server_ctx() -> ssl.SSLContext:
        ctx = _server_ctx(*server_files, trust)
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        return ctx

    _, server = _handshake(_client_ctx(*_write(tmp_path, "good", good), trust), server_ctx(), "s.local")
    assert _peer(server)["subject"] == ((("commonName", "good"),),)
    with pytest.raises(ssl.SSLError, match="revoked"):
        _handshake(_client_ctx(*_write(tmp_path, "revoked", revoked), trust), server_ctx(), "s.local")


# --- certificate contents -------------------------------------------------------------------------


def test_ca_certificate_profile() -> None:
    ca = pki.new_ca("dev CA", trust_domain="example.org")
    ext = ca.cert.extensions

    basic = ext.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca
    usage = ext.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    assert not usage.value.digital_signature
    ski = ext.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier == ski.digest
    assert ca.cert.subject == ca.cert.issuer
    assert ca.chain == ()
    assert ca.key.curve.name == "secp256r1"
    assert pki.trust_domain_of(ca) == "example.org"
    assert pki.trust_domain_of(pki.new_ca()) is None


def test_intermediate_aki_is_root_ski() -> None:
    root = pki.new_ca("root")
    intermediate = pki.new_ca("intermediate", issuer=root)

    root_ski = root.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    aki = intermediate.cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == root_ski
    assert intermediate.cert.issuer == root.cert.subject
    intermediate.cert.verify_directly_issued_by(root.cert)  # raises if not signed by the root


def test_leaf_profile(ca_dir: Path) -> None:
    ca = pki.load_ca(ca_dir)
    leaf = pki.issue_to_dir(ca_dir, "orders", dns_names=["orders.mesh.local"])
    ext = leaf.cert.extensions

    basic = ext.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca is False
    usage = ext.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and not usage.value.key_cert_sign
    eku = ext.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}

    leaf_ski = ext.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert leaf_ski.digest == x509.SubjectKeyIdentifier.from_public_key(leaf.key.public_key()).digest
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier == ca_ski.digest
    leaf.cert.verify_directly_issued_by(ca.cert)

    assert _uris(leaf.cert) == ["spiffe://mesh.local/orders"]
    assert leaf.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "orders"
    assert leaf.key.curve.name == "secp256r1"
    assert leaf.chain == ()


def test_spiffe_id_defaults_to_trust_domain_and_name(tmp_path: Path) -> None:
    pki.init_ca(tmp_path / "prod", trust_domain="prod.example")
    assert pki.trust_domain_of(pki.load_ca(tmp_path / "prod")) == "prod.example"
    leaf = pki.issue_to_dir(tmp_path / "prod", "jobs")
    assert _uris(leaf.cert) == ["spiffe://prod.example/jobs"]

    explicit = pki.issue_to_dir(tmp_path / "prod", "jobs2", spiffe_id="spiffe://prod.example/jobs/nightly")
    assert _uris(explicit.cert) == ["spiffe://prod.example/jobs/nightly"]


def test_spiffe_id_falls_back_to_mesh_local_for_a_ca_without_trust_domain(tmp_path: Path) -> None:
    pki.write_issued(pki.new_ca(), tmp_path / "ca.pem", tmp_path / "ca-key.pem")
    leaf = pki.issue_to_dir(tmp_path, "web")
    assert _uris(leaf.cert) == ["spiffe://mesh.local/web"]


def test_leaf_variants_for_tests() -> None:
    ca = pki.new_ca()
    bare = pki.issue(ca, common_name="bare")
    with pytest.raises(x509.ExtensionNotFound):
        bare.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)

    full = pki.issue(
        ca,
        spiffe_ids=["spiffe://td/a", "https://example.org/x"],
        dns_names=["*.mesh.local"],
        ip_addresses=["127.0.0.1", "::1"],
        organizational_units=["payments", "ops"],
    )
    san = full.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert not san.critical  # the subject is not empty: it has OUs
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://td/a",
        "https://example.org/x",
    ]
    assert san.value.get_values_for_type(x509.DNSName) == ["*.mesh.local"]
    assert [str(ip) for ip in san.value.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    ous = [a.value for a in full.cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)]
    assert ous == ["payments", "ops"]
    assert not full.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)

    anonymous = pki.issue(ca, spiffe_ids=["spiffe://td/anon"])
    assert anonymous.cert.subject == x509.Name([])
    # An empty subject puts the identity in the SAN, which must then be critical (RFC 5280 4.2.1.6).
    assert anonymous.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).critical

    past = datetime(2020, 1, 1, tzinfo=UTC)
    expired = pki.issue(ca, common_name="old", not_before=past, not_after=past + timedelta(days=1))
    assert expired.cert.not_valid_after_utc == past + timedelta(days=1)

    with pytest.raises(PKIError, match="not an IP address"):
        pki.issue(ca, ip_addresses=["999.1.1.1"])
    with pytest.raises(PKIError, match="before it starts"):
        pki.issue(ca, not_before=past, not_after=past - timedelta(seconds=1))


def test_default_validity_starts_five_minutes_early() -> None:
    before = datetime.now(UTC)
    leaf = pki.issue(pki.new_ca())
    skew = before - leaf.cert.not_valid_before_utc
    assert timedelta(minutes=4, seconds=58) <= skew <= timedelta(minutes=5, seconds=2)
    assert leaf.cert.not_valid_after_utc - leaf.cert.not_valid_before_utc == timedelta(hours=24)


@pytest.mark.parametrize("hours", [1.0, 2.5, 24 * 30])
def test_hours_sets_the_lifetime(ca_dir: Path, hours: float) -> None:
    leaf = pki.issue_to_dir(ca_dir, "short", hours=hours)
    on_disk = x509.load_pem_x509_certificate((ca_dir / "short/cert.pem").read_bytes())
    assert on_disk == leaf.cert
    assert on_disk.not_valid_after_utc - on_disk.not_valid_before_utc == timedelta(hours=hours)


@pytest.mark.parametrize("hours", [0, -1, float("nan"), float("inf"), 1e12])
def test_bad_hours_are_refused(ca_dir: Path, hours: float) -> None:
    with pytest.raises(PKIError, match="hours"):
        pki.issue_to_dir(ca_dir, "x", hours=hours)
    assert not (ca_dir / "x").exists()


def test_cert_pem_is_leaf_then_chain_and_key_pem_is_pkcs8() -> None:
    root = pki.new_ca("root")
    intermediate = pki.new_ca("intermediate", issuer=root)
    leaf = pki.issue(intermediate, common_name="leaf")

    assert x509.load_pem_x509_certificates(leaf.cert_pem()) == [leaf.cert, intermediate.cert]
    assert x509.load_pem_x509_certificates(intermediate.cert_pem()) == [
        intermediate.cert,
        root.cert,
    ]
    assert leaf.key_pem().startswith(b"-----BEGIN PRIVATE KEY-----")
    loaded = serialization.load_pem_private_key(leaf.key_pem(), password=None)
    assert loaded.public_key() == leaf.cert.public_key()


def test_crl_lists_the_serial_and_is_signed_by_the_ca() -> None:
    ca = pki.new_ca()
    leaf, other = pki.issue(ca), pki.issue(ca)
    crl = x509.load_pem_x509_crl(pki.make_crl(ca, [leaf.cert.serial_number], next_update_hours=2))

    assert crl.get_revoked_certificate_by_serial_number(leaf.cert.serial_number) is not None
    assert crl.get_revoked_certificate_by_serial_number(other.cert.serial_number) is None
    assert crl.issuer == ca.cert.subject
    assert crl.is_signature_valid(ca.key.public_key())
    assert crl.next_update_utc is not None and crl.last_update_utc is not None
    assert crl.next_update_utc - crl.last_update_utc == timedelta(hours=2, minutes=5)


# --- files ----------------------------------------------------------------------------------------


def test_init_writes_ca_files_with_private_key_mode(ca_dir: Path) -> None:
    assert _mode(ca_dir / "ca-key.pem") == 0o600
    assert _mode(ca_dir / "ca.pem") == 0o644
    ca = pki.load_ca(ca_dir)
    assert ca.key.public_key() == ca.cert.public_key()
    assert sorted(p.name for p in ca_dir.iterdir()) == ["ca-key.pem", "ca.pem"]


def test_issue_writes_key_0600_and_cert_leaf_first(ca_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "elsewhere" / "orders"
    leaf = pki.issue_to_dir(ca_dir, "orders", out=out)

    assert _mode(out / "key.pem") == 0o600
    assert (out / "key.pem").read_bytes() == leaf.key_pem()
    assert x509.load_pem_x509_certificates((out / "cert.pem").read_bytes())[0] == leaf.cert
    assert not (ca_dir / "orders").exists()


def test_reissue_replaces_both_files_with_a_new_matching_pair(ca_dir: Path) -> None:
    first = pki.issue_to_dir(ca_dir, "orders")
    old_cert, old_key = (
        (ca_dir / "orders/cert.pem").read_bytes(),
        (ca_dir / "orders/key.pem").read_bytes(),
    )

    second = pki.issue_to_dir(ca_dir, "orders")

    new_cert, new_key = (
        (ca_dir / "orders/cert.pem").read_bytes(),
        (ca_dir / "orders/key.pem").read_bytes(),
    )
    assert new_cert != old_cert and new_key != old_key
    assert second.cert.serial_number != first.cert.serial_number
    on_disk = x509.load_pem_x509_certificate(new_cert)
    assert on_disk.serial_number == second.cert.serial_number
    assert serialization.load_pem_private_key(new_key, password=None).public_key() == on_disk.public_key()
    assert _mode(ca_dir / "orders/key.pem") == 0o600
    assert sorted(p.name for p in (ca_dir / "orders").iterdir()) == ["cert.pem", "key.pem"]


def test_issue_writes_the_key_before_the_cert(ca_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written: list[str] = []
    real = pki.write_atomic

    def record(path: Path, data: bytes, mode: int = 0o644) -> None:
        written.append(Path(path).name)
        real(path, data, mode)

    monkeypatch.setattr(pki, "write_atomic", record)
    pki.issue_to_dir(ca_dir, "orders")
    assert written == ["key.pem", "cert.pem"]


def test_init_refuses_to_overwrite_an_existing_ca(ca_dir: Path) -> None:
    original = (ca_dir / "ca.pem").read_bytes()
    with pytest.raises(PKIError, match=r"ca\.pem.*already exists"):
        pki.init_ca(ca_dir)
    assert (ca_dir / "ca.pem").read_bytes() == original

    pki.init_ca(ca_dir, force=True)
    assert (ca_dir / "ca.pem").read_bytes() != original


def test_init_refuses_when_only_the_key_exists(tmp_path: Path) -> None:
    (tmp_path / "ca-key.pem").write_bytes(b"precious")
    with pytest.raises(PKIError, match=r"ca-key\.pem.*already exists"):
        pki.init_ca(tmp_path)
    assert (tmp_path / "ca-key.pem").read_bytes() == b"precious"
    assert not (tmp_path / "ca.pem").exists()


def test_init_rejects_a_bad_trust_domain(tmp_path: Path) -> None:
    with pytest.raises(PKIError, match="trust domain"):
        pki.init_ca(tmp_path / "ca", trust_domain="Mesh.Local:8443")
    assert not (tmp_path / "ca").exists()


@pytest.mark.parametrize("mode", [0o600, 0o644])
def test_write_atomic_sets_mode_and_leaves_no_temp_files(tmp_path: Path, mode: int) -> None:
    target = tmp_path / "file.pem"
    target.write_bytes(b"old")
    pki.write_atomic(target, b"new contents", mode)

    assert target.read_bytes() == b"new contents"
    assert _mode(target) == mode
    assert [p.name for p in tmp_path.iterdir()] == ["file.pem"]


def test_write_atomic_temp_file_is_never_more_open_than_the_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[int] = []
    real_replace = os.replace

    def spy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        seen.append(stat.S_IMODE(os.stat(src).st_mode))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    old_umask = os.umask(0)  # even with no umask to help, the temp file starts private
    try:
        pki.write_atomic(tmp_path / "key.pem", b"secret", 0o600)
    finally:
        os.umask(old_umask)
    assert seen == [0o600]


def test_write_atomic_cleans_up_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "a-directory"
    target.mkdir()
    with pytest.raises(PKIError, match="a-directory"):
        pki.write_atomic(target, b"data")  # renaming a file over a directory fails
    assert [p.name for p in tmp_path.iterdir()] == ["a-directory"]
    assert list(target.iterdir()) == []

    with pytest.raises(PKIError, match="missing"):
        pki.write_atomic(tmp_path / "missing" / "file.pem", b"data")


@pytest.mark.parametrize(
    "spiffe_id",
    [
        "http://mesh.local/orders",
        "spiffe:/mesh.local/orders",
        "spiffe://",
        "spiffe:///orders",
        "spiffe://mesh.local",
        "spiffe://mesh.local/",
        "spiffe://Mesh.Local/orders",
        "spiffe://mesh.local:8443/orders",
        "spiffe://user@mesh.local/orders",
        "spiffe://mesh.local/a//b",
        "spiffe://mesh.local/a/../b",
        "spiffe://mesh.local/orders?x=1",
        "spiffe://mesh.local/orders#frag",
        "spiffe://mesh.local/sp ace",
        "spiffe://mesh.local/orders\n",  # a regular expression's '$' would have let this through
        "spiffe://mesh.local\n/orders",
    ],
)
def test_bad_spiffe_id_is_refused_and_nothing_written(ca_dir: Path, spiffe_id: str) -> None:
    with pytest.raises(PKIError, match="invalid SPIFFE ID"):
        pki.issue_to_dir(ca_dir, "orders", spiffe_id=spiffe_id)
    assert not (ca_dir / "orders").exists()


def test_validate_spiffe_id_accepts_good_ids() -> None:
    good = "spiffe://mesh.local/ns/prod/sa/billing-v2_x.y"
    assert pki.validate_spiffe_id(good) == good
    assert pki.validate_spiffe_id("spiffe://mesh.local", require_path=False) == "spiffe://mesh.local"


@pytest.mark.parametrize("name", ["", ".", "..", "../escape", "a/b", ".hidden", "x" * 65, "sp ace", "orders\n"])
def test_bad_name_is_refused(ca_dir: Path, name: str) -> None:
    with pytest.raises(PKIError, match="invalid name"):
        pki.issue_to_dir(ca_dir, name)
    assert sorted(p.name for p in ca_dir.iterdir()) == ["ca-key.pem", "ca.pem"]


@pytest.mark.parametrize(
    "dns", ["", "-bad.local", "a..b", "bücher.de", "a.*.local", "under score ok", "orders.local\n"]
)
def test_bad_dns_name_is_refused(ca_dir: Path, dns: str) -> None:
    with pytest.raises(PKIError, match="invalid DNS name"):
        pki.issue_to_dir(ca_dir, "orders", dns_names=[dns])


def test_load_ca_on_a_missing_dir_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(PKIError) as info:
        pki.load_ca(missing)
    assert str(missing / "ca.pem") in str(info.value)
    assert "no such file" in str(info.value)


def test_load_ca_reports_a_bad_or_mismatched_key(ca_dir: Path) -> None:
    key_path = ca_dir / "ca-key.pem"
    key_path.write_bytes(b"garbage")
    with pytest.raises(PKIError, match=rf"reading CA key '{key_path}': "):
        pki.load_ca(ca_dir)

    key_path.write_bytes(pki.new_ca().key_pem())
    with pytest.raises(PKIError, match="does not match the certificate"):
        pki.load_ca(ca_dir)


def test_load_ca_refuses_a_leaf_as_ca(ca_dir: Path, tmp_path: Path) -> None:
    leaf = pki.issue(pki.load_ca(ca_dir), common_name="leaf")
    fake = tmp_path / "fake"
    fake.mkdir()
    pki.write_issued(leaf, fake / "ca.pem", fake / "ca-key.pem")
    with pytest.raises(PKIError, match="not a CA certificate"):
        pki.load_ca(fake)


def test_an_intermediate_ca_dir_issues_leaves_carrying_the_intermediate(tmp_path: Path) -> None:
    root = pki.new_ca("root", trust_domain="mesh.local")
    intermediate = pki.new_ca("intermediate", issuer=root)
    pki.write_issued(intermediate, tmp_path / "ca.pem", tmp_path / "ca-key.pem")

    loaded = pki.load_ca(tmp_path)
    assert loaded.cert == intermediate.cert and loaded.chain == (root.cert,)
    pki.issue_to_dir(tmp_path, "orders")
    presented = x509.load_pem_x509_certificates((tmp_path / "orders/cert.pem").read_bytes())
    assert presented[1:] == [intermediate.cert]
    assert _uris(presented[0]) == ["spiffe://mesh.local/orders"]
