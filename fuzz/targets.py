"""The fuzz targets: functions of one input's bytes that raise when a property breaks.

- ``config``: any bytes as a config file give a ``Config`` or a one-line ``SidecarError``, never
  another exception; an accepted config has finite durations and parsed patterns.
- ``patterns``: an identity pattern and identities (NUL-separated) parse to a ``Pattern`` or a
  one-line ``ValueError``; matching never raises, agrees with ``decide``, matches what a pattern
  names and never matches an invalid SPIFFE ID (by the reference grammar).
- ``spiffe``: ``sidecar.spiffeid`` agrees with ``spiffe_reference`` on every string, and a
  ``PeerIdentity`` sorts the URI the same way.
- ``pin``: the DER reader of ``sidecar.pinning`` gives a pin or ``ValueError`` for any bytes, and
  for any certificate ``cryptography`` reads, the pin of the same public key.
- ``proxy``: the PROXY v2 header built from any facts (addresses of either family or mixed,
  IPv4-mapped, any ports, SNI, CN, certificate and SPIFFE ID of any size) in any mode is
  ``ProxyHeaderError`` exactly when it would pass 65535 bytes, and otherwise reads back, field for
  field, with the independent ``proxy-protocol`` package.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from proxyprotocol.v2 import ProxyProtocolV2

from sidecar import config, pinning, proxy_protocol, spiffeid
from sidecar.errors import ProxyHeaderError, SidecarError
from sidecar.identity import PeerIdentity, Verdict, decide, parse_pattern

from . import spiffe_reference

BASE_DIR = Path("/nonexistent/sidecar-fuzz")  # nothing is read from it: loads() never touches the disk


def one_line(message: str) -> None:
    assert message and len(message.splitlines()) == 1, f"not one line: {message!r}"


def fuzz_config(data: bytes) -> None:
    try:
        cfg = config.loads(data, base_dir=BASE_DIR)
    except SidecarError as exc:
        one_line(str(exc))
        return
    limits = cfg.limits
    for seconds in (
        limits.handshake_timeout,
        limits.connect_timeout,
        limits.idle_timeout,
        limits.drain_timeout,
        cfg.tls.session_lifetime,
    ):
        assert 0 <= seconds < float("inf"), seconds
    for inbound in cfg.inbound:
        assert inbound.allow and all(p.text for p in inbound.allow)


def fuzz_patterns(data: bytes) -> None:
    text, *names = data.decode("utf-8", "replace").split("\x00")
    try:
        pattern = parse_pattern(text)
    except ValueError as exc:
        one_line(str(exc))
        return
    assert pattern.text == text.strip()
    peer = PeerIdentity(uris=tuple(names), dns_names=tuple(names), common_names=tuple(names))
    matched = pattern.matches(peer)
    assert (decide(peer, [pattern]) is Verdict.ALLOWED) == matched
    kind, value = pattern.kind, pattern.value
    if kind.startswith("uri") and spiffe_reference.claims_spiffe(value):
        assert spiffe_reference.is_valid(value), value  # a spiffe:// pattern is a valid ID (or prefix)
        for name in names:
            if not spiffe_reference.is_valid(name):
                assert not pattern.matches(PeerIdentity(uris=(name,))), (pattern, name)
    if kind == "uri":
        assert pattern.matches(PeerIdentity(uris=(value,)))
    if kind in ("uri_one", "uri_many"):
        assert pattern.matches(PeerIdentity(uris=(value + "/x",)))
        assert pattern.matches(PeerIdentity(uris=(value + "/x/y",))) == (kind == "uri_many")
        assert not pattern.matches(PeerIdentity(uris=(value,)))
    if kind == "dns":
        assert pattern.matches(PeerIdentity(dns_names=(value.upper(),)))
    if kind == "spki":
        assert len(base64.b64decode(value, validate=True)) == pinning.DIGEST_SIZE
        assert pattern.matches(PeerIdentity(spki_sha256=value))


def fuzz_spiffe(data: bytes) -> None:
    structured = data[:1] == b"s"  # most random strings never start with the scheme: make half of them
    rest = data[1:] if structured else data
    for text in (rest.decode("latin-1"), rest.decode("utf-8", "replace")):
        uri = spiffeid.PREFIX + text if structured else text
        for require_path in (False, True):
            want = spiffe_reference.is_valid(uri, require_path=require_path)
            problem = spiffeid.problem(uri, require_path=require_path)
            assert (problem is None) == want, (uri, require_path, problem)
            if problem is not None:
                one_line(problem)
        assert spiffeid.claims_spiffe(uri) == spiffe_reference.claims_spiffe(uri), uri
        invalid = spiffe_reference.claims_spiffe(uri) and not spiffe_reference.is_valid(uri)
        peer = PeerIdentity(uris=(uri,))
        assert peer.invalid_spiffe_ids == ((uri,) if invalid else ())
        assert peer.matchable_uris == (() if invalid else (uri,))


def fuzz_pin(data: bytes) -> None:
    try:
        pin = pinning.pin_of_der(data)
    except ValueError:
        pin = None
    else:
        assert len(base64.b64decode(pin, validate=True)) == pinning.DIGEST_SIZE
    try:
        cert = x509.load_der_x509_certificate(data)
        der = serialization.Encoding.DER
        spki = cert.public_key().public_bytes(der, serialization.PublicFormat.SubjectPublicKeyInfo)
    except Exception:  # any certificate or key cryptography cannot read is outside this property
        return
    assert pin == base64.b64encode(hashlib.sha256(spki).digest()).decode(), "pin differs from cryptography's SPKI"


def _address(raw: bytes, family: int) -> str:
    """An address of the family the input picks: IPv4, IPv6, or IPv4-mapped IPv6."""
    if family == 0:
        return str(ipaddress.IPv4Address(raw[:4]))
    if family == 1:
        return str(ipaddress.IPv6Address(raw[:16]))
    return str(ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + raw[:4]))


def fuzz_proxy(data: bytes) -> None:
    head = data[:48].ljust(48, b"\0")
    modes = list(proxy_protocol.Mode)
    mode = modes[head[0] % len(modes)]
    flags = head[1]
    source = (_address(head[8:24], flags % 3), int.from_bytes(head[4:6], "big"))
    destination = (_address(head[24:40], (flags >> 2) % 3), int.from_bytes(head[6:8], "big"))
    sni, cn, spiffe_id, der = (data[48:].split(b"\0", 3) + [b""] * 4)[:4]
    der *= 1 + head[2]  # a certificate past 65535 bytes is a few bytes of input away
    tls = bool(flags & 0x40)
    facts = proxy_protocol.Facts(
        source,
        destination,
        tls_version="TLSv1.3" if tls else None,
        sni=sni.decode("utf-8", "replace") if flags & 0x80 else None,
        peer_cert_der=der if tls and head[3] & 1 else None,
        peer_cn=cn.decode("utf-8", "replace") if head[3] & 2 else None,
        peer_spiffe_id=spiffe_id.decode("utf-8", "replace") if head[3] & 4 else None,
    )
    with_tls = mode is not proxy_protocol.Mode.CONN and tls
    full = with_tls and mode is proxy_protocol.Mode.TLS_FULL and facts.peer_cert_der is not None
    length = _expected_length(facts, with_tls, full)
    try:
        header = proxy_protocol.build_header(mode, facts)
    except ProxyHeaderError as exc:
        one_line(str(exc))
        assert length > 65535, f"refused a header of {length} bytes"
        return
    assert length <= 65535, f"built a header of {length} bytes"
    assert int.from_bytes(header[14:16], "big") == len(header) - 16 == length
    result = ProxyProtocolV2().unpack(header)
    for ours, theirs in ((source, result.source), (destination, result.dest)):
        assert ipaddress.ip_address(theirs[0]) in _same(ours[0]) and theirs[1] == ours[1], (ours, theirs)
    assert (result.tlv.ssl is not None and result.tlv.ssl.version == "TLSv1.3") == with_tls
    if with_tls:
        assert result.tlv.authority == facts.sni
    if full:
        assert result.tlv.ssl[0x28] == der and result.tlv.ssl.cn == facts.peer_cn
        spiffe = result.tlv.get(0xE0)
        assert (spiffe.decode() if spiffe is not None else None) == facts.peer_spiffe_id
    else:
        assert result.tlv.get(0xE0) is None and (result.tlv.ssl is None or result.tlv.ssl.cn is None)


def _expected_length(facts: proxy_protocol.Facts, with_tls: bool, full: bool) -> int:
    """What follows the 16-byte head, counted from the specification's layout (2.2)."""
    ips = [ipaddress.ip_address(a) for a in (facts.source[0], facts.destination[0])]
    both_v4 = all(isinstance(ip, ipaddress.IPv4Address) for ip in ips)
    both_mapped = all(isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped for ip in ips)
    length = 12 if both_v4 or both_mapped else 36  # two IPv4-mapped addresses travel as IPv4
    if not with_tls:
        return length
    tlv = 3  # type and 16-bit length
    length += (tlv + len(facts.sni.encode())) if facts.sni is not None else 0
    length += tlv + 5 + tlv + len(b"TLSv1.3")  # PP2_TYPE_SSL: client, verify, the version sub-TLV
    if full:
        assert facts.peer_cert_der is not None
        length += (tlv + len(facts.peer_cn.encode())) if facts.peer_cn is not None else 0
        length += tlv + len(facts.peer_cert_der)
        length += (tlv + len(facts.peer_spiffe_id.encode())) if facts.peer_spiffe_id is not None else 0
    return length


def _same(text: str) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """An address and its other spelling: a pair of IPv4-mapped addresses travels as IPv4, and an
    IPv4 address beside an IPv6 one travels IPv4-mapped."""
    ip = ipaddress.ip_address(text)
    if isinstance(ip, ipaddress.IPv4Address):
        return {ip, ipaddress.IPv6Address(f"::ffff:{ip}")}
    return {ip} if ip.ipv4_mapped is None else {ip, ip.ipv4_mapped}


TARGETS: dict[str, Callable[[bytes], None]] = {
    "config": fuzz_config,
    "patterns": fuzz_patterns,
    "spiffe": fuzz_spiffe,
    "pin": fuzz_pin,
    "proxy": fuzz_proxy,
}
