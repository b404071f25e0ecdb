"""The sidecar's one vocabulary of errors, by whose fault it was.

``SidecarError``: a problem the user can fix (bad config, bad files); the CLI maps those to exit
code 2 with the message alone. ``PeerError``: something the far end of one connection did, or its
socket suffered; it ends that connection, is counted and logged, and is never fatal to the process.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class SidecarError(Exception):
    """A problem the user can fix; its message names the key or file at fault."""


class ConfigError(SidecarError):
    """The configuration is invalid; the message starts with the YAML path (``inbound[0].listen``)."""


class CertificateError(SidecarError):
    """A certificate, key, CA bundle or CRL file is missing, unreadable or unusable."""


class PKIError(SidecarError):
    """``sidecar pki`` could not create or issue what was asked."""


class WorkerError(SidecarError):
    """A worker process did not do what its supervisor asked (the message names it)."""


class PeerError(Exception):
    """One connection's far end failed it: a TLS error, or the socket failed or closed too early.

    ``reason`` is a class from ``tlserrors.REASONS`` (the ``reason`` label of handshake failures);
    the message is a short, key-free text for the access record.
    """

    def __init__(self, reason: str, text: str) -> None:
        super().__init__(text)
        self.reason = reason
        self.text = text


class TLSFailure(PeerError):
    """OpenSSL refused what the peer sent (or what it sent in answer to us)."""


class RelayBug(RuntimeError):
    """An event arrived that the relay's current state does not allow: a bug in its driver."""
