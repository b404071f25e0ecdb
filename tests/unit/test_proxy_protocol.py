"""Tests for sidecar.proxy_protocol: every mode's bytes, parsed back by an independent parser.

The parser is the ``proxy-protocol`` package (PyPI), not ours; where it is lenient (it slices a
truncated TLV without complaint) the tests also check that the TLVs it found fill the header
exactly. HAProxy's own parser reads the same headers in tests/integration/test_proxy_protocol_haproxy.py.
"""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv6Address

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from proxyprotocol.result import ProxyResultIPv4, ProxyResultIPv6
from proxyprotocol.tlv import ProxyProtocolTLV
from proxyprotocol.v2 import ProxyProtocolV2

from sidecar import pki
from sidecar.errors import ProxyHeaderError, Refusal
from sidecar.identity import from_certificate
from sidecar.proxy_protocol import MAX_FIELD, SIGNATURE, Facts, Mode, build_header

CA = pki.new_ca("pp test CA", trust_domain="mesh.local")
LEAF = pki.issue(CA, common_name="frontend", spiffe_ids=["spiffe://mesh.local/frontend"], dns_names=["fe.local"])
DER = LEAF.cert.public_bytes(serialization.Encoding.DER)


def facts(**over: object) -> Facts:
    base: dict[str, object] = {
        "source": ("10.1.2.3", 40000),
        "destination": ("10.9.8.7", 8443),
        "tls_version": "TLSv1.3",
        "sni": "orders.mesh.local",
        "peer_cert_der": DER,
        "peer_cn": "frontend",
        "peer_spiffe_id": "spiffe://mesh.local/frontend",
    }
    base.update(over)
    return Facts(**base)  # type: ignore[arg-type]


def parse(header: bytes) -> ProxyResultIPv4 | ProxyResultIPv6:
    result = ProxyProtocolV2().unpack(header)
    assert isinstance(result, ProxyResultIPv4 | ProxyResultIPv6)
    return result


def tlv_region(header: bytes) -> bytes:
    """The TLV bytes after the address block, checked to be exactly what the length field says."""
    (length,) = struct.unpack("!H", header[14:16])
    assert len(header) == 16 + length
    addr_len = {0x11: 12, 0x21: 36}[header[13]]
    return header[16 + addr_len :]


def assert_tlvs_fill(region: bytes) -> None:
    """Each TLV's length lands exactly on the next one and on the end (no overrun, no slack, no
    duplicate type): re-packing what the package parsed gives the same number of bytes."""
    assert len(bytes(ProxyProtocolTLV(region))) == len(region)


# -- conn ----------------------------------------------------------------------------------------


def test_conn_ipv4_is_the_28_bytes_of_the_specification() -> None:
    header = build_header(Mode.CONN, facts())
    assert header == (
        SIGNATURE + b"\x21\x11\x00\x0c" + bytes([10, 1, 2, 3]) + bytes([10, 9, 8, 7]) + struct.pack("!HH", 40000, 8443)
    )
    result = parse(header)
    assert result.proxied
    assert result.source == (IPv4Address("10.1.2.3"), 40000)
    assert result.dest == (IPv4Address("10.9.8.7"), 8443)
    assert not result.tlv


def test_conn_ipv6() -> None:
    header = build_header(Mode.CONN, facts(source=("fd00::1", 1), destination=("::1", 65535)))
    assert header[12:16] == b"\x21\x21\x00\x24"
    assert len(header) == 16 + 36
    result = parse(header)
    assert result.source == (IPv6Address("fd00::1"), 1)
    assert result.dest == (IPv6Address("::1"), 65535)


def test_ipv4_mapped_pair_is_sent_as_ipv4() -> None:
    header = build_header(Mode.CONN, facts(source=("::ffff:127.0.0.2", 5), destination=("::ffff:127.0.0.1", 6)))
    assert header[13] == 0x11
    assert parse(header).source == (IPv4Address("127.0.0.2"), 5)


def test_mixed_families_become_ipv6() -> None:
    header = build_header(Mode.CONN, facts(source=("127.0.0.2", 5), destination=("::1", 6)))
    result = parse(header)
    assert result.source == (IPv6Address("::ffff:127.0.0.2"), 5)
    assert result.dest == (IPv6Address("::1"), 6)


def test_ipv6_zone_is_dropped() -> None:
    header = build_header(Mode.CONN, facts(source=("fe80::1%eth0", 5), destination=("fe80::2%eth0", 6)))
    assert parse(header).source == (IPv6Address("fe80::1"), 5)


def test_conn_mode_carries_no_tlv_even_with_tls_facts() -> None:
    assert len(build_header(Mode.CONN, facts())) == 28


def test_plaintext_connection_gets_the_conn_header_in_every_mode() -> None:
    plain = facts(tls_version=None, sni=None, peer_cert_der=None, peer_cn=None, peer_spiffe_id=None)
    for mode in Mode:
        assert build_header(mode, plain) == build_header(Mode.CONN, plain)


# -- tls -----------------------------------------------------------------------------------------


def test_tls_mode_bytes() -> None:
    header = build_header(Mode.TLS, facts())
    sni = b"orders.mesh.local"
    ssl_value = b"\x01" + b"\x00\x00\x00\x00" + b"\x21\x00\x07TLSv1.3"
    expected_tlvs = (
        b"\x02" + struct.pack("!H", len(sni)) + sni + b"\x20" + struct.pack("!H", len(ssl_value)) + ssl_value
    )
    assert tlv_region(header) == expected_tlvs


def test_tls_mode_parsed_back() -> None:
    header = build_header(Mode.TLS, facts())
    result = parse(header)
    assert_tlvs_fill(tlv_region(header))
    assert result.tlv.authority == "orders.mesh.local"
    ssl = result.tlv.ssl
    assert ssl.client == 0x01
    assert ssl.has_ssl and not ssl.has_cert_conn and not ssl.has_cert_sess
    assert ssl.verify == 0 and ssl.verified
    assert ssl.version == "TLSv1.3"
    assert ssl.cn is None
    assert 0x28 not in ssl
    assert 0xE0 not in result.tlv


def test_tls_mode_without_sni_has_no_authority() -> None:
    result = parse(build_header(Mode.TLS, facts(sni=None)))
    assert result.tlv.authority is None
    assert result.tlv.ssl.version == "TLSv1.3"


# -- tls-full ------------------------------------------------------------------------------------


def test_tls_full_parsed_back() -> None:
    header = build_header(Mode.TLS_FULL, facts())
    result = parse(header)
    region = tlv_region(header)
    assert_tlvs_fill(region)
    assert [region[0], region[3 + len("orders.mesh.local")]] == [0x02, 0x20]  # ascending type order
    assert result.tlv.authority == "orders.mesh.local"
    ssl = result.tlv.ssl
    assert ssl.client == 0x07
    assert ssl.verify == 0
    assert ssl.version == "TLSv1.3"
    assert ssl.cn == "frontend"
    assert ssl[0x28] == DER
    assert x509.load_der_x509_certificate(ssl[0x28]).serial_number == LEAF.cert.serial_number
    assert result.tlv[0xE0] == b"spiffe://mesh.local/frontend"
    assert bytes(ssl)[5:] and len(bytes(ssl)) == len(result.tlv[0x20])  # sub-TLVs fill the SSL TLV


def test_tls_full_spiffe_id_is_top_level_and_last() -> None:
    header = build_header(Mode.TLS_FULL, facts())
    spiffe = b"spiffe://mesh.local/frontend"
    assert header.endswith(b"\xe0" + struct.pack("!H", len(spiffe)) + spiffe)


def test_tls_full_without_cn_or_uri() -> None:
    leaf = pki.issue(CA, dns_names=["only-dns.local"])
    der = leaf.cert.public_bytes(serialization.Encoding.DER)
    f = Facts.of_peer(
        ("127.0.0.1", 1),
        ("127.0.0.1", 2),
        tls_version="TLSv1.3",
        sni=None,
        peer_cert_der=der,
        identity=from_certificate(leaf.cert),
    )
    result = parse(build_header(Mode.TLS_FULL, f))
    assert result.tlv.ssl.cn is None
    assert result.tlv.ssl[0x28] == der
    assert 0xE0 not in result.tlv
    assert result.tlv.authority is None


def test_of_peer_takes_the_first_cn_and_first_uri() -> None:
    leaf = pki.issue(CA, common_name="a", spiffe_ids=["spiffe://mesh.local/one", "spiffe://mesh.local/two"])
    der = leaf.cert.public_bytes(serialization.Encoding.DER)
    f = Facts.of_peer(
        ("127.0.0.1", 1), ("127.0.0.1", 2), tls_version="TLSv1.3", sni="x", peer_cert_der=der,
        identity=from_certificate(leaf.cert),
    )  # fmt: skip
    assert (f.peer_cn, f.peer_spiffe_id) == ("a", "spiffe://mesh.local/one")


def test_non_ascii_cn_and_uri_are_utf8() -> None:
    result = parse(build_header(Mode.TLS_FULL, facts(peer_cn="zoë", peer_spiffe_id="spiffe://mesh.local/ü")))
    assert result.tlv.ssl.cn == "zoë"
    assert result.tlv[0xE0] == "spiffe://mesh.local/ü".encode()


def test_tls_full_is_a_superset_of_tls() -> None:
    tls = parse(build_header(Mode.TLS, facts()))
    full = parse(build_header(Mode.TLS_FULL, facts()))
    assert set(tls.tlv) <= set(full.tlv)
    assert set(tls.tlv.ssl) <= set(full.tlv.ssl)


# -- limits --------------------------------------------------------------------------------------


def test_header_at_the_65535_limit_is_built() -> None:
    # addresses 12 + SSL TLV (3 + 5 + version 10 + cert 3 + n) = 65535
    n = MAX_FIELD - 12 - 3 - 5 - 10 - 3
    header = build_header(Mode.TLS_FULL, facts(sni=None, peer_cn=None, peer_spiffe_id=None, peer_cert_der=b"x" * n))
    assert len(header) == 16 + MAX_FIELD
    assert parse(header).tlv.ssl[0x28] == b"x" * n


def test_header_past_65535_is_refused_not_truncated() -> None:
    n = MAX_FIELD - 12 - 3 - 5 - 10 - 3 + 1
    with pytest.raises(ProxyHeaderError) as info:
        build_header(Mode.TLS_FULL, facts(sni=None, peer_cn=None, peer_spiffe_id=None, peer_cert_der=b"x" * n))
    assert info.value.reason == "proxy_header_too_large"
    assert isinstance(info.value, Refusal)


def test_single_tlv_past_65535_is_refused() -> None:
    with pytest.raises(ProxyHeaderError, match="0x28"):
        build_header(Mode.TLS_FULL, facts(peer_cert_der=b"x" * (MAX_FIELD + 1)))


def test_tls_mode_never_carries_the_certificate_so_a_huge_one_does_not_matter() -> None:
    header = build_header(Mode.TLS, facts(peer_cert_der=b"x" * (MAX_FIELD + 1)))
    assert parse(header).tlv.ssl.version == "TLSv1.3"
