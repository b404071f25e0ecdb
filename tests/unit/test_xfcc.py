"""Tests for sidecar.xfcc: the header value from real certificates, including hostile ones."""

from __future__ import annotations

import hashlib
import re

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from sidecar import pki
from sidecar.xfcc import header_line, header_value

CA = pki.new_ca("xfcc test CA", trust_domain="mesh.local")
FIELD_VALUE = re.compile(rb"[\x21-\x7e\x80-\xff](?:[\t\x20-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?")


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def leaf_with_subject(subject: x509.Name, sans: list[x509.GeneralName]) -> x509.Certificate:
    """A leaf with any subject and SANs, signed by CA (pki.issue only takes well-behaved names)."""
    key = pki.issue(CA, common_name="k").key
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(CA.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(CA.cert.not_valid_before_utc)
        .not_valid_after(CA.cert.not_valid_after_utc)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(CA.key, hashes.SHA256())


def test_the_contract_format() -> None:
    leaf = pki.issue(
        CA, common_name="frontend", spiffe_ids=["spiffe://mesh.local/frontend", "spiffe://mesh.local/other"],
        dns_names=["fe.mesh.local", "fe2.mesh.local"], organizational_units=["web"],
    )  # fmt: skip
    value = header_value("spiffe://mesh.local/orders", der(leaf.cert))
    digest = hashlib.sha256(der(leaf.cert)).hexdigest()
    assert (
        value
        == (
            f'By=spiffe://mesh.local/orders;Hash={digest};Subject="OU=web,CN=frontend";'
            "URI=spiffe://mesh.local/frontend;DNS=fe.mesh.local;DNS=fe2.mesh.local"
        ).encode()
    )
    assert digest == digest.lower() and len(digest) == 64


def test_line_is_name_colon_value() -> None:
    leaf = pki.issue(CA, common_name="a")
    assert header_line(None, der(leaf.cert)) == b"x-forwarded-client-cert: " + header_value(None, der(leaf.cert))


def test_elements_without_a_value_are_left_out() -> None:
    leaf = leaf_with_subject(x509.Name([]), [x509.DNSName("only.dns")])
    value = header_value(None, der(leaf))
    assert value.startswith(b"Hash=")
    assert b';Subject="";DNS=only.dns' in value
    assert b"By=" not in value and b"URI=" not in value


def test_quotes_and_backslashes_in_the_subject_are_escaped() -> None:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, 'a"b\\c,d')])
    value = header_value(None, der(leaf_with_subject(name, [])))
    # RFC 4514 first (CN=a\"b\\c\,d), then every " and \ escaped once more for the quoted string.
    assert b'Subject="CN=a\\\\\\"b\\\\\\\\c\\\\,d"' in value


def test_control_characters_cannot_inject_a_header() -> None:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "a\r\nx-forwarded-client-cert: evil\x00")])
    sans: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier("spiffe://mesh.local/a\r\nX-Admin: 1"),
        x509.DNSName("b\r\nx: y"),
    ]
    value = header_value("spiffe://mesh.local/me", der(leaf_with_subject(name, sans)))
    assert FIELD_VALUE.fullmatch(value), value
    assert b"\r" not in value and b"\n" not in value and b"\x00" not in value
    assert b"\\\\0D\\\\0Ax-forwarded-client-cert" in value  # the CN's CR LF as RFC 4514 hex escapes
    assert b"URI=spiffe://mesh.local/a%0D%0AX-Admin:%201" in value
    assert b"DNS=b%0D%0Ax:%20y" in value


def test_uri_with_element_separators_is_quoted() -> None:
    uri = 'https://x/a;URI=spiffe://td/admin,b="c"'
    value = header_value(None, der(leaf_with_subject(x509.Name([]), [x509.UniformResourceIdentifier(uri)])))
    assert value.endswith(b';URI="https://x/a;URI=spiffe://td/admin,b=\\"c\\""')


def test_non_ascii_subject_is_utf8() -> None:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "zoë")])
    value = header_value(None, der(leaf_with_subject(name, [])))
    assert 'Subject="CN=zoë"'.encode() in value
    assert FIELD_VALUE.fullmatch(value)


def test_cached_per_certificate() -> None:
    leaf = pki.issue(CA, common_name="c")
    first = header_value("spiffe://mesh.local/x", der(leaf.cert))
    assert header_value("spiffe://mesh.local/x", der(leaf.cert)) is first
    assert header_value("spiffe://mesh.local/y", der(leaf.cert)) is not first
