"""The PROXY protocol v2 header the app reads first when ``proxy_protocol`` is set (contract section 9).

Built once per connection from typed facts, byte-exact to HAProxy's ``doc/proxy-protocol.txt``
(section 2.2 and its TLVs) and to ghostunnel's three modes; nothing here does I/O or sees the stream.

Choices where the specification leaves room, fixed here and in docs/identity-forwarding.md:
- Command is always PROXY (0x1) with TCP over IPv4 (0x11) or IPv6 (0x21): the sidecar only relays
  real TCP connections, so LOCAL and AF_UNSPEC/AF_UNIX are never sent. When both ends are
  IPv4-mapped IPv6 addresses (a dual-stack ``[::]`` listener), they are sent as IPv4.
- No PP2_TYPE_CRC32C: the header travels one local TCP hop that TCP already checksums, receivers
  need not check it, and nginx ignores it.
- TLVs go in ascending type order (0x02, 0x20, 0xE0), sub-TLVs too (0x21, 0x22, 0x28).
- A value or a header past the 16-bit length fields (65535 bytes) is never truncated: building
  raises ``ProxyHeaderError`` and the relay refuses the connection.
- A connection without TLS (a plaintext client let through by permissive transparent mode) gets
  the ``conn`` header whatever the mode: nothing may claim TLS that did not happen.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from enum import StrEnum

from .errors import ProxyHeaderError
from .identity import PeerIdentity

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
VERSION_PROXY = 0x21  # version 2, command PROXY
TCP_OVER_IPV4 = 0x11
TCP_OVER_IPV6 = 0x21

PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_SSL = 0x20
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_SUBTYPE_SSL_CN = 0x22
PP2_SUBTYPE_SSL_CLIENT_CERT = 0x28  # the client certificate, DER, as ghostunnel's tls-full sends it
PP2_TYPE_SPIFFE_ID = 0xE0  # first of the PP2_TYPE_MIN_CUSTOM range: the peer's SPIFFE ID

PP2_CLIENT_SSL = 0x01
PP2_CLIENT_CERT_CONN = 0x02
PP2_CLIENT_CERT_SESS = 0x04

MAX_FIELD = 0xFFFF  # the 16-bit length of a TLV value, and of everything after the 16-byte header
_TLV = struct.Struct("!BH")
_PREAMBLE = struct.Struct("!12sBBH")
_SSL_HEAD = struct.Struct("!BI")


class Mode(StrEnum):
    """What the header carries; the values are the config's words."""

    CONN = "conn"  # addresses only
    TLS = "tls"  # + PP2_TYPE_SSL (version) and PP2_TYPE_AUTHORITY (SNI)
    TLS_FULL = "tls-full"  # + the peer's CN, DER certificate and SPIFFE ID


@dataclass(frozen=True)
class Facts:
    """What the relay knows about one accepted connection when it dials the app.

    ``source`` is the peer's address, ``destination`` the local address it connected to, each
    ``(ip, port)``. The TLS fields are None for a connection that had no TLS; ``peer_cert_der`` is
    the verified peer certificate, ``peer_cn`` its subject CN and ``peer_spiffe_id`` its first
    URI SAN, each None when absent.
    """

    source: tuple[str, int]
    destination: tuple[str, int]
    tls_version: str | None = None  # OpenSSL's name, "TLSv1.3"
    sni: str | None = None
    peer_cert_der: bytes | None = None
    peer_cn: str | None = None
    peer_spiffe_id: str | None = None

    @classmethod
    def of_peer(
        cls,
        source: tuple[str, int],
        destination: tuple[str, int],
        *,
        tls_version: str,
        sni: str | None,
        peer_cert_der: bytes,
        identity: PeerIdentity,
    ) -> Facts:
        """The facts of a verified mTLS peer: CN and SPIFFE ID are the first of each in ``identity``
        (decoded from the same certificate), so no certificate is parsed twice."""
        return cls(
            source,
            destination,
            tls_version=tls_version,
            sni=sni,
            peer_cert_der=peer_cert_der,
            peer_cn=identity.common_names[0] if identity.common_names else None,
            peer_spiffe_id=identity.uris[0] if identity.uris else None,
        )


def build_header(mode: Mode, facts: Facts) -> bytes:
    """The whole PROXY v2 header for ``facts`` in ``mode``; raises ``ProxyHeaderError`` when a
    value does not fit the protocol's 16-bit lengths."""
    family, addresses = _addresses(facts.source, facts.destination)
    tlvs = b"" if mode is Mode.CONN or facts.tls_version is None else _tls_tlvs(mode, facts)
    length = len(addresses) + len(tlvs)
    if length > MAX_FIELD:
        raise ProxyHeaderError(
            "proxy_header_too_large", f"PROXY v2 header would carry {length} bytes after its 16-byte head (max 65535)"
        )
    return _PREAMBLE.pack(SIGNATURE, VERSION_PROXY, family, length) + addresses + tlvs


def _addresses(source: tuple[str, int], destination: tuple[str, int]) -> tuple[int, bytes]:
    src, dst = _ip(source[0]), _ip(destination[0])
    src_v4 = src.ipv4_mapped if isinstance(src, ipaddress.IPv6Address) else None
    dst_v4 = dst.ipv4_mapped if isinstance(dst, ipaddress.IPv6Address) else None
    if src_v4 is not None and dst_v4 is not None:
        src, dst = src_v4, dst_v4
    if isinstance(src, ipaddress.IPv4Address) and isinstance(dst, ipaddress.IPv4Address):
        return TCP_OVER_IPV4, struct.pack("!4s4sHH", src.packed, dst.packed, source[1], destination[1])
    six = [a if isinstance(a, ipaddress.IPv6Address) else ipaddress.IPv6Address(f"::ffff:{a}") for a in (src, dst)]
    return TCP_OVER_IPV6, struct.pack("!16s16sHH", six[0].packed, six[1].packed, source[1], destination[1])


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text.partition("%")[0])  # an IPv6 zone (fe80::1%eth0) has no place on the wire


def _tls_tlvs(mode: Mode, facts: Facts) -> bytes:
    assert facts.tls_version is not None
    full = mode is Mode.TLS_FULL and facts.peer_cert_der is not None
    client = PP2_CLIENT_SSL | (PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS if full else 0)
    verify = 0 if facts.peer_cert_der is not None else 1  # 0: a certificate was presented and verified
    subs = [_tlv(PP2_SUBTYPE_SSL_VERSION, facts.tls_version.encode("ascii"))]
    if full:
        assert facts.peer_cert_der is not None
        if facts.peer_cn is not None:
            subs.append(_tlv(PP2_SUBTYPE_SSL_CN, facts.peer_cn.encode("utf-8")))
        subs.append(_tlv(PP2_SUBTYPE_SSL_CLIENT_CERT, facts.peer_cert_der))
    parts = []
    if facts.sni is not None:
        parts.append(_tlv(PP2_TYPE_AUTHORITY, facts.sni.encode("utf-8")))
    parts.append(_tlv(PP2_TYPE_SSL, _SSL_HEAD.pack(client, verify) + b"".join(subs)))
    if full and facts.peer_spiffe_id is not None:
        parts.append(_tlv(PP2_TYPE_SPIFFE_ID, facts.peer_spiffe_id.encode("utf-8")))
    return b"".join(parts)


def _tlv(kind: int, value: bytes) -> bytes:
    if len(value) > MAX_FIELD:
        raise ProxyHeaderError(
            "proxy_header_too_large", f"PROXY v2 TLV 0x{kind:02X} would be {len(value)} bytes (max 65535)"
        )
    return _TLV.pack(kind, len(value)) + value
