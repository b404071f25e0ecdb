"""Certificate pins (``spki-sha256:BASE64``): the SHA-256 of a certificate's SubjectPublicKeyInfo.

The hash covers the SPKI's DER bytes exactly as the certificate carries them (what HPKP pins and
``openssl x509 -pubkey | openssl pkey -pubin -outform DER | openssl dgst -sha256`` compute), so
a pin survives re-issue with the same key. They are cut out of the certificate's DER by reading
a handful of DER headers: no full certificate parse per connection. Pure functions, no I/O.
"""

from __future__ import annotations

import base64
import binascii
import hashlib

PREFIX = "spki-sha256:"
DIGEST_SIZE = 32
_SEQUENCE = 0x30
_VERSION = 0xA0  # [0] EXPLICIT, only in v2 and v3 certificates
_INTEGER = 0x02
_MAX_LENGTH_BYTES = 4


def spki_der(cert_der: bytes) -> bytes:
    """The SubjectPublicKeyInfo of a DER certificate, header included; ``ValueError`` if malformed.

    RFC 5280 4.1: Certificate ::= SEQUENCE { tbsCertificate, ... }; TBSCertificate ::= SEQUENCE
    { [0] version OPTIONAL, serialNumber, signature, issuer, validity, subject, subjectPublicKeyInfo, ...}.
    """
    data = memoryview(cert_der)
    cert_start, cert_end = _element(data, 0, len(data), _SEQUENCE)
    pos, tbs_end = _element(data, cert_start, cert_end, _SEQUENCE)
    if pos < tbs_end and data[pos] == _VERSION:
        pos = _element(data, pos, tbs_end, _VERSION)[1]
    pos = _element(data, pos, tbs_end, _INTEGER)[1]  # serial number
    for _field in ("signature", "issuer", "validity", "subject"):
        pos = _element(data, pos, tbs_end, _SEQUENCE)[1]
    end = _element(data, pos, tbs_end, _SEQUENCE)[1]
    return bytes(data[pos:end])


def pin_of_der(cert_der: bytes) -> str:
    """The pin value (standard base64 of the SHA-256 of the SPKI) of a DER certificate."""
    return base64.b64encode(hashlib.sha256(spki_der(cert_der)).digest()).decode("ascii")


def parse_pin(value: str) -> str:
    """The canonical pin value of ``value`` (the text after ``spki-sha256:``); ``ValueError`` says why not."""
    try:
        digest = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(
            f"{value!r} is not standard base64 (A-Z, a-z, 0-9, '+', '/', '=' padding): "
            "print a certificate's pin with 'sidecar pki pin FILE'"
        ) from None
    if len(digest) != DIGEST_SIZE:
        raise ValueError(f"{value!r} decodes to {len(digest)} bytes; a SHA-256 pin is {DIGEST_SIZE}")
    canonical = base64.b64encode(digest).decode("ascii")
    if canonical != value:
        raise ValueError(f"{value!r} is not canonical base64 (expected {canonical!r})")
    return canonical


def _element(data: memoryview, pos: int, limit: int, tag: int) -> tuple[int, int]:
    """(content start, end) of the DER element at ``pos``, which must have ``tag`` and end by ``limit``."""
    if pos + 2 > limit:
        raise ValueError("certificate DER is truncated")
    if data[pos] != tag:
        raise ValueError(f"certificate DER: expected tag 0x{tag:02x} at offset {pos}, found 0x{data[pos]:02x}")
    length = data[pos + 1]
    pos += 2
    if length & 0x80:
        count = length & 0x7F
        if count == 0 or count > _MAX_LENGTH_BYTES or pos + count > limit:
            raise ValueError("certificate DER: unsupported length encoding")
        length = int.from_bytes(data[pos : pos + count], "big")
        pos += count
    end = pos + length
    if end > limit:
        raise ValueError("certificate DER: an element runs past its container")
    return pos, end
