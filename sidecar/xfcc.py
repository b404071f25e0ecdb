"""The ``x-forwarded-client-cert`` value the app receives for ``client_cert_header: xfcc``.

One pure function of the sidecar's own URI SAN and the verified peer certificate (contract section
9, in Envoy's element format): ``By=<own URI>;Hash=<sha256 hex>;Subject="<RFC 4514>";URI=<peer's
first URI SAN>`` then ``;DNS=<name>`` per DNS SAN. Elements with no value (no own URI, no peer URI)
are left out. Whatever the certificate holds, the result is one valid header field value.
"""

from __future__ import annotations

import functools
import hashlib
import re

from cryptography import x509

HEADER_NAME = b"x-forwarded-client-cert"

# Inside the double-quoted Subject: the contract escapes '"' and '\' with '\'. A control character
# cannot appear in a header at all; it is first written the RFC 4514 way (\XX), which is the same
# name, then the backslash of that escape is itself escaped like any other.
_SUBJECT_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_QUOTED_SPECIAL = re.compile(r'(["\\])')
# By, URI and DNS are bare unless they hold a character the element syntax or a header cannot:
# then bytes outside 0x21-0x7E are percent-encoded (a valid URI or DNS name has none) and a value
# with , ; = " \ is double-quoted with " and \ escaped, as Envoy does.
_NOT_BARE = re.compile(r'[^\x21-\x7e]|[,;="\\]')
_NOT_VISIBLE = re.compile(r"[^\x21-\x7e]")


@functools.lru_cache(maxsize=1024)
def header_value(own_uri: str | None, peer_der: bytes) -> bytes:
    """The header's value (no name, no CRLF). Cached: a peer's many connections parse its
    certificate once."""
    cert = x509.load_der_x509_certificate(peer_der)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        dns = san.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        uris, dns = [], []
    parts = []
    if own_uri:
        parts.append("By=" + _element(own_uri))
    parts.append("Hash=" + hashlib.sha256(peer_der).hexdigest())
    parts.append("Subject=" + _quoted(_SUBJECT_CONTROL.sub(_hex_escape, cert.subject.rfc4514_string())))
    if uris:
        parts.append("URI=" + _element(uris[0]))
    parts.extend("DNS=" + _element(name) for name in dns)
    return ";".join(parts).encode("utf-8")


def header_line(own_uri: str | None, peer_der: bytes) -> bytes:
    """The whole field line the rewriter adds to each request, without its CRLF."""
    return HEADER_NAME + b": " + header_value(own_uri, peer_der)


def _element(value: str) -> str:
    if not _NOT_BARE.search(value):
        return value
    visible = _NOT_VISIBLE.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode()), value)
    if any(c in visible for c in ',;="\\'):
        return _quoted(visible)
    return visible


def _quoted(value: str) -> str:
    return '"' + _QUOTED_SPECIAL.sub(r"\\\1", value) + '"'


def _hex_escape(match: re.Match[str]) -> str:
    return "\\" + f"{ord(match.group()):02X}"
