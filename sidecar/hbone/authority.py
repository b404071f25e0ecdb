"""The ``:authority`` of an HBONE CONNECT request: ``host:port``, IPv6 as ``[addr]:port``.

HTTP/2 CONNECT (RFC 9113 8.5) carries only the authority form, never a path or userinfo. A value
that is not exactly that is malformed and gets a 400; port 0 is not a destination.
"""

from __future__ import annotations

import ipaddress
import re

# A registered name (RFC 3986 reg-name without percent-encoding or sub-delims) or an IPv4 address.
_HOST = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")
_PORT = re.compile(r"^[0-9]{1,5}$")


def parse_authority(text: str) -> tuple[str, int]:
    """``(host, port)`` from ``host:port`` or ``[v6]:port``; ``ValueError`` when malformed."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError("expected [ipv6]:port")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError("not an IPv6 address in brackets") from None
    else:
        host, sep, port = text.rpartition(":")
        if not sep or not _HOST.match(host):
            raise ValueError("expected host:port")
    if not _PORT.match(port) or not 1 <= int(port) <= 65535:
        raise ValueError("port must be 1-65535")
    return host, int(port)


def format_authority(host: str, port: int) -> str:
    """The authority text for ``host`` and ``port``; IPv6 addresses get brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
