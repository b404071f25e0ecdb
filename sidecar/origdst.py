"""Where a captured connection was going, and whether its first bytes are a TLS ClientHello.

``original_dst`` asks conntrack for the destination the connection had before the nat REDIRECT rule
(``sidecar iptables install``) sent it to a capture port: ``SO_ORIGINAL_DST`` for IPv4,
``IP6T_SO_ORIGINAL_DST`` for IPv6. It returns None for a connection made straight to the capture
port, which the capture listeners refuse (that is also what stops a capture loop).

Peeking without consuming, for permissive mode: the relay buffers the first read instead of using
``MSG_PEEK``. The socket belongs to the asyncio/uvloop transport, which reads it on its own; a peek
beside it would race the transport (and busy-loop on a client that sends one byte). The bytes read
first are kept in ``FirstBytes`` until they decide, then handed on unchanged: written into the TLS
leg's incoming ``MemoryBIO`` when they are a ClientHello, or to the app first when they are not.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import Any, Protocol

# <linux/netfilter_ipv4.h> SO_ORIGINAL_DST and <linux/netfilter_ipv6/ip6_tables.h> IP6T_SO_ORIGINAL_DST
SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80
_SOCKADDR_IN = struct.Struct("!2xH4s8x")  # family (host order, skipped), port, address, zero padding
_SOCKADDR_IN6 = struct.Struct("!2xHI16sI")  # family, port, flow info, address, scope id

TLS_HANDSHAKE = 0x16  # TLS record content type
CLIENT_HELLO = 0x01  # handshake message type
MAX_RECORD = 2**14 + 256  # TLSPlaintext.length limit, with room for a lenient client


class Socket(Protocol):
    """What ``original_dst`` needs: a ``socket.socket``, or the socket an asyncio or uvloop
    transport gives through ``get_extra_info("socket")``."""

    @property
    def family(self) -> int: ...

    def getsockname(self) -> Any: ...

    def getsockopt(self, level: int, optname: int, buflen: int, /) -> bytes: ...


def original_dst(sock: Socket) -> tuple[str, int] | None:
    """``(ip, port)`` the connection was addressed to before REDIRECT, or None when it was not
    redirected: no conntrack NAT entry, or the original destination is the socket's own address."""
    local = sock.getsockname()
    local_ip = _unmapped(local[0])
    try:
        if sock.family == socket.AF_INET6 and ipaddress.ip_address(local_ip).version == 6:
            port, _, packed, _ = _SOCKADDR_IN6.unpack(
                sock.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, _SOCKADDR_IN6.size)
            )
            ip = str(ipaddress.IPv6Address(packed))
        else:  # IPv4, also on a dual-stack IPv6 socket whose connection is IPv4 (::ffff:a.b.c.d)
            port, packed = _SOCKADDR_IN.unpack(sock.getsockopt(socket.IPPROTO_IP, SO_ORIGINAL_DST, _SOCKADDR_IN.size))
            ip = str(ipaddress.IPv4Address(packed))
    except OSError:  # ENOENT: conntrack has no entry for it (nothing rewrote it, or conntrack is not loaded)
        return None
    if (ip, port) == (local_ip, local[1]):
        return None
    return ip, port


def format_dst(dst: tuple[str, int]) -> str:
    """The access record's ``original_dst``: ``ip:port``, IPv6 as ``[ip]:port``."""
    ip, port = dst
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _unmapped(ip: str) -> str:
    addr = ipaddress.ip_address(ip.partition("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def looks_like_client_hello(data: bytes | bytearray | memoryview) -> bool | None:
    """Whether a connection's first bytes open a TLS handshake record holding a ClientHello: True,
    False as soon as one byte says otherwise, None while fewer than 6 bytes leave it open.

    Bytes: content type 22, record version 3.0 to 3.4 (TLS 1.3 clients write 3.1 or 3.3), a
    plausible record length, then handshake type 1. A legacy SSLv2-format hello counts as not TLS."""
    b = bytes(data[:6])
    if len(b) >= 1 and b[0] != TLS_HANDSHAKE:
        return False
    if len(b) >= 2 and b[1] != 0x03:
        return False
    if len(b) >= 3 and b[2] > 0x04:
        return False
    if len(b) >= 5 and not 4 <= (b[3] << 8 | b[4]) <= MAX_RECORD:
        return False
    if len(b) >= 6:
        return b[5] == CLIENT_HELLO
    return None


class FirstBytes:
    """The first bytes of a connection, held until they say TLS or not (permissive mode).

    ``feed`` each read until it returns True or False; then ``take`` the bytes and hand them on.
    It never holds more than the reads fed before the verdict, which comes by the 6th byte."""

    def __init__(self) -> None:
        self._held = bytearray()
        self.verdict: bool | None = None

    def feed(self, data: bytes) -> bool | None:
        if self.verdict is not None:
            raise RuntimeError("FirstBytes already decided; take() the bytes and stop feeding")
        self._held += data
        self.verdict = looks_like_client_hello(self._held)
        return self.verdict

    def take(self) -> bytes:
        held, self._held = bytes(self._held), bytearray()
        return held
