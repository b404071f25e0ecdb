"""HTTP/1.x stream rewriting for ``client_cert_header: xfcc`` (contract section 9).

Owns one connection's caller->app bytes: finds each request's head, refuses ambiguous framing,
removes every caller-sent ``x-forwarded-client-cert`` and appends the sidecar's own, and passes all
else through byte for byte. It also reads the app->caller bytes, only to learn where responses
begin and end. Sans-IO: bytes in, bytes out; no sockets, no clocks, no logging.

Theory of operation
-------------------
Smuggling happens when two parsers frame the same bytes differently. The rewriter therefore
accepts only a strict subset of RFC 9112 that every conforming parser frames one way, and refuses
(``HTTPRefusal``, 400) the rest: Transfer-Encoding with Content-Length, more than one
Content-Length or Transfer-Encoding line, any coding but a lone ``chunked``, Transfer-Encoding in
HTTP/1.0, obs-fold, whitespace before a colon, bare CR or LF, control bytes, a version other than
HTTP/1.0 or 1.1, malformed chunk lines (sizes past 16 hex digits or 2**63, whitespace, odd
extensions), chunk data not followed by CRLF, duplicate Host, and framing fields in trailers.
A head is forwarded only once it is complete and valid, so a refused request is never seen by the
app; a chunked body is checked as it streams, so a chunk error is found after the head and the
earlier chunks went through (``HTTPRefusal.partial``): the relay must then abort the app leg.

A head may be at most ``MAX_HEAD`` bytes (request line, fields and the empty line) with at most
``MAX_FIELDS`` field lines; past either the refusal carries 431. The same limit applies to a
trailer section. The sidecar's header is added after the caller's last field, so the app sees a
head at most one line longer.

After a request that asks to leave HTTP/1 (an ``Upgrade`` header, or CONNECT), the bytes behind it
are held, not parsed and not forwarded, until the app's answer to it is known: 101 (or 2xx to
CONNECT) turns the rest of the stream raw, anything else resumes parsing. That is why the
response side is read: responses are framed (Content-Length, chunked, no body for HEAD, 1xx, 204
and 304) to count them, so the answer to the held request is recognised however many pipelined
responses precede it. Upgrades to a protocol that would carry further HTTP requests the sidecar
cannot see (h2c, h2, HTTP/*, TLS/*) are refused. If the app's responses cannot be framed, upgrades
are refused from then on; plain requests are unaffected.

``Expect: 100-continue`` needs nothing special: a 1xx is interim and does not count as the
request's answer, and the body is framed as declared whether or not the app asked for it.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable
from enum import IntEnum, auto
from typing import Any, ClassVar, NamedTuple

from .errors import HTTPRefusal

MAX_HEAD = 64 * 1024
MAX_FIELDS = 500
MAX_PIPELINED = 1000  # requests forwarded and not yet answered; past it the next one waits
MAX_CHUNK_LINE = 4096
MAX_CHUNK_SIZE = 2**63 - 1

_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]++"
_FIELD_LINE = _TOKEN + rb":[\t\x20-\x7e\x80-\xff]*+"  # name, colon, value with its OWS: no CTL, no CR/LF
# request-target (RFC 9112 3.2), visible ASCII only: origin-form "/...", absolute-form
# "scheme://...", asterisk-form "*", and authority-form "host:port", which only CONNECT may use.
_TARGET = rb"(/[\x21-\x7e]*+|\*|[A-Za-z][A-Za-z0-9+.-]*+://[\x21-\x7e]++|[\x21-\x2e\x30-\x7e]++)"
_AUTHORITY = re.compile(rb"(?:[A-Za-z0-9._~!$&'()*+,;=%-]++|\[[0-9A-Fa-f:.]++\]):[0-9]{1,5}")
_HEAD = re.compile(rb"(" + _TOKEN + rb") " + _TARGET + rb" HTTP/1\.([01])(?:\r\n" + _FIELD_LINE + rb")*+")
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") " + _TARGET + rb" HTTP/1\.[01]")
_REQUEST_SHAPE = re.compile(_TOKEN + rb" [^ ]++ (HTTP/[0-9.]*+)")  # only to name a refusal
_FIELD = re.compile(_FIELD_LINE)
_TRAILERS = re.compile(rb"(?:\r\n" + _FIELD_LINE + rb")*+")
_QUOTED = rb'"(?:[\t\x20\x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t\x20-\x7e\x80-\xff])*+"'
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})(?:;" + _TOKEN + rb"(?:=(?:" + _TOKEN + rb"|" + _QUOTED + rb"))?)*+")
# Applied to a lower-cased head, whose every field line follows a CRLF. Names match with '_' for
# '-' too: CGI-style servers (WSGI, PHP) read X_Forwarded_Client_Cert as the same header.
_SPECIAL = re.compile(
    rb"\r\n(content[-_]length|transfer[-_]encoding|upgrade|x[-_]forwarded[-_]client[-_]cert):([^\r]*)"
)
_DIGITS = re.compile(rb"[0-9]{1,18}")
_CONTROL = re.compile(rb"[^\t\r\n\x20-\x7e\x80-\xff]")
_UPGRADE_TOKEN = re.compile(rb"[ \t]*([^ \t,/]*)")
# Upgrades whose new protocol carries HTTP requests the rewriter could not see.
_HIDDEN_HTTP_UPGRADES = frozenset({b"h2c", b"h2", b"http", b"tls"})
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([0-9]{3})(?: [\t\x20-\x7e\x80-\xff]*)?")
_RESPONSE_SPECIAL = re.compile(rb"\r\n(content-length|transfer-encoding):[ \t]*+([^\r]*)")

Buffer = bytes | bytearray
_Handler = Callable[[Any, Buffer, int], int]
_REASONS = {400: "Bad Request", 431: "Request Header Fields Too Large"}


def refusal_response(status: int) -> bytes:
    """What the caller is sent for an ``HTTPRefusal``, before the connection closes."""
    return f"HTTP/1.1 {status} {_REASONS[status]}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".encode()


class _Malformed(Exception):
    """Internal: the bytes at the current position must be refused."""

    def __init__(self, reason: str, detail: str, status: int = 400) -> None:
        super().__init__(detail)
        self.reason, self.detail, self.status = reason, detail, status
        self.buf: Buffer = b""  # the walked buffer, and where in it the refused element starts
        self.pos = 0


class State(IntEnum):  # IntEnum: hashed in C, these are dict keys on every step
    HEAD = auto()  # awaiting a message head
    BODY = auto()  # Content-Length bytes left
    CHUNK_SIZE = auto()  # awaiting a chunk-size line
    CHUNK_DATA = auto()  # chunk bytes left
    CHUNK_END = auto()  # awaiting the CRLF after chunk data
    TRAILERS = auto()  # awaiting the trailer section after the last chunk
    HOLD = auto()  # request side: waiting for the app's answer to an upgrade or CONNECT
    UNTIL_CLOSE = auto()  # response side: body ends when the app closes
    RAW = auto()  # no more HTTP/1: bytes pass as they are
    LOST = auto()  # response side: cannot frame the app's responses any more


_S = State
# Where each side may go from each state; a step outside these tables is a bug (RuntimeError).
_REQUEST_NEXT: dict[State, frozenset[State]] = {
    _S.HEAD: frozenset({_S.BODY, _S.CHUNK_SIZE, _S.HOLD}),
    _S.BODY: frozenset({_S.HEAD, _S.HOLD, _S.RAW}),
    _S.CHUNK_SIZE: frozenset({_S.CHUNK_DATA, _S.TRAILERS}),
    _S.CHUNK_DATA: frozenset({_S.CHUNK_END}),
    _S.CHUNK_END: frozenset({_S.CHUNK_SIZE}),
    _S.TRAILERS: frozenset({_S.HEAD, _S.HOLD, _S.RAW}),
    _S.HOLD: frozenset({_S.HEAD, _S.RAW}),
    _S.RAW: frozenset(),
}
_RESPONSE_NEXT: dict[State, frozenset[State]] = {
    _S.HEAD: frozenset({_S.BODY, _S.CHUNK_SIZE, _S.UNTIL_CLOSE, _S.RAW, _S.LOST}),
    _S.BODY: frozenset({_S.HEAD, _S.LOST}),
    _S.CHUNK_SIZE: frozenset({_S.CHUNK_DATA, _S.TRAILERS, _S.LOST}),
    _S.CHUNK_DATA: frozenset({_S.CHUNK_END, _S.LOST}),
    _S.CHUNK_END: frozenset({_S.CHUNK_SIZE, _S.LOST}),
    _S.TRAILERS: frozenset({_S.HEAD, _S.LOST}),
    _S.UNTIL_CLOSE: frozenset(),
    _S.RAW: frozenset(),
    _S.LOST: frozenset(),
}


class _Framer:
    """The framing both directions share: a buffer of unconsumed bytes, a state, handlers per
    state, and the body walkers (Content-Length, chunked) that count bytes without copying them."""

    _HANDLERS: ClassVar[dict[State, _Handler]]
    _NEXT: ClassVar[dict[State, frozenset[State]]]

    def __init__(self) -> None:
        self.state = State.HEAD
        self._buf = bytearray()  # bytes received but not consumed: a partial head or line, or held bytes
        self._scanned = 0  # of the partial element at the start of _buf, how much was searched already
        self._left = 0  # BODY / CHUNK_DATA: bytes still to pass

    def _goto(self, state: State) -> None:
        if state not in self._NEXT[self.state]:
            raise RuntimeError(f"http1: no transition {self.state.name} -> {state.name}")
        self.state = state
        self._scanned = 0

    def _walk(self, data: bytes) -> tuple[Buffer, int]:
        """Run handlers over the unconsumed bytes plus ``data`` until one needs more input.
        Returns the buffer walked and how far it was consumed; ``_keep`` saves the rest."""
        if self._buf:
            self._buf += data
            buf: Buffer = self._buf
        else:
            buf = data
        pos = 0
        handlers = self._HANDLERS
        try:
            while True:
                state = self.state
                new = handlers[state](self, buf, pos)
                if (new == pos and self.state is state) or new == len(buf):  # every state needs a byte to move
                    return buf, new
                pos = new
        except _Malformed as bad:
            bad.buf, bad.pos = buf, pos
            raise

    def _keep(self, buf: Buffer, pos: int) -> None:
        if buf is self._buf:
            del self._buf[:pos]
        elif pos < len(buf):
            self._buf = bytearray(buf[pos:])

    def _find(self, buf: Buffer, pos: int, delim: bytes, limit: int, what: str, status: int) -> int:
        """Where ``delim`` starts after ``pos``, or -1 when it has not arrived yet. The element is
        refused when it outgrows ``limit`` or holds a byte no HTTP/1 line may hold."""
        end = buf.find(delim, pos + self._scanned - len(delim) + 1 if self._scanned >= len(delim) else pos)
        if end >= 0:
            if end + len(delim) - pos > limit:
                raise _Malformed(f"{what}_too_large", f"{what} longer than {limit} bytes", status)
            self._scanned = 0
            return end
        if len(buf) - pos > limit:
            raise _Malformed(f"{what}_too_large", f"{what} longer than {limit} bytes", status)
        _check_partial(buf, pos, max(pos, pos + self._scanned - 1), what)
        self._scanned = len(buf) - pos
        return -1

    # -- bodies -----------------------------------------------------------------------------------

    def _body(self, buf: Buffer, pos: int) -> int:
        take = min(self._left, len(buf) - pos)
        self._left -= take
        if self._left == 0:
            self._message_done()
        return pos + take

    def _chunk_size(self, buf: Buffer, pos: int) -> int:
        end = self._find(buf, pos, b"\r\n", MAX_CHUNK_LINE + 2, "chunk_line", 400)
        if end < 0:
            return pos
        m = _CHUNK_LINE.fullmatch(buf, pos, end)
        if m is None:
            raise _Malformed("bad_chunk", "malformed chunk-size line")
        size = int(m.group(1), 16)
        if size > MAX_CHUNK_SIZE:
            raise _Malformed("bad_chunk", "chunk size past 2**63-1")
        data_end = end + 2 + size
        if size and buf[data_end : data_end + 2] == b"\r\n":
            return data_end + 2  # the whole chunk is in this read: no need to walk it in steps
        if size:
            self._left = size
            self._goto(State.CHUNK_DATA)
        else:
            self._goto(State.TRAILERS)
        return end + 2

    def _chunk_data(self, buf: Buffer, pos: int) -> int:
        take = min(self._left, len(buf) - pos)
        self._left -= take
        if self._left == 0:
            self._goto(State.CHUNK_END)
        return pos + take

    def _chunk_end(self, buf: Buffer, pos: int) -> int:
        have = buf[pos : pos + 2]
        if have == b"\r\n":
            self._goto(State.CHUNK_SIZE)
            return pos + 2
        if have == b"\r" or not have:
            return pos
        raise _Malformed("bad_chunk", "chunk data not followed by CRLF")

    def _trailers(self, buf: Buffer, pos: int) -> int:
        if buf[pos : pos + 2] == b"\r\n":
            self._message_done()
            return pos + 2
        if len(buf) - pos < 2:
            return pos
        end = self._find(buf, pos, b"\r\n\r\n", MAX_HEAD, "trailers", 431)
        if end < 0:
            return pos
        self._trailer_fields(buf, pos, end)
        self._message_done()
        return end + 4

    def _trailer_fields(self, buf: Buffer, pos: int, end: int) -> None:
        """The trailer section ``buf[pos:end]`` (without its final CRLF CRLF) is complete."""

    def _message_done(self) -> None:
        raise NotImplementedError

    def _rest(self, buf: Buffer, pos: int) -> int:
        return len(buf)  # no more framing: every byte is taken as it comes

    _BODY_HANDLERS: ClassVar[dict[State, _Handler]] = {
        State.BODY: _body,
        State.CHUNK_SIZE: _chunk_size,
        State.CHUNK_DATA: _chunk_data,
        State.CHUNK_END: _chunk_end,
        State.TRAILERS: _trailers,
        State.RAW: _rest,
    }


# -- the app's responses ---------------------------------------------------------------------------


class _Asked(NamedTuple):
    """What the response side must know of one forwarded request."""

    head: bool  # HEAD: its response has no body
    connect: bool  # CONNECT: a 2xx answer opens a tunnel
    tunnel: bool  # asked to leave HTTP/1 (Upgrade or CONNECT): the request side holds after it


class _Responses(_Framer):
    """Frames the app's responses to count them; tells the rewriter how its held request was answered."""

    def __init__(self, rewriter: XfccRewriter) -> None:
        super().__init__()
        self._rewriter = rewriter
        self.asked: deque[_Asked] = deque()
        self._in_body = False

    def feed(self, data: bytes) -> None:
        if self.state in (State.RAW, State.UNTIL_CLOSE, State.LOST):
            return
        try:
            buf, pos = self._walk(data)
        except _Malformed as bad:
            self._lose(bad.detail)
            return
        self._keep(buf, pos)

    def _lose(self, why: str) -> None:
        self._goto(State.LOST)
        self._buf = bytearray()
        self._rewriter._responses_lost(why)

    def _head(self, buf: Buffer, pos: int) -> int:
        if pos == len(buf):
            return pos
        end = self._find(buf, pos, b"\r\n\r\n", MAX_HEAD, "response_head", 400)
        if end < 0:
            return pos
        head = bytes(buf[pos:end])
        line_end = head.find(b"\r\n")
        m = _STATUS_LINE.fullmatch(head, 0, line_end if line_end >= 0 else len(head))
        if m is None:
            raise _Malformed("bad_response", "not an HTTP/1.x status line")
        status = int(m.group(1))
        if 100 <= status < 200 and status != 101:
            return end + 4  # interim (100 Continue, 103 Early Hints): the request's answer is still to come
        if not self.asked:
            raise _Malformed("bad_response", "a response to no request")
        asked = self.asked.popleft()
        switched = (status == 101) or (asked.connect and 200 <= status < 300)
        if switched:
            self._goto(State.RAW)
            self._rewriter._answered(switched=True, tunnel=asked.tunnel)
            return end + 4
        self._rewriter._answered(switched=False, tunnel=asked.tunnel)
        length: int | None = None
        chunked = until_close = False
        low = head.lower()
        framing = _RESPONSE_SPECIAL.finditer(low) if b"-length:" in low or b"-encoding:" in low else ()
        for fm in framing:
            value = fm.group(2).rstrip(b" \t")
            if fm.group(1) == b"transfer-encoding":
                chunked = value.rsplit(b",", 1)[-1].strip(b" \t") == b"chunked"
                until_close = not chunked
            elif not _DIGITS.fullmatch(value) or (length is not None and int(value) != length):
                raise _Malformed("bad_response", "unusable Content-Length")
            else:
                length = int(value)
        if asked.head or status in (204, 304):
            self._message_done()
        elif chunked:
            self._in_body = True
            self._goto(State.CHUNK_SIZE)
        elif until_close or length is None:
            self._goto(State.UNTIL_CLOSE)
        elif length <= len(buf) - end - 4:
            return end + 4 + length  # the whole body is in this read (and no body: length 0)
        else:
            self._in_body = True
            self._left = length
            self._goto(State.BODY)
        return end + 4

    def _message_done(self) -> None:
        self._in_body = False
        if self.state is not State.HEAD:
            self._goto(State.HEAD)

    _HANDLERS: ClassVar[dict[State, _Handler]] = {
        **_Framer._BODY_HANDLERS,
        State.HEAD: _head,
        State.UNTIL_CLOSE: _Framer._rest,
        State.LOST: _Framer._rest,
    }
    _NEXT = _RESPONSE_NEXT


# -- the caller's requests -------------------------------------------------------------------------


class XfccRewriter(_Framer):
    """One per connection on a ``client_cert_header: xfcc`` listener.

    ``header_line`` is the whole field line to add (``xfcc.header_line(...)``), built once per
    connection; None for a caller without a certificate (plain TCP let through): every
    caller-sent x-forwarded-client-cert is still removed, and none is added. The relay calls
    ``feed`` with caller bytes and writes what it returns to the app; ``feed_response`` with app
    bytes (forwarded to the caller unchanged) and writes what *it* returns to the app too (caller
    bytes released by the app's answer to an upgrade); ``end`` and ``end_response`` when either
    side finishes sending.
    """

    def __init__(self, header_line: bytes | None) -> None:
        super().__init__()
        self._line_end = b"\r\n\r\n" if header_line is None else b"\r\n" + header_line + b"\r\n\r\n"
        self._responses = _Responses(self)
        self._out: list[Buffer] = []
        self._run_from = 0  # start of the bytes passed through unchanged since the last rewrite
        self._line_checked = False  # the partial head's request line was already validated
        self._blank = 0  # empty lines dropped before the current head
        self._tunnel = False  # the message in flight asked to leave HTTP/1
        self._answer: bool | None = None  # its answer: switched (True) or not (False), if known yet
        self._in_message = False  # part of the current request already went to the app
        self._eof = False
        self._finished = False
        self._refusal: HTTPRefusal | None = None

    # -- the relay's API ----------------------------------------------------------------------------

    @property
    def holding(self) -> bool:
        """Caller bytes are held until the app answers an upgrade: pause reading the caller."""
        return self.state is State.HOLD

    @property
    def raw(self) -> bool:
        """The app switched protocols: both directions are plain bytes from now on, and the relay
        may stop calling ``feed`` and ``feed_response`` (they would return their input / nothing)."""
        return self.state is State.RAW

    @property
    def finished(self) -> bool:
        """The caller ended and everything for the app has been returned: half-close the app leg."""
        return self._finished

    def answerable(self, *, app_ended: bool = False) -> bool:
        """A response written to the caller now (a refusal's) lands between the app's: none is in
        flight, and none is owed unless ``app_ended`` (the app sent all it will: a body that runs
        until its close has ended, and an unanswered request will get no answer)."""
        r = self._responses
        if r._buf or r._in_body:
            return False
        if r.state is State.HEAD:
            return app_ended or not r.asked
        return app_ended and r.state is State.UNTIL_CLOSE

    @property
    def refusal(self) -> HTTPRefusal | None:
        """Set once the stream is refused (also when the response side refused it)."""
        return self._refusal

    def feed(self, data: bytes) -> bytes:
        """Caller bytes in, bytes for the app out; raises ``HTTPRefusal``."""
        if self._refusal is not None:
            self._refusal.forward = b""  # delivered when it was first raised
            raise self._refusal
        if self._eof:
            raise RuntimeError("http1: feed after end")
        if self.state is State.RAW and not self._buf:
            return data
        if self.state is State.HOLD:
            self._buf += data
            if len(self._buf) > MAX_HEAD:
                raise self._fail(
                    _Malformed("hold_overflow", f"more than {MAX_HEAD} bytes sent before the upgrade's answer")
                )
            return b""
        return self._process(data)

    def end(self) -> bytes:
        """The caller finished sending. An incomplete head is dropped (the app never sees it)."""
        self._eof = True
        if self._refusal is not None:
            return b""
        if self.state is not State.HOLD:
            self._finish()
        return b""

    def feed_response(self, data: bytes) -> bytes:
        """App bytes (the relay forwards them to the caller as they are). Returns caller bytes the
        app's answer released for the app, usually none. Never raises: a refusal it causes shows
        in ``refusal`` and is raised by the next ``feed``."""
        self._responses.feed(data)
        released, self._released = self._released, b""
        return released

    def end_response(self) -> None:
        """The app finished sending: a held request will get no answer."""
        if self.state is State.HOLD and self._refusal is None:
            self._fail(_Malformed("no_answer", "the app closed before answering the upgrade"))

    # -- request side -------------------------------------------------------------------------------

    _released = b""

    def _process(self, data: bytes) -> bytes:
        out: list[Buffer] = []
        self._out, self._run_from = out, 0
        try:
            buf, pos = self._walk(data)
        except _Malformed as bad:
            self._pass(bad.buf, bad.pos)  # what was valid before the refused element, in this read
            refusal = self._fail(bad)
            refusal.forward = b"".join(out)
            raise refusal from None
        self._pass(buf, pos)
        self._keep(buf, pos)
        if self._eof and self.state is not State.HOLD:
            self._finish()
        if len(out) == 1 and type(out[0]) is bytes:
            return out[0]
        return b"".join(out)

    def _fail(self, bad: _Malformed) -> HTTPRefusal:
        refusal = HTTPRefusal(bad.reason, bad.detail, status=bad.status, partial=self._in_message)
        self._buf = bytearray()
        self._refusal = refusal
        return refusal

    def _finish(self) -> None:
        self._buf = bytearray()
        self._finished = True

    def _pass(self, buf: Buffer, upto: int) -> None:
        """Everything from the last rewrite up to ``upto`` goes to the app unchanged."""
        if upto > self._run_from:
            self._out.append(buf[self._run_from : upto])
        self._run_from = upto

    def _head(self, buf: Buffer, pos: int) -> int:
        if pos == len(buf):
            return pos
        if len(self._responses.asked) >= MAX_PIPELINED:
            self._goto(State.HOLD)  # so many requests unanswered: the next waits for an answer
            return pos
        if buf[pos : pos + 2] == b"\r\n":  # empty lines before a request are ignored (RFC 9112 2.2)
            self._pass(buf, pos)
            self._blank += 2
            self._run_from = pos + 2
            if self._blank > MAX_HEAD:
                raise _Malformed("head_too_large", f"more than {MAX_HEAD} bytes of empty lines", 431)
            return pos + 2
        if buf[pos : pos + 2] == b"\r":
            return pos
        end = self._find(buf, pos, b"\r\n\r\n", MAX_HEAD - self._blank, "head", 431)
        if end < 0:
            if not self._line_checked:
                line_end = buf.find(b"\r\n", pos)
                if line_end >= 0:
                    if _REQUEST_LINE.fullmatch(buf, pos, line_end) is None:
                        raise _Malformed("bad_request_line", "not an HTTP/1.0 or HTTP/1.1 request line")
                    self._line_checked = True
            return pos
        head = bytes(buf[pos:end])
        m = _HEAD.fullmatch(head)
        if m is None:
            raise _diagnose(head)
        fields = head.count(b"\r\n")
        if fields > MAX_FIELDS:
            raise _Malformed("too_many_fields", f"more than {MAX_FIELDS} header fields", 431)
        method, target, http10 = m.group(1), m.group(2), m.group(3) == b"0"
        connect = method == b"CONNECT"
        if not (_AUTHORITY.fullmatch(target) if connect else target[:1] == b"/" or target == b"*" or b"://" in target):
            raise _Malformed("bad_request_line", "host:port is the target of CONNECT and of nothing else")
        length: int | None = None
        chunked = upgrade = False
        drop: list[tuple[int, int]] = []
        low = head.lower()
        if low.count(b"\r\nhost:") > 1:
            raise _Malformed("duplicate_host", "more than one Host")
        # Most heads hold none of the names below: a few substring tests spare them the scan.
        hinted = b"_length:" in low or b"-length:" in low or b"_encoding:" in low or b"-encoding:" in low
        hinted = hinted or b"\r\nupgrade:" in low or b"forwarded" in low
        for fm in _SPECIAL.finditer(low) if hinted else ():
            name = fm.group(1)
            if b"_" in name and not name.startswith(b"x"):
                # A CGI-style server reads Content_Length as Content-Length: two framings.
                raise _Malformed("bad_field", f"framing field spelled with '_': {name.decode()}")
            # Framing values may be padded with spaces only: a parser that does not trim a tab
            # would read "chunked\t" as another coding, or "5\t" as no length at all.
            if name == b"content-length":
                value = fm.group(2).strip(b" ")
                if length is not None:
                    raise _Malformed("ambiguous_length", "more than one Content-Length")
                if not _DIGITS.fullmatch(value):
                    raise _Malformed("bad_content_length", "Content-Length is not a number")
                length = int(value)
            elif name == b"transfer-encoding":
                if chunked:
                    raise _Malformed("bad_transfer_encoding", "more than one Transfer-Encoding")
                if fm.group(2).strip(b" ") != b"chunked":
                    raise _Malformed("bad_transfer_encoding", "Transfer-Encoding other than chunked")
                chunked = True
            elif name == b"upgrade":
                upgrade = True
                _check_upgrade(fm.group(2))
            else:
                drop.append(fm.span())
        if chunked and length is not None:
            raise _Malformed("ambiguous_length", "Transfer-Encoding with Content-Length")
        if chunked and http10:
            raise _Malformed("bad_transfer_encoding", "Transfer-Encoding in an HTTP/1.0 request")
        if connect and (chunked or length is not None):
            raise _Malformed("connect_with_body", "CONNECT with Content-Length or Transfer-Encoding")
        tunnel = connect or upgrade
        if tunnel and self._responses.state is State.LOST:
            raise _Malformed("responses_untracked", "upgrade asked after the app's responses became unframable")

        # Valid: forward the head with the caller's xfcc lines removed and the sidecar's appended.
        self._pass(buf, pos)
        self._out.append(_without(head, drop) if drop else head)
        self._out.append(self._line_end)
        self._run_from = end + 4
        self._line_checked = False
        self._blank = 0
        self._tunnel, self._answer = tunnel, None
        self._responses.asked.append(_Asked(method == b"HEAD", connect, tunnel))
        if chunked:
            self._in_message = True
            self._goto(State.CHUNK_SIZE)
        elif length and length <= len(buf) - end - 4:
            self._message_done()  # the whole body is in this read: it passes with the run
            return end + 4 + length
        elif length:
            self._in_message = True
            self._left = length
            self._goto(State.BODY)
        else:
            self._message_done()
        return end + 4

    def _trailer_fields(self, buf: Buffer, pos: int, end: int) -> None:
        block = b"\r\n" + bytes(buf[pos:end])
        if _TRAILERS.fullmatch(block) is None:
            raise _Malformed("bad_trailer", "malformed trailer field")
        if block.count(b"\r\n") > MAX_FIELDS:
            raise _Malformed("too_many_fields", f"more than {MAX_FIELDS} trailer fields", 431)
        drop = []
        low = block.lower()
        if b"\r\nhost:" in low:
            raise _Malformed("bad_trailer", "host in trailers")
        for fm in _SPECIAL.finditer(low):
            if fm.group(1).startswith(b"x"):
                drop.append(fm.span())
            elif fm.group(1) != b"upgrade":
                raise _Malformed("bad_trailer", f"{fm.group(1).decode()} in trailers")
        if drop:
            self._pass(buf, pos)
            rest = _without(block, drop)[2:]
            self._out.append(rest + b"\r\n\r\n" if rest else b"\r\n")
            self._run_from = end + 4

    def _message_done(self) -> None:
        self._in_message = False
        if not self._tunnel:
            nxt = State.HEAD
        elif self._answer is None:
            nxt = State.HOLD
        else:
            nxt = State.RAW if self._answer else State.HEAD
            self._tunnel = False
        if nxt is not self.state:
            self._goto(nxt)

    def _hold(self, buf: Buffer, pos: int) -> int:
        return pos  # bytes stay in the buffer until the app answers (feed_response)

    _HANDLERS: ClassVar[dict[State, _Handler]] = {**_Framer._BODY_HANDLERS, State.HEAD: _head, State.HOLD: _hold}
    _NEXT = _REQUEST_NEXT

    # -- told by the response side ------------------------------------------------------------------

    def _answered(self, *, switched: bool, tunnel: bool) -> None:
        """The app gave the final answer to a request (``tunnel``: one that asked to switch)."""
        if self._refusal is not None:
            return
        if switched and not tunnel:
            self._fail(_Malformed("unexpected_switch", "the app switched protocols on a request that did not ask"))
            return
        if tunnel:
            self._answer = switched
        elif self._tunnel or self.state is not State.HOLD:
            return  # an earlier request's answer; nothing waits on it
        if self.state is not State.HOLD:
            return  # the request's own body is still streaming; _message_done reads the answer
        self._tunnel = False
        held, self._buf = bytes(self._buf), bytearray()
        self._goto(State.RAW if switched else State.HEAD)
        if switched:
            self._released = held
        elif held:
            try:
                self._released = self._process(held)
            except HTTPRefusal as refusal:
                self._released, refusal.forward = refusal.forward, b""
        if self._eof and self.state is not State.HOLD:
            self._finish()

    def _responses_lost(self, why: str) -> None:
        if self._refusal is None and (self.state is State.HOLD or self._tunnel):
            self._fail(_Malformed("responses_untracked", why))  # an upgrade whose answer cannot be known


def _without(block: bytes, spans: list[tuple[int, int]]) -> bytes:
    """``block`` with the field lines at ``spans`` (each from its leading CRLF to its end) cut out."""
    kept, at = [], 0
    for start, stop in spans:
        kept.append(block[at:start])
        at = stop
    kept.append(block[at:])
    return b"".join(kept)


def _check_partial(buf: Buffer, element: int, start: int, what: str) -> None:
    """Refuse what can never become valid now rather than when the limit is reached: a control
    byte, a bare LF, or a CR not followed by LF (a CR at the very end may yet meet its LF)."""
    bad = _CONTROL.search(buf, start)
    if bad is not None:
        raise _Malformed("bad_bytes", f"byte 0x{buf[bad.start()]:02x} in {what}")
    if start > element and buf[start - 1 : start + 1] == b"\r\n":
        start += 1
    crlf = buf.count(b"\r\n", start)
    lone_cr = buf.count(b"\r", start) - crlf
    if buf.count(b"\n", start) != crlf or lone_cr > 1 or (lone_cr == 1 and buf[-1] != 0x0D):
        raise _Malformed("bad_line_ending", f"bare CR or LF in {what}")


def _check_upgrade(value: bytes) -> None:
    for item in value.split(b","):
        m = _UPGRADE_TOKEN.match(item)
        name = m.group(1) if m is not None else b""
        if name in _HIDDEN_HTTP_UPGRADES:
            raise _Malformed("bad_upgrade", f"upgrade to {name.decode(errors='replace')} would hide requests")


def _diagnose(head: bytes) -> _Malformed:
    """Why a complete head failed the one-regex check, named as a partial read would name it."""
    try:
        _check_partial(head, 0, 0, "head")
    except _Malformed as bad:
        return bad
    lines = head.split(b"\r\n")
    shape = _REQUEST_SHAPE.fullmatch(lines[0])
    if shape is not None and shape.group(1) not in (b"HTTP/1.0", b"HTTP/1.1"):
        return _Malformed("bad_version", "not HTTP/1.0 or HTTP/1.1")
    if _REQUEST_LINE.fullmatch(lines[0]) is None:
        return _Malformed("bad_request_line", "malformed request line")
    for line in lines[1:]:
        if _FIELD.fullmatch(line) is not None:
            continue
        if line[:1] in (b" ", b"\t"):
            return _Malformed("obs_fold", "obs-folded header line")
        name, colon, _ = line.partition(b":")
        if colon and name.rstrip(b" \t") != name:
            return _Malformed("bad_field", "whitespace before a colon")
        return _Malformed("bad_field", "malformed header field")
    return _Malformed("bad_field", "malformed head")
