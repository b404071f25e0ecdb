"""Integrity: bytes arrive exactly as sent, any size, both ways at once; half-close is carried.

The path under test is the whole mesh hop: app -> outbound sidecar -> (mTLS) -> inbound sidecar ->
backend, two real processes started once for the module. Half-close is also checked directly
against the inbound sidecar with a TLS client that sends close_notify and keeps reading.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from support import (
    Backend,
    CertFactory,
    SidecarProcess,
    echo_handler,
    plain_connect,
    running_pair,
    tls_client,
    wait_for,
)

BIG = 32 << 20
ANSWER_TAIL = bytes(range(256)) * 4096  # 1 MiB that follows the digest in the "answer" reply
GREETING = b"greeting from the backend, then it stops sending\n"


@dataclass
class Seen:
    """What a backend connection received (and sent), for comparing with the client's side."""

    received_len: int
    received_sha: str
    sent_sha: str = ""


class Backends:
    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.echo = Backend(echo_handler)
        self.exchange = Backend(self._exchange)
        self.answer = Backend(self._answer)
        self.reverse = Backend(self._reverse)

    def all(self) -> list[Backend]:
        return [self.echo, self.exchange, self.answer, self.reverse]

    def _exchange(self, conn: socket.socket) -> None:
        """Send BIG random bytes while reading (and hashing) everything the client sends."""
        payload = os.urandom(BIG)
        sender = threading.Thread(target=_send_then_shut, args=(conn, payload))
        sender.start()
        n, digest = _read_to_eof(conn)
        sender.join()
        self.seen.append(Seen(n, digest, hashlib.sha256(payload).hexdigest()))

    def _answer(self, conn: socket.socket) -> None:
        """Read to EOF first, then answer with the digest of what came and 1 MiB more."""
        n, digest = _read_to_eof(conn)
        self.seen.append(Seen(n, digest))
        conn.sendall(digest.encode() + b"\n" + ANSWER_TAIL)

    def _reverse(self, conn: socket.socket) -> None:
        """Stop sending first (greeting then FIN), keep reading what the client still sends."""
        conn.sendall(GREETING)
        conn.shutdown(socket.SHUT_WR)
        n, digest = _read_to_eof(conn)
        self.seen.append(Seen(n, digest))


def _send_then_shut(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(payload)
    sock.shutdown(socket.SHUT_WR)


def _read_to_eof(sock: socket.socket) -> tuple[int, str]:
    h = hashlib.sha256()
    n = 0
    while data := sock.recv(262144):
        h.update(data)
        n += len(data)
    return n, h.hexdigest()


@pytest.fixture(scope="module")
def backends() -> Iterator[Backends]:
    b = Backends()
    yield b
    for backend in b.all():
        backend.close()


@pytest.fixture(scope="module")
def pair(
    tmp_path_factory: pytest.TempPathFactory, ca: CertFactory, backends: Backends
) -> Iterator[tuple[SidecarProcess, SidecarProcess]]:
    forwards = {
        "echo": backends.echo.address,
        "exchange": backends.exchange.address,
        "answer": backends.answer.address,
        "reverse": backends.reverse.address,
    }
    with running_pair(tmp_path_factory.mktemp("pair"), ca, forwards) as pair:
        yield pair


def test_32_mib_each_way_at_once_arrives_intact(
    pair: tuple[SidecarProcess, SidecarProcess], backends: Backends
) -> None:
    inbound, outbound = pair
    before = len(backends.seen)
    payload = os.urandom(BIG)
    got: list[tuple[int, str]] = []
    with plain_connect(outbound.port("exchange"), timeout=30) as s:
        sender = threading.Thread(target=_send_then_shut, args=(s, payload))
        receiver = threading.Thread(target=lambda: got.append(_read_to_eof(s)))
        sender.start()
        receiver.start()
        sender.join(60)
        receiver.join(60)
    assert not sender.is_alive() and not receiver.is_alive()
    [(received_len, received_sha)] = got
    seen = _wait_seen(backends, before)
    assert seen.received_len == BIG and seen.received_sha == hashlib.sha256(payload).hexdigest()
    assert received_len == BIG and received_sha == seen.sent_sha
    for sc in (outbound, inbound):
        rec = sc.wait_access(1, "exchange")[-1]
        assert rec["outcome"] == "ok", rec
        assert rec["bytes_to_upstream"] == BIG and rec["bytes_to_downstream"] == BIG


def test_ten_thousand_tiny_writes_arrive_intact(
    pair: tuple[SidecarProcess, SidecarProcess], backends: Backends
) -> None:
    _, outbound = pair
    pieces = [bytes([i % 251]) * (1 + i % 3) for i in range(10_000)]
    expected = b"".join(pieces)
    echoed = bytearray()
    with plain_connect(outbound.port("echo"), timeout=30) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def read() -> None:
            while len(echoed) < len(expected) and (data := s.recv(65536)):
                echoed.extend(data)

        reader = threading.Thread(target=read)
        reader.start()
        for piece in pieces:
            s.sendall(piece)
        reader.join(30)
        assert not reader.is_alive()
        s.shutdown(socket.SHUT_WR)
        assert s.recv(10) == b""  # and then the end, carried back
    assert bytes(echoed) == expected


def test_half_close_through_the_pair(pair: tuple[SidecarProcess, SidecarProcess], backends: Backends) -> None:
    _, outbound = pair
    request = os.urandom(300_000)
    with plain_connect(outbound.port("answer"), timeout=30) as s:
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)  # the backend answers only after it sees the end of the request
        reply = _recv_to_eof(s)
    digest = hashlib.sha256(request).hexdigest()
    assert reply == digest.encode() + b"\n" + ANSWER_TAIL
    rec = outbound.wait_access(1, "answer")[-1]
    assert rec["outcome"] == "ok"


def test_half_close_the_other_way_through_the_pair(
    pair: tuple[SidecarProcess, SidecarProcess], backends: Backends
) -> None:
    _, outbound = pair
    before = len(backends.seen)
    late = os.urandom(500_000)
    with plain_connect(outbound.port("reverse"), timeout=30) as s:
        assert _recv_to_eof(s) == GREETING  # the backend finished sending...
        s.sendall(late)  # ...and still receives what the client sends afterwards
        s.shutdown(socket.SHUT_WR)
        assert s.recv(10) == b""
    seen = _wait_seen(backends, before)
    assert seen.received_len == len(late) and seen.received_sha == hashlib.sha256(late).hexdigest()


def test_half_close_with_close_notify_directly_against_inbound(
    pair: tuple[SidecarProcess, SidecarProcess], backends: Backends, ca: CertFactory
) -> None:
    inbound, _ = pair
    request = os.urandom(200_000)
    # a short timeout: the backend answers within milliseconds once the end of the request is carried
    conn = tls_client(inbound.port("answer"), ca.leaf("frontend"), ca.ca_file, timeout=3)
    try:
        conn.sendall(request)
        conn.close_notify()  # TLS half-close: we are done sending, we keep reading
        reply = conn.recv_all()
        assert conn.clean_eof is True  # the answer ended with the sidecar's close_notify
    finally:
        conn.close()
    assert reply == hashlib.sha256(request).hexdigest().encode() + b"\n" + ANSWER_TAIL


def test_tls_client_keeps_sending_after_backend_finished(
    pair: tuple[SidecarProcess, SidecarProcess], backends: Backends, ca: CertFactory
) -> None:
    inbound, _ = pair
    before = len(backends.seen)
    late = os.urandom(400_000)
    conn = tls_client(inbound.port("reverse"), ca.leaf("frontend"), ca.ca_file, timeout=30)
    try:
        assert conn.recv_all() == GREETING
        assert conn.clean_eof is True  # the backend's FIN became close_notify
        conn.sendall(late)
        conn.close_notify()
        seen = _wait_seen(backends, before)
    finally:
        conn.close()
    assert seen.received_len == len(late) and seen.received_sha == hashlib.sha256(late).hexdigest()


def _recv_to_eof(s: socket.socket) -> bytes:
    chunks = []
    while data := s.recv(262144):
        chunks.append(data)
    return b"".join(chunks)


def _wait_seen(backends: Backends, before: int) -> Seen:
    wait_for(lambda: len(backends.seen) > before, timeout=20)
    return backends.seen[before]
