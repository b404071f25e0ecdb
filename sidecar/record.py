"""What one proxied connection came to: its ``Outcome`` and its ``Record``, and the access log.

A ``Record`` is made once, when the connection has ended; the access log and the metrics
subscribe to it (``Listener.finished``). Field names are the access record's (contract section 6,
plus ``reason``, ``handshake_error`` and ``resumed``; ``original_dst`` from section 8, null when the
connection was not captured).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from enum import StrEnum

from .logs import ACCESS, event


class Outcome(StrEnum):
    """How a connection ended: the ``outcome`` label and access-record field."""

    OK = "ok"
    DENIED = "denied"  # the peer's identity is not allowed, or what it sent must not reach the app (400)
    TLS_ERROR = "tls_error"  # the TLS handshake or a record failed
    UPSTREAM_ERROR = "upstream_error"  # the target could not be reached, or failed before streaming
    TIMEOUT = "timeout"  # handshake_timeout or idle_timeout
    LIMIT = "limit"  # refused for a size: max_connections, a request head too large (431), a PROXY header
    PASSTHROUGH = "passthrough"  # plain TCP let through (transparent mode: `unmatched: passthrough`, permissive)


class Direction(StrEnum):
    INBOUND = "inbound"  # mTLS from a peer, plaintext to the local app
    OUTBOUND = "outbound"  # plaintext from the local app, mTLS to a peer


@dataclass(frozen=True, slots=True)
class Record:
    listener: str
    direction: Direction
    client: str  # the connecting side's address
    outcome: Outcome
    original_dst: str | None = None  # transparent mode: where the connection was going (``ip:port``)
    reason: str | None = None  # free text: why it ended so
    peer_identity: str | None = None  # the verified TLS peer, as ``PeerIdentity.describe`` says
    handshake_error: str | None = None  # the handshake failure's class (``tlserrors.REASONS``)
    bytes_to_upstream: int = 0
    bytes_to_downstream: int = 0
    duration_ms: float = 0.0
    tls_version: str | None = None
    cipher: str | None = None
    resumed: bool = False


def log_access(record: Record) -> None:
    """The one access record of a connection; ``info`` for ``ok`` and ``passthrough``, ``warning``
    otherwise."""
    level = logging.INFO if record.outcome in _FINE else logging.WARNING
    if ACCESS.isEnabledFor(level):
        event(ACCESS, level, "connection", **{name: getattr(record, name) for name in _FIELDS})


_FIELDS = tuple(f.name for f in fields(Record))
_FINE = frozenset({Outcome.OK, Outcome.PASSTHROUGH})
