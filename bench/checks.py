"""Proof that a pair works and is as strict as claimed, before a single number is taken from it.

Through the pair: an HTTP request gets ``200``. Against its server side directly: no client
certificate, a certificate from another CA, and a TLS 1.2-only client are each refused (no HTTP
answer comes back). A misconfigured peer (verification off, TLS 1.2 allowed) therefore fails here
and is not measured, instead of looking fast. The middle hop's protocol and suite are then read
from the server side's own log of the checking request. An HBONE pair's server side is probed as
an HBONE peer would: ALPN h2, then the request inside a CONNECT stream to the HTTP backend.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections import Counter
from typing import Any

from .certs import Certs, Leaf
from .pairs import Running

REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
TIMEOUT = 5.0


class CheckFailed(Exception):
    pass


def http_get(port: int, host: str = "127.0.0.1", request: bytes = REQUEST) -> bytes:
    """Send one request and return the response's status line (b"" when the connection just closed)."""
    with socket.create_connection((host, port), timeout=TIMEOUT) as s:
        s.sendall(request)
        return _status_line(s)


def _status_line(s: socket.socket) -> bytes:
    buf = b""
    while b"\r\n" not in buf:
        data = s.recv(4096)
        if not data:
            break
        buf += data
    return buf.split(b"\r\n", 1)[0]


def _context(certs: Certs, leaf: Leaf | None, *, tls12: bool = False) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(certs.ca))
    ctx.check_hostname = False
    if tls12:
        # Set both bounds: a MinProtocol from an OpenSSL config must not make this probe offer nothing.
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    else:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if leaf is not None:
        ctx.load_cert_chain(str(leaf.cert), str(leaf.key))
    return ctx


def refused(port: int, ctx: ssl.SSLContext, tunnel_target: int | None = None) -> tuple[bool, str]:
    """(True, how) when the server refuses: handshake error, or the request gets no HTTP answer.
    ``tunnel_target``: the server side speaks HBONE; the request goes in a CONNECT stream there."""
    if tunnel_target is not None:
        ctx.set_alpn_protocols(["h2"])
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as s,
        ):
            if tunnel_target is None:
                s.sendall(REQUEST)
                line = _status_line(s)
            else:
                line = _through_tunnel(s, tunnel_target)
    except ssl.SSLError as exc:
        if "NO_PROTOCOLS_AVAILABLE" in str(exc) or "NO_CIPHERS_AVAILABLE" in str(exc):
            raise CheckFailed(f"the check's own TLS client could not offer anything: {exc}") from None
        return True, f"TLS error: {exc.reason or exc}"
    except OSError as exc:
        return True, f"closed: {exc.strerror or exc}"
    if line.startswith(b"HTTP/"):
        return False, f"answered {line.decode(errors='replace')!r}"
    return True, "closed without an answer"


def _through_tunnel(s: ssl.SSLSocket, target: int) -> bytes:
    """CONNECT 127.0.0.1:``target`` over HTTP/2, send ``REQUEST`` in it, return the answer's status
    line (b"" when the stream or the connection is refused or closed)."""
    import h2.config
    import h2.connection
    import h2.events

    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    conn.send_headers(1, [(b":method", b"CONNECT"), (b":authority", f"127.0.0.1:{target}".encode())])
    s.sendall(conn.data_to_send())
    body, opened = b"", False
    while b"\r\n" not in body:
        data = s.recv(65536)
        if not data:
            return b""
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                if dict(event.headers).get(b":status") != b"200":
                    return b""
                opened = True
                conn.send_data(1, REQUEST)
            elif isinstance(event, h2.events.DataReceived):
                body += event.data
            elif isinstance(event, (h2.events.StreamReset, h2.events.ConnectionTerminated)):
                return b""
        s.sendall(conn.data_to_send())
    return body.split(b"\r\n", 1)[0] if opened else b""


def check(run: Running, certs: Certs, *, request: bytes = REQUEST, expect: bytes = b"HTTP/1.1 200") -> dict[str, Any]:
    """Raise ``CheckFailed`` unless the pair passes; return what was seen."""
    seen: dict[str, Any] = {}
    offset = run.log_offset()
    line = http_get(run.http_port, run.host, request)
    if not line.startswith(expect):
        raise CheckFailed(f"a request through {run.pair} got {line!r}, not {expect.decode()}")
    seen["request"] = line.decode(errors="replace")
    if run.parse is not None:
        # Read the suite before the probes below add connections of their own to the log.
        seen["negotiated"] = negotiated(run, offset)
        suite = seen["negotiated"].get("suite")
        if suite is not None and not suite.startswith("TLSv1.3 "):
            raise CheckFailed(f"{run.pair}'s middle hop negotiated {suite}, not TLS 1.3")
    if run.tls_port is None:
        return seen  # no server side to probe directly (direct; a capture pair's refuses what is not redirected)
    probes = {
        "no_client_cert": _context(certs, None),
        "unknown_ca": _context(certs, certs.rogue),
        "tls12": _context(certs, certs.client, tls12=True),
    }
    for name, ctx in probes.items():
        ok, how = refused(run.tls_port, ctx, run.tunnel_target)
        if not ok:
            raise CheckFailed(f"{run.pair}'s server side accepted a {name.replace('_', ' ')} client: {how}")
        seen[f"refused_{name}"] = how
    # A control: the same probe with the right certificate gets through (so the refusals mean something).
    ok, how = refused(run.tls_port, _context(certs, certs.client), run.tunnel_target)
    if ok:
        raise CheckFailed(f"{run.pair}'s server side refused a valid client certificate: {how}")
    return seen


def negotiated(run: Running, offset: int, timeout: float = 3.0) -> dict[str, Any]:
    """The middle hop's protocol and suite, from the server side's log (written when connections end)."""
    deadline = time.monotonic() + timeout
    while True:
        shakes = run.handshakes_since(offset)
        if shakes or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    versions = Counter(f"{h.version} {h.cipher}" for h in shakes if h.version)
    if not versions:
        return {"suite": None, "source": "not in the server side's log at this log level"}
    (suite, _), *_ = versions.most_common(1)
    return {"suite": suite, "source": "server side's access log", "connections": sum(versions.values())}
