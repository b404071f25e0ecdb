"""Tests for sidecar.http1: the x-forwarded-client-cert rewriter, attacked and cross-checked.

What the app receives is parsed back with llhttp (httptools, as uvicorn does) in strict mode, an
independent parser: every accepted stream must frame there as the same requests, each carrying
exactly one x-forwarded-client-cert, ours. Refused streams must leave the app with nothing of the
refused request. Every stream is also fed one byte at a time and at every split point, and must
give the same bytes as when fed at once.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import httptools
import pytest

from sidecar import http1
from sidecar.errors import HTTPRefusal, Refusal
from sidecar.http1 import MAX_FIELDS, MAX_HEAD, State, XfccRewriter, refusal_response

OURS = b"By=spiffe://mesh.local/orders;Hash=" + b"ab" * 32 + b';Subject="CN=frontend";URI=spiffe://mesh.local/frontend'
LINE = b"x-forwarded-client-cert: " + OURS
SPOOF = b"x-forwarded-client-cert: By=spiffe://mesh.local/orders;URI=spiffe://mesh.local/admin"


# -- helpers ---------------------------------------------------------------------------------------


@dataclass
class Message:
    method: bytes
    url: bytes
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""

    def values(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n.lower() == name.lower()]


class _Collector:
    def __init__(self) -> None:
        self.messages: list[Message] = []

    def on_message_begin(self) -> None:
        self.messages.append(Message(b"", b""))

    def on_url(self, url: bytes) -> None:
        self.messages[-1].url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.messages[-1].headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.messages[-1].body += body


def llhttp(data: bytes) -> list[Message]:
    """The requests llhttp (strict, as shipped) frames in ``data``."""
    sink = _Collector()
    parser = httptools.HttpRequestParser(sink)
    with contextlib.suppress(httptools.HttpParserUpgrade):
        parser.feed_data(data)
    return sink.messages


def run(data: bytes, pieces: list[bytes] | None = None) -> bytes:
    """Feed ``data`` (or ``pieces``) and end; what the app got. Raises on refusal."""
    rw = XfccRewriter(LINE)
    out = b"".join(rw.feed(p) for p in (pieces if pieces is not None else [data]))
    return out + rw.end()


def refused(data: bytes, pieces: list[bytes] | None = None) -> tuple[HTTPRefusal, bytes]:
    """Feed until refused; the refusal and everything the app got (returns and ``forward``)."""
    rw = XfccRewriter(LINE)
    app = b""
    for p in pieces if pieces is not None else [data]:
        try:
            app += rw.feed(p)
        except HTTPRefusal as exc:
            app += exc.forward
            assert rw.refusal is exc
            with pytest.raises(HTTPRefusal) as again:
                rw.feed(b"GET / HTTP/1.1\r\n\r\n")
            assert again.value.forward == b""  # delivered once
            return exc, app
    raise AssertionError(f"not refused; the app got {app!r}")


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def assert_one_xfcc_each(app: bytes, count: int) -> list[Message]:
    messages = llhttp(app)
    assert len(messages) == count, messages
    for m in messages:
        assert m.values(b"x-forwarded-client-cert") == [OURS], m.headers
        assert not [
            n
            for n, _ in m.headers
            if n.lower().replace(b"_", b"-") == b"x-forwarded-client-cert" and n != b"x-forwarded-client-cert"
        ]
    return messages


def assert_same_however_split(data: bytes) -> bytes:
    """One read, one byte per read, and two reads split at every point: the same bytes out."""
    whole = run(data)
    assert run(data, bytewise(data)) == whole
    for i in range(1, len(data)):
        assert run(data, [data[:i], data[i:]]) == whole, i
    return whole


GET = b"GET /orders/42 HTTP/1.1\r\nHost: orders.mesh.local\r\nAccept: */*\r\n\r\n"


# -- the header is added, everything else passes byte for byte ------------------------------------


def test_header_is_added_after_the_callers_last_field() -> None:
    assert run(GET) == b"GET /orders/42 HTTP/1.1\r\nHost: orders.mesh.local\r\nAccept: */*\r\n" + LINE + b"\r\n\r\n"


@pytest.mark.parametrize(
    "line",
    [
        b"GET /a/b?c=d&e=%20f#x HTTP/1.1",
        b"OPTIONS * HTTP/1.1",
        b"GET http://orders.mesh.local:8080/a HTTP/1.1",
        b"CONNECT orders.mesh.local:443 HTTP/1.1",
        b"CONNECT [fd00::1]:5432 HTTP/1.1",
        b"GET * HTTP/1.1",
        b'GET /a|b{c}"d<e>^`\\ HTTP/1.1',
        b"PROPFIND /dav HTTP/1.1",
        b"get / HTTP/1.1",
    ],
)
def test_request_target_forms(line: bytes) -> None:
    assert run(line + b"\r\n\r\n").startswith(line + b"\r\n")


def test_request_without_fields() -> None:
    assert run(b"GET / HTTP/1.0\r\n\r\n") == b"GET / HTTP/1.0\r\n" + LINE + b"\r\n\r\n"


def test_field_order_case_and_whitespace_pass_unchanged() -> None:
    head = b"PUT /x HTTP/1.1\r\nhOsT:   a  \r\nX-Odd:\tv\t\r\nCONTENT-length: 3\r\nEmpty:\r\nobs: \xe9t\xe9\r\n\r\nabc"
    app = run(head)
    assert app == head[: head.index(b"\r\n\r\n") + 2] + LINE + b"\r\n\r\nabc"
    assert assert_one_xfcc_each(app, 1)[0].body == b"abc"


def test_one_read_byte_reads_and_every_split_give_the_same_bytes() -> None:
    stream = (
        b"\r\nPOST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
        b"POST /b HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nX-Forwarded-Client-Cert: evil\r\n\r\n"
        b'3;ext="q\\"v"\r\nabc\r\n10\r\n0123456789abcdef\r\n'
        b"0\r\nX-Forwarded-Client-Cert: evil\r\nTrailer-One: 1\r\n\r\n"
        b"GET /c HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    app = assert_same_however_split(stream)
    messages = assert_one_xfcc_each(app, 3)
    assert [m.body for m in messages] == [b"hello", b"abc0123456789abcdef", b""]
    assert b"Trailer-One: 1\r\n\r\n" in app
    assert b"evil" not in app


def test_pipelined_requests_each_get_the_header() -> None:
    stream = GET * 5
    assert_one_xfcc_each(run(stream), 5)


def test_body_is_never_parsed_as_headers() -> None:
    body = b"\r\n" + SPOOF + b"\r\n\r\nGET /admin HTTP/1.1\r\n\r\n"
    req = b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    app = run(req)
    messages = assert_one_xfcc_each(app, 1)
    assert messages[0].body == body  # the app reads the same bytes as body, not as a request


def test_large_body_passes_through_without_copies_when_read_whole() -> None:
    body = b"z" * 1_000_000
    rw = XfccRewriter(LINE)
    rw.feed(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 1000000\r\n\r\n")
    assert rw.feed(body) is body


def test_leading_empty_lines_are_dropped_not_forwarded() -> None:
    assert run(b"\r\n\r\n" + GET) == run(GET)


def test_chunked_body_and_trailers_pass_byte_for_byte() -> None:
    req = (
        b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"00A;name=value;flag\r\n0123456789\r\n0;last\r\nDigest: sha-256=x\r\nX-Trace: 1\r\n\r\n"
    )
    app = run(req)
    assert app == req.replace(b"chunked\r\n\r\n", b"chunked\r\n" + LINE + b"\r\n\r\n")
    assert assert_one_xfcc_each(app, 1)[0].body == b"0123456789"


# -- spoofing -------------------------------------------------------------------------------------

SPOOF_NAMES = [
    b"x-forwarded-client-cert",
    b"X-Forwarded-Client-Cert",
    b"X-FORWARDED-CLIENT-CERT",
    b"x-FoRwArDeD-cLiEnT-cErT",
    b"X_Forwarded_Client_Cert",
    b"x-forwarded_client-cert",
    b"x_forwarded-client_cert",
]


@pytest.mark.parametrize("name", SPOOF_NAMES)
def test_caller_header_is_removed_in_any_case_or_underscore_spelling(name: bytes) -> None:
    req = b"GET / HTTP/1.1\r\nHost: a\r\n" + name + b": By=evil;URI=spiffe://mesh.local/admin\r\nAccept: */*\r\n\r\n"
    app = assert_same_however_split(req)
    assert b"evil" not in app
    assert app == b"GET / HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n" + LINE + b"\r\n\r\n"


@pytest.mark.parametrize(
    "value", [b"", b" ", b"\t", b"   evil   ", b'"quoted;URI=x"', b"By=a,By=b", b"\xff\xfe", b"evil" * 1000]
)
def test_caller_header_is_removed_whatever_its_value(value: bytes) -> None:
    app = run(b"GET / HTTP/1.1\r\nx-forwarded-client-cert:" + value + b"\r\n\r\n")
    assert app == b"GET / HTTP/1.1\r\n" + LINE + b"\r\n\r\n"


def test_every_duplicate_is_removed() -> None:
    fields = b"".join(n + b": v%d\r\n" % i + b"Keep-%d: k\r\n" % i for i, n in enumerate(SPOOF_NAMES))
    app = run(b"GET / HTTP/1.1\r\n" + fields + b"\r\n")
    assert (
        app
        == b"GET / HTTP/1.1\r\n" + b"".join(b"Keep-%d: k\r\n" % i for i in range(len(SPOOF_NAMES))) + LINE + b"\r\n\r\n"
    )


def test_spoof_as_first_and_only_field() -> None:
    assert run(b"GET / HTTP/1.1\r\n" + SPOOF + b"\r\n\r\n") == b"GET / HTTP/1.1\r\n" + LINE + b"\r\n\r\n"


def test_similar_names_are_other_headers_and_stay() -> None:
    fields = b"x-forwarded-client-cert-chain: a\r\nxx-forwarded-client-cert: b\r\nx-forwarded-client: c\r\n"
    req = b"GET / HTTP/1.1\r\n" + fields + b"\r\n"
    app = run(req)
    assert app == req[:-2] + LINE + b"\r\n\r\n"
    assert_one_xfcc_each(app, 1)


def test_spoof_after_a_pipelined_request() -> None:
    stream = GET + b"GET /2 HTTP/1.1\r\nHost: a\r\n" + SPOOF + b"\r\n\r\n" + GET
    app = assert_same_however_split(stream)
    assert_one_xfcc_each(app, 3)
    assert b"admin" not in app


def test_spoof_after_a_body_and_after_a_chunked_body() -> None:
    stream = (
        b"POST /1 HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi"
        b"GET /2 HTTP/1.1\r\n" + SPOOF + b"\r\n\r\n"
        b"POST /3 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"
        b"GET /4 HTTP/1.1\r\n" + SPOOF + b"\r\n\r\n"
    )
    app = run(stream)
    assert_one_xfcc_each(app, 4)
    assert b"admin" not in app


@pytest.mark.parametrize("name", SPOOF_NAMES)
def test_spoof_in_trailers_is_removed(name: bytes) -> None:
    req = (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n"
        + name + b": evil\r\nGood: 1\r\n" + name + b": evil2\r\n\r\n"
    )  # fmt: skip
    app = assert_same_however_split(req)
    assert b"evil" not in app
    assert app.endswith(b"0\r\nGood: 1\r\n\r\n")
    assert_one_xfcc_each(app, 1)


def test_trailers_that_were_only_a_spoof_leave_an_empty_trailer_section() -> None:
    req = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n" + SPOOF + b"\r\n\r\nGET / HTTP/1.1\r\n\r\n"
    app = run(req)
    assert b"0\r\n\r\nGET / HTTP/1.1\r\n" in app
    assert_one_xfcc_each(app, 2)


@pytest.mark.parametrize(
    "fields",
    [
        b"Accept: */*\r\n " + SPOOF,  # obs-fold continuing another field
        b"Accept: */*\r\n\t" + SPOOF,
        b" " + SPOOF,  # whitespace before the first field
        b"x-forwarded-client-cert : evil",  # whitespace before the colon
        b"x-forwarded-client-cert\t: evil",
        b"x-forwarded-client-cert\x00: evil",
        b"x-forwarded-client-cert: ev\x00il",
        b"x-forwarded-client-cert: ev\ril",
        b"Accept: */*\nx-forwarded-client-cert: evil",  # bare LF as a line break
        b"Accept: */*\rx-forwarded-client-cert: evil",  # bare CR as a line break
        "x-forwarded-client-\u0441ert: evil".encode(),  # a Cyrillic 'c': not a token
        b"x-forwarded-client-cert:: evil\r\n:x-forwarded-client-cert: evil",
    ],
)
def test_folded_or_malformed_spoofs_are_refused(fields: bytes) -> None:
    exc, app = refused(b"GET / HTTP/1.1\r\nHost: a\r\n" + fields + b"\r\n\r\n")
    assert exc.status == 400
    assert app == b""


def test_refused_pipelined_spoof_leaves_earlier_requests_to_the_app() -> None:
    exc, app = refused(GET + b"GET /2 HTTP/1.1\r\nA: b\r\n " + SPOOF + b"\r\n\r\n")
    assert exc.reason == "obs_fold"
    assert app == run(GET)  # the first request, and nothing of the second
    assert not exc.partial


# -- smuggling ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        (b"Content-Length: 6\r\nTransfer-Encoding: chunked", "ambiguous_length"),  # CL.TE
        (b"Transfer-Encoding: chunked\r\nContent-Length: 6", "ambiguous_length"),  # TE.CL
        (b"Content-Length: 0\r\nTransfer-Encoding: chunked", "ambiguous_length"),
        (b"Content-Length: 5\r\nContent-Length: 5", "ambiguous_length"),
        (b"Content-Length: 5\r\nContent-Length: 6", "ambiguous_length"),
        (b"Content-Length: 5, 5", "bad_content_length"),
        (b"Content-Length: 5,6", "bad_content_length"),
        (b"Content-Length: +5", "bad_content_length"),
        (b"Content-Length: -1", "bad_content_length"),
        (b"Content-Length: 0x5", "bad_content_length"),
        (b"Content-Length: 5.0", "bad_content_length"),
        (b"Content-Length: 5 5", "bad_content_length"),
        (b"Content-Length:", "bad_content_length"),
        (b"Content-Length: 1234567890123456789", "bad_content_length"),
        (b"Content_Length: 5", "bad_field"),
        (b"Transfer-Encoding: xchunked", "bad_transfer_encoding"),
        (b"Transfer-Encoding: chunked, identity", "bad_transfer_encoding"),
        (b"Transfer-Encoding: identity, chunked", "bad_transfer_encoding"),
        (b"Transfer-Encoding: gzip, chunked", "bad_transfer_encoding"),
        (b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked", "bad_transfer_encoding"),
        (b"Transfer-Encoding: chunked\r\nTransfer-encoding: identity", "bad_transfer_encoding"),
        (b'Transfer-Encoding: "chunked"', "bad_transfer_encoding"),
        (b"Transfer-Encoding: chunked;q=1", "bad_transfer_encoding"),
        (b"Transfer-Encoding: chunk", "bad_transfer_encoding"),
        (b"Transfer-Encoding:", "bad_transfer_encoding"),
        (b"Transfer_Encoding: chunked", "bad_field"),
        (b"Transfer-Encoding : chunked", "bad_field"),
        (b"Transfer-Encoding:\x0bchunked", "bad_bytes"),
        (b"Transfer-Encoding:\x0cchunked", "bad_bytes"),
        (b"Transfer-Encoding:\tchunked", "bad_transfer_encoding"),
        (b"Transfer-Encoding: chunked\t", "bad_transfer_encoding"),
        (b"Content-Length:\t5", "bad_content_length"),
        (b"Content-Length: 5\t", "bad_content_length"),
        (b"X: y\r\n Transfer-Encoding: chunked", "obs_fold"),
        (b"Transfer-Encoding:\r\n chunked", "obs_fold"),
        (b"Host: a\r\nHost: b", "duplicate_host"),
        (b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__", "bad_upgrade"),
        (b"Upgrade: websocket, h2c", "bad_upgrade"),
        (b"Upgrade: HTTP/2.0", "bad_upgrade"),
        (b"Upgrade: TLS/1.2", "bad_upgrade"),
    ],
)
def test_ambiguous_framing_is_refused_before_the_app_sees_anything(fields: bytes, reason: str) -> None:
    req = b"POST /x HTTP/1.1\r\n" + fields + b"\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n"
    exc, app = refused(req)
    assert (exc.reason, exc.status, exc.partial) == (reason, 400, False)
    assert app == b""
    exc2, app2 = refused(req, bytewise(req))
    assert (exc2.reason, app2) == (reason, b"")


def test_transfer_encoding_is_refused_in_http10() -> None:
    exc, app = refused(b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    assert (exc.reason, app) == ("bad_transfer_encoding", b"")


@pytest.mark.parametrize("value", [b"chunked", b"Chunked", b"CHUNKED", b"  chunked", b"chunked  ", b" cHuNkEd "])
def test_plain_chunked_is_accepted_in_any_case_and_spaces(value: bytes) -> None:
    app = run(b"POST / HTTP/1.1\r\nTransfer-Encoding:" + value + b"\r\n\r\n1\r\nx\r\n0\r\n\r\n")
    assert assert_one_xfcc_each(app, 1)[0].body == b"x"


@pytest.mark.parametrize(
    "chunk_line",
    [
        b"-5", b"-0", b"+5", b"0x5", b"5 ", b" 5", b"5\t", b"", b"g", b"5;", b"5; a=b", b"5;a =b", b"5;a= b",
        b"5;a=b c", b'5;a="b', b'5;a="b\\"', b"5;a=\x00", b"5\x00", b"5;a=\"b\x01\"",
        b"1" * 17,  # 17 hex digits: past 64 bits
        b"8000000000000000",  # 2**63: past what a signed 64-bit size holds
        b"ffffffffffffffff",
        b"00000000000000005",  # leading zeros count too
    ],
)  # fmt: skip
def test_bad_chunk_size_lines_are_refused(chunk_line: bytes) -> None:
    head = b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    exc, app = refused(head + chunk_line + b"\r\nhello\r\n0\r\n\r\n")
    assert exc.reason == "bad_chunk"
    assert exc.partial  # the head went through: the relay must abort the app connection
    assert app == run(head)  # the head, never a byte of the bad chunk or past it


def test_chunk_line_with_bare_lf_is_refused_as_soon_as_seen() -> None:
    head = b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    exc, app = refused(b"", [head, b"5\nhello"])
    assert exc.reason == "bad_line_ending"
    assert app == run(head)


@pytest.mark.parametrize("after", [b"XX", b"\n\n", b"\r\r", b"\rX", b"hello"])
def test_chunk_data_not_followed_by_crlf_is_refused(after: bytes) -> None:
    head = b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello"
    exc, app = refused(head + after + b"0\r\n\r\n")
    assert exc.reason in ("bad_chunk",)
    assert app == run(head)  # the chunk's data went through, nothing after it


def test_max_chunk_size_is_accepted_and_counted() -> None:
    rw = XfccRewriter(LINE)
    rw.feed(b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n7fffffffffffffff\r\n")
    assert rw.state is State.CHUNK_DATA
    assert rw.feed(b"GET /not-a-request HTTP/1.1\r\n\r\n") == b"GET /not-a-request HTTP/1.1\r\n\r\n"


@pytest.mark.parametrize(
    "trailer",
    [
        b"Content-Length: 5",
        b"Transfer-Encoding: chunked",
        b"Host: evil",
        b"A: b\r\n folded",
        b"A : b",
        b"A: \x00",
        b"no-colon",
    ],
)
def test_bad_trailers_are_refused(trailer: bytes) -> None:
    head = b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n"
    exc, _ = refused(head + trailer + b"\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n")
    assert exc.reason == "bad_trailer"
    assert exc.partial


def test_connect_with_a_body_is_refused() -> None:
    exc, app = refused(b"CONNECT a:443 HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello")
    assert (exc.reason, app) == ("connect_with_body", b"")


# -- not HTTP/1.x --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "bad_version"),
        (b"GET / HTTP/2.0\r\n\r\n", "bad_version"),
        (b"GET / HTTP/1.2\r\n\r\n", "bad_version"),
        (b"GET / HTTP/0.9\r\n\r\n", "bad_version"),
        (b"GET / http/1.1\r\n\r\n", "bad_request_line"),
        (b"GET /\r\n\r\n", "bad_request_line"),  # HTTP/0.9 simple request
        (b"GET  / HTTP/1.1\r\n\r\n", "bad_request_line"),
        (b"GET / HTTP/1.1 \r\n\r\n", "bad_request_line"),
        (b" GET / HTTP/1.1\r\n\r\n", "bad_request_line"),
        (b"GET /a b HTTP/1.1\r\n\r\n", "bad_request_line"),
        (b"G(T / HTTP/1.1\r\n\r\n", "bad_request_line"),
        (b"GET 7ws HTTP/1.1\r\n\r\n", "bad_request_line"),
        (b"GET ** HTTP/1.1\r\n\r\n", "bad_request_line"),
        (b"GET :x HTTP/1.1\r\n\r\n", "bad_request_line"),
        (b"GET a.b:443 HTTP/1.1\r\n\r\n", "bad_request_line"),  # authority-form is for CONNECT
        (b"GET e:5432 HTTP/1.1\r\n\r\n", "bad_request_line"),
        (b"CONNECT /x HTTP/1.1\r\n\r\n", "bad_request_line"),
        (b"CONNECT a.b HTTP/1.1\r\n\r\n", "bad_request_line"),
        (b"CONNECT http://a:1/ HTTP/1.1\r\n\r\n", "bad_request_line"),
        (b"GET /\x7f HTTP/1.1\r\n\r\n", "bad_bytes"),
        ("GET /ü HTTP/1.1\r\n\r\n".encode(), "bad_request_line"),
        (b"GET / HTTP/1.1\n\n", "bad_line_ending"),
        (b"GET / HTTP/1.1\r\nHost: a\n\r\n", "bad_line_ending"),
        (b"\nGET / HTTP/1.1\r\n\r\n", "bad_line_ending"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "bad_bytes"),  # a TLS ClientHello
        (b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c", "bad_bytes"),  # a PROXY v2 header
        (b"SSH-2.0-OpenSSH_9.2\r\n", "bad_request_line"),
    ],
)
def test_what_is_not_http1_is_refused(data: bytes, reason: str) -> None:
    exc, app = refused(data)
    assert (exc.reason, exc.status, app) == (reason, 400, b"")


def test_non_http_is_refused_early_not_after_the_size_limit() -> None:
    exc, _ = refused(b"", [b"\x16\x03\x01", b"\x02\x00"])
    assert exc.reason == "bad_bytes"
    exc, _ = refused(b"", [b"PRI * HTTP/2.0\r", b"\n"])  # the request line is judged once it ends
    assert exc.reason == "bad_request_line"


def test_a_cr_at_the_end_of_a_read_waits_for_its_lf() -> None:
    assert_one_xfcc_each(run(b"", [b"GET / HTTP/1.1\r", b"\nHost: a\r", b"\n\r", b"\n"]), 1)


# -- size limits ---------------------------------------------------------------------------------


def head_of_size(size: int) -> bytes:
    base = b"GET / HTTP/1.1\r\nX: "
    return base + b"a" * (size - len(base) - 4) + b"\r\n\r\n"


def test_head_at_the_limit_is_accepted() -> None:
    head = head_of_size(MAX_HEAD)
    assert len(head) == MAX_HEAD
    assert_one_xfcc_each(run(head), 1)


def test_head_past_the_limit_gets_431_and_nothing_reaches_the_app() -> None:
    exc, app = refused(head_of_size(MAX_HEAD + 1))
    assert (exc.reason, exc.status, app) == ("head_too_large", 431, b"")


def test_head_that_never_ends_is_refused_once_past_the_limit() -> None:
    rw = XfccRewriter(LINE)
    rw.feed(b"GET / HTTP/1.1\r\nX: ")
    for _ in range(MAX_HEAD // 4096 - 1):
        assert rw.feed(b"a" * 4096) == b""
    with pytest.raises(HTTPRefusal) as info:
        rw.feed(b"a" * 4096)
    assert info.value.status == 431


def test_many_fields_at_and_past_the_limit() -> None:
    fields = b"".join(b"F%d: v\r\n" % i for i in range(MAX_FIELDS))
    assert_one_xfcc_each(run(b"GET / HTTP/1.1\r\n" + fields + b"\r\n"), 1)
    exc, app = refused(b"GET / HTTP/1.1\r\n" + fields + b"One-more: v\r\n\r\n")
    assert (exc.reason, exc.status, app) == ("too_many_fields", 431, b"")


def test_empty_lines_before_a_request_count_toward_the_limit() -> None:
    exc, _ = refused(b"\r\n" * (MAX_HEAD // 2 + 1))
    assert exc.status == 431


def test_trailers_past_the_limit_get_431() -> None:
    head = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n"
    exc, _ = refused(head + b"T: " + b"a" * MAX_HEAD + b"\r\n\r\n")
    assert (exc.reason, exc.status) == ("trailers_too_large", 431)


def test_a_head_at_the_limit_read_byte_by_byte() -> None:
    # Each read is searched from where the last one stopped; rescanning the whole partial head
    # each time would make this ~2**31 byte compares (no timing is asserted: bench/ measures).
    head = head_of_size(MAX_HEAD)
    rw = XfccRewriter(LINE)
    out = b"".join(rw.feed(head[i : i + 1]) for i in range(len(head)))
    assert_one_xfcc_each(out, 1)


# -- Expect: 100-continue -------------------------------------------------------------------------


def test_expect_100_continue_head_goes_through_before_the_body() -> None:
    rw = XfccRewriter(LINE)
    head = b"PUT /f HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
    assert rw.feed(head) == head[:-2] + LINE + b"\r\n\r\n"
    assert rw.feed_response(b"HTTP/1.1 100 Continue\r\n\r\n") == b""
    assert not rw.answerable()  # a 1xx is not the answer
    assert rw.feed(b"hello" + GET) == b"hello" + run(GET)
    rw.feed_response(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
    assert not rw.answerable()  # GET still owed
    rw.feed_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert rw.answerable()


def test_expect_100_continue_answered_early_keeps_the_declared_framing() -> None:
    # The app refuses without 100; the caller still owes 5 body bytes unless it closes, and
    # the app frames them the same way: both read "hello" as body, not as a request.
    rw = XfccRewriter(LINE)
    rw.feed(b"PUT /f HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
    rw.feed_response(b"HTTP/1.1 417 Expectation Failed\r\nContent-Length: 0\r\n\r\n")
    assert rw.feed(b"GET") == b"GET"  # still body
    assert rw.state is State.BODY


# -- Upgrade, 101 and CONNECT ---------------------------------------------------------------------

WS = b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: k\r\n\r\n"
SWITCH = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"


def test_after_101_the_stream_is_raw_both_ways() -> None:
    rw = XfccRewriter(LINE)
    frames = b"\x81\x05hello" + b"GET / HTTP/1.1\r\n" + SPOOF + b"\r\n\r\n"
    assert rw.feed(WS + frames) == run(WS)
    assert rw.holding  # nothing after the upgrade request moves until the app answers
    assert not rw.raw
    assert rw.feed_response(SWITCH) == frames  # released as sent: it is websocket data now
    assert rw.raw
    more = b"\x00\x01\x02 x-forwarded-client-cert: anything"
    assert rw.feed(more) is more
    assert rw.feed_response(b"\x81\x02hi") == b""


def test_upgrade_declined_resumes_http_and_strips_the_spoof_that_was_held() -> None:
    rw = XfccRewriter(LINE)
    held = b"GET /2 HTTP/1.1\r\n" + SPOOF + b"\r\n\r\n"
    assert rw.feed(WS + held) == run(WS)
    released = rw.feed_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert released == b"GET /2 HTTP/1.1\r\n" + LINE + b"\r\n\r\n"
    assert rw.state is State.HEAD
    assert rw.feed(GET) == run(GET)


def test_upgrade_answer_after_pipelined_responses_is_matched_to_its_request() -> None:
    rw = XfccRewriter(LINE)
    app = rw.feed(b"HEAD /a HTTP/1.1\r\n\r\n" + b"POST /b HTTP/1.1\r\nContent-Length: 1\r\n\r\nx" + GET + WS + b"raw")
    assert_one_xfcc_each(app, 4)
    # HEAD's answer declares a length but has no body; POST's is chunked; GET's has a body that
    # looks like a 101; only then comes the answer to the upgrade.
    assert rw.feed_response(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n") == b""
    assert rw.feed_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n") == b""
    fake = b"HTTP/1.1 101 Switching Protocols\r\n\r\n"
    assert rw.feed_response(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(fake) + fake) == b""
    assert rw.holding
    assert rw.feed_response(SWITCH) == b"raw"


def test_101_arriving_while_the_upgrade_request_body_still_streams() -> None:
    rw = XfccRewriter(LINE)
    head = b"POST /up HTTP/1.1\r\nUpgrade: websocket\r\nContent-Length: 4\r\n\r\n"
    rw.feed(head + b"ab")
    assert rw.feed_response(SWITCH) == b""
    assert rw.feed(b"cdRAW") == b"cdRAW"  # the body ends as framed, then the raw stream
    assert rw.state is State.RAW


def test_unasked_101_refuses_the_stream() -> None:
    rw = XfccRewriter(LINE)
    rw.feed(GET)
    rw.feed_response(SWITCH)
    assert rw.refusal is not None and rw.refusal.reason == "unexpected_switch"
    with pytest.raises(HTTPRefusal):
        rw.feed(b"anything")


def test_connect_2xx_is_a_tunnel_and_a_refusal_is_not() -> None:
    rw = XfccRewriter(LINE)
    assert_one_xfcc_each(rw.feed(b"CONNECT db:5432 HTTP/1.1\r\nHost: db:5432\r\n\r\n"), 1)
    rw.feed(b"\x00\x00\x00\x08")
    assert rw.feed_response(b"HTTP/1.1 200 Connection Established\r\n\r\n") == b"\x00\x00\x00\x08"
    assert rw.state is State.RAW
    rw = XfccRewriter(LINE)
    rw.feed(b"CONNECT db:5432 HTTP/1.1\r\n\r\n" + GET)
    assert rw.feed_response(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n") == run(GET)


def test_held_bytes_are_bounded() -> None:
    rw = XfccRewriter(LINE)
    rw.feed(WS)
    with pytest.raises(HTTPRefusal) as info:
        for _ in range(MAX_HEAD // 1024 + 1):
            rw.feed(b"x" * 1024)
    assert info.value.reason == "hold_overflow"


def test_unanswered_pipelined_requests_are_bounded() -> None:
    rw = XfccRewriter(LINE)
    app = rw.feed(GET * http1.MAX_PIPELINED + b"GET /next HTTP/1.1\r\n\r\n")
    assert_one_xfcc_each(app, http1.MAX_PIPELINED)
    assert rw.holding  # the next request waits: the relay stops reading the caller
    assert rw.feed(GET) == b""
    assert rw.feed_response(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n") == run(b"GET /next HTTP/1.1\r\n\r\n")
    assert rw.holding  # one answered, one more forwarded: full again
    assert rw.feed_response(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n") == run(GET)
    assert not rw.holding


def test_caller_ends_while_held_then_101_releases_and_finishes() -> None:
    rw = XfccRewriter(LINE)
    rw.feed(WS + b"last")
    assert rw.end() == b""
    assert not rw.finished  # EOF must wait behind the held bytes
    assert rw.feed_response(SWITCH) == b"last"
    assert rw.finished


def test_caller_ends_while_held_then_decline_parses_what_was_held() -> None:
    rw = XfccRewriter(LINE)
    rw.feed(WS + GET + b"GET /partial HT")
    rw.end()
    assert rw.feed_response(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n") == run(GET)
    assert rw.finished  # the partial request is dropped, never forwarded


def test_app_closing_while_held_refuses() -> None:
    rw = XfccRewriter(LINE)
    rw.feed(WS + b"x")
    rw.end_response()
    assert rw.refusal is not None and rw.refusal.reason == "no_answer"


def test_unframable_responses_refuse_later_upgrades_but_not_plain_requests() -> None:
    rw = XfccRewriter(LINE)
    rw.feed(GET)
    rw.feed_response(b"garbage that is no status line\r\n\r\n")
    assert not rw.answerable()
    assert_one_xfcc_each(rw.feed(GET), 1)
    with pytest.raises(HTTPRefusal) as info:
        rw.feed(WS)
    assert info.value.reason == "responses_untracked"
    assert info.value.forward == b""


def test_response_side_losing_track_while_held_refuses() -> None:
    rw = XfccRewriter(LINE)
    rw.feed(WS + b"held")
    rw.feed_response(b"HTTP/1.1 2OO OK\r\n\r\n")
    assert rw.refusal is not None and rw.refusal.reason == "responses_untracked"


def test_response_side_losing_track_while_the_upgrade_request_still_streams_refuses() -> None:
    # Found by fuzzing: whether the upgrade request was complete when the app's answers became
    # unframable must not decide between refusing and hanging.
    rw = XfccRewriter(LINE)
    rw.feed(b"POST /ws HTTP/1.1\r\nUpgrade: websocket\r\nContent-Length: 10\r\n\r\nabc")
    rw.feed_response(b"HTTP/1.1 2OO OK\r\n\r\n")
    assert rw.refusal is not None and rw.refusal.reason == "responses_untracked"
    assert rw.refusal.partial


@pytest.mark.parametrize(
    ("response", "idle", "after_end"),
    [
        (b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n", True, True),
        (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n", True, True),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhell", False, False),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", True, True),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nT: 1\r\n\r\n", True, True),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n", False, False),
        (b"HTTP/1.0 200 OK\r\n\r\nuntil close", False, True),  # the app's end ends that body
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nuntil close", False, True),
        (b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n", False, True),  # no answer will come now
        (b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n", True, True),
        (b"HTTP/1.1 200 OK\r\nContent-Le", False, False),  # a head cut short
    ],
)
def test_response_framing_decides_when_a_refusal_can_be_answered(response: bytes, idle: bool, after_end: bool) -> None:
    for pieces in ([response], bytewise(response)):
        rw = XfccRewriter(LINE)
        rw.feed(GET)
        assert not rw.answerable()
        assert rw.answerable(app_ended=True)  # the app ended without a word: nothing is in flight
        for p in pieces:
            rw.feed_response(p)
        assert rw.answerable() is idle
        assert rw.answerable(app_ended=True) is after_end


def test_head_response_declares_a_length_but_has_no_body() -> None:
    rw = XfccRewriter(LINE)
    rw.feed(b"HEAD / HTTP/1.1\r\n\r\n")
    rw.feed_response(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
    assert rw.answerable()


def test_without_a_header_line_every_spoof_is_removed_and_none_added() -> None:
    """A caller without a certificate (plain TCP let through in permissive mode): the app must
    not take any x-forwarded-client-cert as the sidecar's."""
    rw = XfccRewriter(None)
    data = b"GET / HTTP/1.1\r\nHost: a\r\n" + SPOOF + b"\r\nX_Forwarded_Client_Cert: x\r\n\r\n" + GET
    out = rw.feed(data)
    assert out == b"GET / HTTP/1.1\r\nHost: a\r\n\r\n" + GET
    assert [m.values(b"x-forwarded-client-cert") for m in llhttp(out)] == [[], []]


# -- ending, refusing, the relay's view -----------------------------------------------------------


def test_end_drops_a_partial_head() -> None:
    rw = XfccRewriter(LINE)
    assert rw.feed(b"GET /never-complete HTTP/1.1\r\nHost:") == b""
    assert rw.end() == b""
    assert rw.finished


def test_end_mid_body_passes_eof_through() -> None:
    rw = XfccRewriter(LINE)
    rw.feed(b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc")
    assert rw.end() == b""
    assert rw.finished


def test_refusal_is_part_of_the_error_vocabulary() -> None:
    exc, _ = refused(b"GET / HTTP/1.1\r\n a\r\n\r\n")
    assert isinstance(exc, Refusal)
    assert exc.reason == "obs_fold"


def test_refusal_responses() -> None:
    assert refusal_response(400) == b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    assert refusal_response(431).startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert llhttp_response_ok(refusal_response(400))


def llhttp_response_ok(data: bytes) -> bool:
    done = []

    class Sink:
        def on_message_complete(self) -> None:
            done.append(True)

    httptools.HttpResponseParser(Sink()).feed_data(data)
    return done == [True]


def test_no_transition_outside_the_table() -> None:
    rw = XfccRewriter(LINE)
    with pytest.raises(RuntimeError, match="HEAD -> CHUNK_DATA"):
        rw._goto(State.CHUNK_DATA)
    for side in (XfccRewriter, http1._Responses):
        assert set(side._NEXT) == set(side._HANDLERS)  # every state has a handler and a row
