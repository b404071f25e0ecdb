"""Naming why a TLS handshake failed, from the real OpenSSL result (the ``reason`` label), and
describing it in a short, key-free text for the access record.

The documented set: no_client_cert, untrusted, expired, not_yet_valid, revoked, crl_unavailable,
hostname_mismatch, bad_certificate, peer_rejected, protocol_version, protocol, eof, timeout, other.
"""

from __future__ import annotations

import ssl

REASONS = (
    "no_client_cert",
    "untrusted",
    "expired",
    "not_yet_valid",
    "revoked",
    "crl_unavailable",
    "hostname_mismatch",
    "bad_certificate",
    "peer_rejected",
    "protocol_version",
    "protocol",
    "eof",
    "timeout",
    "other",
)

# X509_V_ERR_* codes (openssl/x509_vfy.h)
_VERIFY_CODES = {
    2: "untrusted",  # unable to get issuer certificate
    3: "crl_unavailable",  # unable to get certificate CRL
    7: "untrusted",  # certificate signature failure
    9: "not_yet_valid",
    10: "expired",
    18: "untrusted",  # self-signed certificate
    19: "untrusted",  # self-signed certificate in chain
    20: "untrusted",  # unable to get local issuer certificate
    21: "untrusted",  # unable to verify the first certificate
    23: "revoked",
    62: "hostname_mismatch",
    64: "hostname_mismatch",  # IP address mismatch
}

_REASON_CODES = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "no_client_cert",
    "UNSUPPORTED_PROTOCOL": "protocol_version",
    "WRONG_SSL_VERSION": "protocol_version",
    "NO_PROTOCOLS_AVAILABLE": "protocol_version",
    "UNSUPPORTED_SSL_VERSION": "protocol_version",
    "TLSV1_ALERT_PROTOCOL_VERSION": "protocol_version",
    "TLSV1_ALERT_UNKNOWN_CA": "peer_rejected",
    "SSLV3_ALERT_BAD_CERTIFICATE": "peer_rejected",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "peer_rejected",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "peer_rejected",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "peer_rejected",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "peer_rejected",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "peer_rejected",
    "TLSV1_ALERT_ACCESS_DENIED": "peer_rejected",
}


def classify(exc: BaseException) -> str:
    """One value of ``REASONS`` for a handshake failure."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _VERIFY_CODES.get(exc.verify_code, "bad_certificate")
    if isinstance(exc, ssl.SSLEOFError | ConnectionError):
        return "eof"
    if isinstance(exc, ssl.SSLError):
        reason = getattr(exc, "reason", None) or ""
        return _REASON_CODES.get(reason, "protocol")
    return "other"


def describe(exc: BaseException) -> str:
    """A short, key-free description of a TLS or socket error for logs."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return str(getattr(exc, "reason", None) or exc)
    return str(exc) or type(exc).__name__
