"""HBONE: TCP connections carried as HTTP/2 CONNECT streams over one pooled mTLS connection.

Sans-IO, like ``h2`` underneath: ``HboneServer`` and ``HboneClient`` take bytes and calls and
return events and bytes; ``pool`` decides which connection a new stream goes on. The relay owns
sockets, TLS and timers. docs/hbone.md compares this with Istio's ztunnel.
"""

from __future__ import annotations

from .authority import format_authority, parse_authority
from .client import HboneClient, TunnelUnavailable
from .connection import TunnelSettings
from .server import HboneServer

__all__ = [
    "HboneClient",
    "HboneServer",
    "TunnelSettings",
    "TunnelUnavailable",
    "format_authority",
    "parse_authority",
]
