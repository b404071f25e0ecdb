"""Tests for sidecar.origdst without redirection: the ClientHello test on real ClientHellos and on
plaintext, the first-bytes buffer, and ``original_dst`` on loopback connections nothing redirected.

The redirected case needs nat rules, so it is proved in namespaces (tests/netns/test_netns_capture.py)."""

from __future__ import annotations

import socket
import ssl

import pytest

from sidecar.origdst import FirstBytes, format_dst, looks_like_client_hello, original_dst


def client_hello(**kwargs: object) -> bytes:
    """The first flight a real Python TLS 1.3 client writes."""
    ctx = ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="orders.mesh.local")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def test_a_real_client_hello_is_recognised_from_its_sixth_byte() -> None:
    hello = client_hello()
    assert len(hello) > 6
    for n in range(6):
        assert looks_like_client_hello(hello[:n]) is None, n
    assert looks_like_client_hello(hello[:6]) is True
    assert looks_like_client_hello(hello) is True
    assert looks_like_client_hello(memoryview(hello)) is True


@pytest.mark.parametrize(
    "first",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"PRI * HTTP/2.0\r\n",
        b"SSH-2.0-OpenSSH_9.2\r\n",
        b"\x80\x2e\x01\x03\x01",  # SSLv2-format hello
        b"\x15\x03\x03\x00\x02\x02\x28",  # a TLS alert record
        b"\x16\x02\x00\x00\x10\x01",  # SSL 2 record version
        b"\x16\x03\x05\x00\x10\x01",  # record version beyond TLS 1.3
        b"\x16\x03\x03\x00\x00\x01",  # empty record
        b"\x16\x03\x03\xff\xff\x01",  # longer than a record may be
        b"\x16\x03\x03\x00\x40\x02",  # a ServerHello
    ],
)
def test_plaintext_and_other_records_are_not_client_hellos(first: bytes) -> None:
    assert looks_like_client_hello(first) is False


def test_a_verdict_comes_at_the_first_byte_that_decides() -> None:
    assert looks_like_client_hello(b"G") is False
    assert looks_like_client_hello(b"\x16") is None
    assert looks_like_client_hello(b"\x16\x04") is False
    assert looks_like_client_hello(b"\x16\x03\x03\x00") is None
    assert looks_like_client_hello(b"\x16\x03\x03\x00\x01") is False


def test_first_bytes_holds_every_read_until_the_verdict_and_gives_them_back_unchanged() -> None:
    hello = client_hello()
    first = FirstBytes()
    assert first.feed(hello[:2]) is None
    assert first.feed(hello[2:5]) is None
    assert first.feed(hello[5:]) is True
    assert first.take() == hello
    assert first.take() == b""
    with pytest.raises(RuntimeError):
        first.feed(b"more")
    plain = FirstBytes()
    assert plain.feed(b"GET / HTTP/1.1\r\n") is False and plain.take() == b"GET / HTTP/1.1\r\n"


def test_format_dst() -> None:
    assert format_dst(("10.0.0.7", 8080)) == "10.0.0.7:8080"
    assert format_dst(("fd00::2", 8080)) == "[fd00::2]:8080"


@pytest.mark.parametrize(("family", "host"), [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_a_connection_nothing_redirected_has_no_original_destination(family: int, host: str) -> None:
    if family == socket.AF_INET6 and not socket.has_ipv6:
        pytest.skip("no IPv6 on this host")
    with socket.socket(family) as listener:
        listener.bind((host, 0))
        listener.listen()
        with socket.create_connection(listener.getsockname()[:2], timeout=5) as client:
            conn, _ = listener.accept()
            with conn:
                assert original_dst(conn) is None
                assert client.getpeername()[:2] == conn.getsockname()[:2]
