"""sidecar.pinning and ``spki-sha256:`` patterns: the pin is the one openssl computes, it survives
re-issue with the same key and nothing else, malformed DER and malformed pins are refused, and a
peer's pin reaches its identity through a real (in-memory) TLS handshake."""

from __future__ import annotations

import base64
import hashlib
import ssl
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from sidecar import pinning, pki
from sidecar.identity import Verdict, decide, from_certificate, from_peercert, needs_spki, parse_pattern
from tests.support import CertFactory, CertFiles, MemoryLink


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def reencoded_pin(cert: x509.Certificate) -> str:
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


def rsa_cert() -> x509.Certificate:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rsa")])
    ca = pki.new_ca()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(ca.cert.not_valid_before_utc)
        .not_valid_after(ca.cert.not_valid_after_utc)
        .sign(ca.key, hashes.SHA256())
    )


def test_pin_is_the_sha256_of_the_certificates_spki() -> None:
    ca = pki.new_ca()
    for cert in (ca.cert, pki.issue(ca, common_name="leaf").cert, rsa_cert()):
        assert pinning.spki_der(der(cert)) == cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        assert pinning.pin_of_der(der(cert)) == reencoded_pin(cert)


def test_pin_matches_what_openssl_computes(tmp_path: Path) -> None:
    leaf = pki.issue(pki.new_ca(), common_name="leaf")
    pem = tmp_path / "cert.pem"
    pem.write_bytes(leaf.cert_pem())
    pub = subprocess.run(["openssl", "x509", "-in", str(pem), "-pubkey", "-noout"], capture_output=True, check=True)
    spki = subprocess.run(
        ["openssl", "pkey", "-pubin", "-outform", "DER"], input=pub.stdout, capture_output=True, check=True
    ).stdout
    assert pinning.pin_of_der(der(leaf.cert)) == base64.b64encode(hashlib.sha256(spki).digest()).decode()


def test_pin_survives_reissue_with_the_same_key_only() -> None:
    ca = pki.new_ca()
    first = pki.issue(ca, common_name="orders")
    again = pki.issue(ca, common_name="orders", key=first.key, hours=48)
    other = pki.issue(ca, common_name="orders")
    assert again.cert.serial_number != first.cert.serial_number
    pin = pinning.pin_of_der(der(first.cert))
    assert pinning.pin_of_der(der(again.cert)) == pin
    assert pinning.pin_of_der(der(other.cert)) != pin
    pattern = [parse_pattern(pinning.PREFIX + pin)]
    assert decide(from_certificate(again.cert, spki=True), pattern) is Verdict.ALLOWED
    assert decide(from_certificate(other.cert, spki=True), pattern) is Verdict.NOT_ALLOWED
    # without the pin computed, a pin pattern matches nothing: fail closed
    assert decide(from_certificate(first.cert), pattern) is Verdict.NOT_ALLOWED


def test_needs_spki_only_for_pin_patterns() -> None:
    pin = pinning.PREFIX + "A" * 43 + "="
    assert needs_spki([parse_pattern("spiffe://mesh.local/a"), parse_pattern(pin)])
    assert not needs_spki([parse_pattern("spiffe://mesh.local/a"), parse_pattern("*"), parse_pattern("dns:a.b")])
    assert not needs_spki([])


@pytest.mark.parametrize(
    "mangle",
    [
        lambda d: b"",
        lambda d: d[:1],
        lambda d: d[:40],  # cut inside the TBS
        lambda d: b"\x31" + d[1:],  # not a SEQUENCE
        lambda d: d[:1] + b"\x80" + d[2:],  # indefinite length: not DER
        lambda d: d[:1] + b"\x85" + d[2:],  # a five-byte length
        lambda d: d[:1] + b"\x84\xff\xff\xff\xff" + d[2:],  # a length past the end
    ],
)
def test_malformed_der_is_a_value_error(mangle: Callable[[bytes], bytes]) -> None:
    cert_der = der(pki.issue(pki.new_ca(), common_name="leaf").cert)
    with pytest.raises(ValueError):
        pinning.spki_der(mangle(cert_der))


def test_parse_pin_canonicalises_or_says_why() -> None:
    good = base64.b64encode(bytes(k * 91 % 256 for k in range(32))).decode()
    assert "/" in good and "+" in good
    assert pinning.parse_pin(good) == good
    with pytest.raises(ValueError, match="decodes to 20 bytes"):
        pinning.parse_pin(base64.b64encode(bytes(20)).decode())
    with pytest.raises(ValueError, match="not standard base64"):
        pinning.parse_pin(good.replace("/", "_"))
    with pytest.raises(ValueError, match="not standard base64"):
        pinning.parse_pin(good + " ")


def test_a_peers_pin_reaches_its_identity_through_a_handshake(
    ca: CertFactory, server_leaf: CertFiles, client_leaf: CertFiles
) -> None:
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(server_leaf.cert, server_leaf.key)
    server.load_verify_locations(ca.ca_file)
    server.verify_mode = ssl.CERT_REQUIRED
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.load_cert_chain(client_leaf.cert, client_leaf.key)
    client.load_verify_locations(ca.ca_file)
    link = MemoryLink(client, server)
    link.handshake()
    peer_der = link.server.getpeercert(binary_form=True)
    assert peer_der is not None
    peer = from_peercert(link.server.getpeercert(), der=peer_der)
    client_pin = pinning.pin_of_der(der(client_leaf.issued.cert))
    assert peer.spki_sha256 == client_pin
    assert decide(peer, [parse_pattern(pinning.PREFIX + client_pin)]) is Verdict.ALLOWED
    server_pin = pinning.pin_of_der(der(server_leaf.issued.cert))
    assert decide(peer, [parse_pattern(pinning.PREFIX + server_pin)]) is Verdict.NOT_ALLOWED
    assert from_peercert(link.server.getpeercert()).spki_sha256 is None  # only when asked
    assert from_peercert(None, der=b"junk").spki_sha256 is None  # unreadable DER: no pin, matches no pin
