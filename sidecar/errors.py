"""The sidecar's one vocabulary of errors, by whose fault it was.

``SidecarError``: a problem the user can fix (bad config, bad files); the CLI maps those to exit
code 2 with the message alone, except ``WorkloadAPIUnavailable`` (exit 1: the config is fine, the
agent is not there). ``PeerError``: something the far end of one connection did, or its socket
suffered; ``Refusal``: what one connection carries cannot be forwarded safely. Either ends that
connection, is counted and logged, and is never fatal to the process. Anything else is a bug and
keeps its traceback.
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


class WorkloadAPIUnavailable(SidecarError):
    """No usable X.509-SVID came from the Workload API socket in time; the message names the socket."""


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


class Refusal(Exception):
    """One connection must be refused: what the caller sent, or what the app would have to be told
    about it, cannot be forwarded safely. Not a process error: the relay closes that connection,
    counts it and logs ``reason`` (a short snake_case label), and everyone else is served."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class ProxyHeaderError(Refusal):
    """The PROXY protocol v2 header cannot carry this connection's facts (a field past 65535 bytes)."""


class HTTPRefusal(Refusal):
    """An HTTP/1.x request on a ``client_cert_header`` path must not reach the app.

    ``status`` is what the caller is told (400, or 431 for a head past the size limit);
    ``forward`` holds the bytes of earlier, valid requests in the same read, which the app must
    still get before the relay acts; ``partial`` is true when part of the refused request (its head
    and some chunks) already went to the app, so the app connection must be aborted, not finished.
    """

    def __init__(self, reason: str, detail: str, *, status: int = 400, partial: bool = False) -> None:
        super().__init__(reason, detail)
        self.status = status
        self.partial = partial
        self.forward = b""


class RelayBug(RuntimeError):
    """An event arrived that the relay's current state does not allow: a bug in its driver."""
