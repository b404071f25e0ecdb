"""Outbound: the upstream's identity is verified before a single byte of the app's data leaves.

One sidecar process with one outbound listener per scenario; each upstream is a ``TLSServer`` in a
thread that records every byte it decrypts (and, when its handshake fails, every raw byte that
arrives afterwards), so "the upstream received none of the app's bytes" is observed, not assumed.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import (
    TD,
    BlackHole,
    CertFactory,
    SidecarProcess,
    TLSServer,
    TLSSession,
    kill,
    plain_connect,
    recv_exactly,
    start_sidecar,
    tls_section,
    unlistened_socket,
    wait_for,
    write_config,
)

SECRET = b"app-secret-payload:" + bytes(range(256)) * 16


class Upstreams:
    def __init__(self, ca: CertFactory, rogue_ca: CertFactory) -> None:
        # orders: the right identity, DNS SAN localhost (for hostname verification too)
        self.good = TLSServer(ca.leaf("orders", dns=("localhost",)), ca.ca_file)
        # a valid certificate of our CA, but somebody else's identity
        self.stranger = TLSServer(ca.leaf("stranger", dns=("localhost",)), ca.ca_file)
        # the right SPIFFE ID and DNS name, signed by a CA the sidecar does not trust
        self.rogue = TLSServer(rogue_ca.leaf("orders", spiffe=f"{TD}/orders", dns=("localhost",)), ca.ca_file)
        # trusted, right SPIFFE ID, but no DNS SAN for "localhost"
        self.wrong_name = TLSServer(ca.leaf("orders", dns=("elsewhere.example",)), ca.ca_file)
        # a port that refuses connections until a test starts a server on it
        self.closed_sock = unlistened_socket()
        self.closed_port = self.closed_sock.getsockname()[1]
        self.blackhole = BlackHole()  # connecting there hangs until connect_timeout

    def close(self) -> None:
        for server in (self.good, self.stranger, self.rogue, self.wrong_name):
            server.close()
        self.closed_sock.close()
        self.blackhole.close()


@pytest.fixture(scope="module")
def upstreams(ca: CertFactory, rogue_ca: CertFactory) -> Iterator[Upstreams]:
    u = Upstreams(ca, rogue_ca)
    yield u
    u.close()


@pytest.fixture(scope="module")
def outbound(
    tmp_path_factory: pytest.TempPathFactory, ca: CertFactory, upstreams: Upstreams
) -> Iterator[SidecarProcess]:
    folder: Path = tmp_path_factory.mktemp("outbound")
    orders_only = [f"{TD}/orders"]

    def listener(name: str, upstream: str, server_identity: list[str] | None, **extra: str) -> dict[str, object]:
        spec: dict[str, object] = {"name": name, "listen": "127.0.0.1:0", "upstream": upstream, **extra}
        if server_identity is not None:
            spec["server_identity"] = server_identity
        return spec

    cfg = write_config(
        folder / "out.yaml",
        {
            "tls": tls_section(ca.leaf("frontend"), ca.ca_file),
            "outbound": [
                listener("good", upstreams.good.address, orders_only),
                listener("mismatch", upstreams.stranger.address, orders_only),
                listener("rogue", upstreams.rogue.address, orders_only),
                listener("hostname", f"localhost:{upstreams.good.port}", None),
                listener("wrongname", f"localhost:{upstreams.wrong_name.port}", None),
                listener("closed", f"127.0.0.1:{upstreams.closed_port}", orders_only),
                listener("blackhole", upstreams.blackhole.address, orders_only),
                # an IP upstream verified by the name given as sni
                listener("sni_ok", upstreams.good.address, None, sni="localhost"),
                listener("sni_bad", upstreams.good.address, None, sni="elsewhere.example"),
                listener("v6", upstreams.good.address, orders_only, listen="[::1]:0"),
            ],
            "limits": {"handshake_timeout": "2s", "connect_timeout": "500ms"},
        },
    )
    sc = start_sidecar(cfg)
    yield sc
    assert sc.stop() == 0
    kill(sc)


def last_session(server: TLSServer, count: int) -> TLSSession:
    """The ``count``-th connection the upstream saw, once it has finished."""
    wait_for(lambda: len(server.sessions) >= count)
    session = server.sessions[count - 1]
    assert session.done.wait(10)
    return session


def app_exchange(port: int, payload: bytes = SECRET) -> bytes:
    """The app's side: send ``payload`` through the outbound listener, read what comes back."""
    with plain_connect(port) as s:
        s.sendall(payload)
        try:
            return recv_exactly(s, len(payload))
        except ConnectionResetError:
            return b""


def test_right_identity_gets_the_bytes_through(outbound: SidecarProcess, upstreams: Upstreams) -> None:
    before = len(upstreams.good.plaintext())
    assert app_exchange(outbound.port("good")) == SECRET
    assert upstreams.good.plaintext()[before:] == SECRET
    [rec] = outbound.wait_access(1, "good")
    assert rec["outcome"] == "ok"
    assert rec["direction"] == "outbound"
    assert rec["peer_identity"] == f"{TD}/orders"
    assert rec["tls_version"] == "TLSv1.3"
    assert rec["bytes_to_upstream"] == len(SECRET) and rec["bytes_to_downstream"] == len(SECRET)


def test_wrong_identity_receives_none_of_the_apps_bytes(outbound: SidecarProcess, upstreams: Upstreams) -> None:
    n = len(outbound.access("mismatch"))
    assert app_exchange(outbound.port("mismatch")) == b""
    rec = outbound.wait_access(n + 1, "mismatch")[-1]
    assert rec["outcome"] == "denied"
    assert rec["peer_identity"] == f"{TD}/stranger"
    session = last_session(upstreams.stranger, n + 1)
    assert session.error is None  # the handshake itself succeeded: the refusal is the identity check
    assert bytes(session.plaintext) == b""


def test_upstream_from_rogue_ca_receives_none_of_the_apps_bytes(outbound: SidecarProcess, upstreams: Upstreams) -> None:
    n = len(outbound.access("rogue"))
    assert app_exchange(outbound.port("rogue")) == b""
    rec = outbound.wait_access(n + 1, "rogue")[-1]
    assert rec["outcome"] == "tls_error"
    assert rec["handshake_error"] == "untrusted"
    session = last_session(upstreams.rogue, n + 1)
    assert session.error is not None and "unknown ca" in session.error.lower()
    assert bytes(session.raw_after_failure) == b""  # nothing at all after the handshake attempt
    assert bytes(session.plaintext) == b""


def test_hostname_verification_accepts_matching_dns_san(outbound: SidecarProcess, upstreams: Upstreams) -> None:
    before = len(upstreams.good.plaintext())
    assert app_exchange(outbound.port("hostname"), b"by name") == b"by name"
    assert upstreams.good.plaintext()[before:] == b"by name"
    [rec] = outbound.wait_access(1, "hostname")
    assert rec["outcome"] == "ok"


def test_hostname_verification_refuses_cert_without_the_name(outbound: SidecarProcess, upstreams: Upstreams) -> None:
    assert app_exchange(outbound.port("wrongname")) == b""
    [rec] = outbound.wait_access(1, "wrongname")
    assert rec["outcome"] == "tls_error"
    assert rec["handshake_error"] == "hostname_mismatch"
    session = last_session(upstreams.wrong_name, 1)
    assert session.error is not None
    assert bytes(session.raw_after_failure) == b"" and bytes(session.plaintext) == b""


def test_sni_names_the_upstream_for_hostname_verification(outbound: SidecarProcess, upstreams: Upstreams) -> None:
    assert app_exchange(outbound.port("sni_ok"), b"sni") == b"sni"
    assert outbound.wait_access(1, "sni_ok")[-1]["outcome"] == "ok"
    n = len(upstreams.good.sessions)
    assert app_exchange(outbound.port("sni_bad"), b"sni") == b""
    rec = outbound.wait_access(1, "sni_bad")[-1]
    assert rec["outcome"] == "tls_error"
    assert rec["handshake_error"] == "hostname_mismatch"
    assert all(b"sni" not in bytes(x.plaintext) for x in upstreams.good.sessions[n:])


def test_ipv6_listener(outbound: SidecarProcess, upstreams: Upstreams) -> None:
    host, port = outbound.bound["v6"]
    assert host == "::1"
    with socket.create_connection(("::1", port), timeout=10) as s:
        s.sendall(b"over v6")
        assert recv_exactly(s, 7) == b"over v6"
    [rec] = outbound.wait_access(1, "v6")
    assert rec["outcome"] == "ok"
    assert rec["client"].startswith("[::1]:")


def test_closed_upstream_port_is_upstream_error_and_listener_keeps_serving(
    outbound: SidecarProcess, upstreams: Upstreams, ca: CertFactory
) -> None:
    port = outbound.port("closed")
    with plain_connect(port) as s:
        s.settimeout(10)
        # (the app sends nothing: bytes racing a close that was already made would draw a TCP reset)
        try:
            assert s.recv(100) == b""  # closed, no answer
        except ConnectionResetError:
            pytest.fail("the app's connection was reset instead of closed")
    [rec] = outbound.wait_access(1, "closed")
    assert rec["outcome"] == "upstream_error"
    assert str(upstreams.closed_port) in rec["reason"]
    # the upstream comes up on the same port: the same listener now works
    server = TLSServer(ca.leaf("orders"), ca.ca_file, sock=upstreams.closed_sock)
    assert app_exchange(port, b"now?") == b"now?"
    assert server.plaintext() == b"now?"
    records = outbound.wait_access(2, "closed")
    assert records[1]["outcome"] == "ok"


def test_upstream_connect_timeout_closes_app_cleanly_after_it_wrote(
    outbound: SidecarProcess, upstreams: Upstreams
) -> None:
    # The app's request (headers, then a 1 MiB body, as much as the sockets take) is in before the
    # failure (the dial hangs until connect_timeout); the sidecar reads at most one chunk of it
    # before streaming, so the rest is unread when it gives up, and closing a socket with unread
    # bytes makes Linux answer with a reset, not a close.
    body = b"x" * (1 << 20)
    with plain_connect(outbound.port("blackhole")) as s:
        s.sendall(b"POST / HTTP/1.1\r\nHost: billing\r\nContent-Length: %d\r\n\r\n" % len(body))
        s.setblocking(False)
        sent, deadline = 0, time.monotonic() + 0.3
        while sent < len(body) and time.monotonic() < deadline:
            try:
                sent += s.send(body[sent:])
            except BlockingIOError:
                time.sleep(0.01)
        s.setblocking(True)
        s.settimeout(10)
        try:
            assert s.recv(100) == b""
        except ConnectionResetError:
            pytest.fail("the app's connection was reset instead of closed")
    [rec] = outbound.wait_access(1, "blackhole")
    assert rec["outcome"] == "upstream_error"
    assert "timed out" in rec["reason"]
    assert rec["bytes_to_upstream"] == 0


def test_big_app_write_to_refused_upstream_leaks_nothing(outbound: SidecarProcess, upstreams: Upstreams) -> None:
    # 4 MiB from the app while the upstream is refused: none of it reaches the upstream, the app's
    # connection just ends.
    n = len(outbound.access("rogue"))
    with plain_connect(outbound.port("rogue")) as s:
        s.settimeout(10)
        with contextlib.suppress(TimeoutError, BrokenPipeError, ConnectionResetError):
            s.sendall(b"x" * (4 << 20))
    assert outbound.wait_access(n + 1, "rogue")[-1]["outcome"] == "tls_error"
    session = last_session(upstreams.rogue, n + 1)
    assert session.error is not None
    assert bytes(session.raw_after_failure) == b"" and bytes(session.plaintext) == b""


def test_refused_upstream_access_record_counts_no_forwarded_bytes(
    outbound: SidecarProcess, upstreams: Upstreams
) -> None:
    before = len(outbound.access("mismatch"))
    assert app_exchange(outbound.port("mismatch")) == b""
    rec = outbound.wait_access(before + 1, "mismatch")[-1]
    assert rec["outcome"] == "denied"
    assert upstreams.stranger.plaintext() == b""
    assert rec["bytes_to_upstream"] == 0  # nothing went toward the upstream
