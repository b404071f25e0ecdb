"""HBONE: TCP connections carried as HTTP/2 CONNECT streams over one pooled mTLS connection.

Sans-IO, like ``h2`` underneath: ``HboneServer`` and ``HboneClient`` take bytes and calls and
return events and bytes; ``pool`` decides which connection a new stream goes on. In the process:
``streamleg`` (a stream as a leg of the relay), ``tunnel`` (one TLS connection and its streams),
``inbound`` (the ``hbone`` listener) and ``outbound`` (``tunnel: hbone`` listeners and their pool).
docs/hbone.md compares this with Istio's ztunnel.
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
