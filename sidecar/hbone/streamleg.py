"""One leg of a proxied connection that is an HTTP/2 CONNECT stream of an HBONE tunnel.

A ``StreamLeg`` behaves toward the driver and the other leg exactly as a ``Leg`` does (``send``,
``send_eof``, ``close``, ``abort``, ``start_streaming``, ``received``), over a stream instead of a
socket: its bytes are DATA frames, its end of data END_STREAM, its abort RST_STREAM.

- Flow control: the stream's receive window is handed back only while the other leg's socket takes
  what it is given (not paused at its high-water mark), so a slow reader stops its writer after one
  stream window; ``send`` pauses the other leg's reading when the stream's send queue is full, and
  the tunnel's ``writable`` resumes it.
- The answer: a stream in (we are the server) is answered 200 when it starts streaming (the dial
  succeeded), 403 when it closes refused, 503 when it closes otherwise before that; a stream out
  (we are the client) is connected by the peer's 200, and any other answer fails its open.
- A received RST_STREAM is reported as the leg lost to a ``StreamResetError`` (a
  ``ConnectionResetError``), which the relay passes on as a TCP reset of the other leg.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from h2.errors import ErrorCodes

from .. import legs
from ..legs import Bytes, Leg, LegOwner
from ..record import Outcome
from ..relay import Side
from ..tlsio import Negotiated

STATUS_DENIED = 403
STATUS_UNAVAILABLE = 503


class StreamResetError(ConnectionResetError):
    """The peer reset the stream (RST_STREAM), or its tunnel failed under it."""

    def __init__(self, error_code: int) -> None:
        try:
            name = ErrorCodes(error_code).name
        except ValueError:
            name = str(error_code)
        super().__init__(f"stream reset by the peer ({name})")
        self.error_code = error_code


class StreamRefusedError(ConnectionRefusedError):
    """The peer answered the CONNECT with a status other than 200."""

    def __init__(self, status: int) -> None:
        super().__init__(f"the peer answered {status}")
        self.status = status


class StreamHost(Protocol):
    """What a stream leg asks of the tunnel it lives on; each call sends what it must at once."""

    @property
    def negotiated(self) -> Negotiated | None: ...  # the tunnel's verified TLS peer

    @property
    def peer_address(self) -> str: ...  # the tunnel's far end, ``ip:port``

    def send(self, stream_id: int, data: Bytes) -> bool: ...  # False: pause the writer

    def end_stream(self, stream_id: int) -> None: ...

    def reset(self, stream_id: int, error_code: int) -> None: ...

    def consumed(self, stream_id: int, size: int) -> None: ...

    def accept(self, stream_id: int) -> None: ...  # a stream in: 200

    def refuse(self, stream_id: int, status: int) -> None: ...  # a stream in: another final status


class StreamLeg(Leg):
    """A CONNECT stream as one leg of a proxied connection."""

    __slots__ = ("_answer", "_connected", "_owed", "_reset", "answered", "host", "incoming", "stream_id")

    def __init__(self, owner: LegOwner, side: Side) -> None:
        super().__init__(owner, side)
        self.host: StreamHost | None = None  # the tunnel, once attached
        self.stream_id: int | None = None
        self.incoming = False  # a stream the peer opened: we answer it
        self.answered = False  # in: 200 or a refusal sent; out: the peer's 200 came
        self._connected = False  # in: from the start; out: from the 200
        self._answer: asyncio.Future[None] | None = None  # out: the open waiting for the peer's answer
        self._owed = 0  # bytes delivered but not yet handed back to the peer's window
        self._reset: StreamResetError | None = None

    # -- the leg's interface ----------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def verified(self) -> Negotiated | None:
        return self.host.negotiated if self.host is not None else None

    def far_address(self) -> str:
        return self.host.peer_address if self.host is not None else "-"

    def send(self, data: Bytes) -> None:
        host, sid = self.host, self.stream_id
        if host is None or sid is None or self.lost or self.write_eof:
            return
        if type(data) is memoryview:
            data = bytes(data)  # a view of a TLS leg's reused buffer: the stream's queue may keep it
        if not host.send(sid, data):
            self.pause_writing()  # the stream's queue is full: the other leg stops reading

    def send_eof(self) -> None:
        host, sid = self.host, self.stream_id
        if host is None or sid is None or self.lost or self.write_eof:
            return
        self.write_eof = True
        host.end_stream(sid)

    def start_streaming(self, other: Leg) -> None:
        host, sid = self.host, self.stream_id
        if self.incoming and not self.answered and host is not None and sid is not None:
            self.answered = True
            host.accept(sid)  # the dial succeeded: 200, then what the peer sent meanwhile
        super().start_streaming(other)

    def close(self) -> None:
        """End our direction and linger until the peer ends its own (then the stream is over); a
        stream in not yet answered is answered 403 (refused) or 503."""
        host, sid = self.host, self.stream_id
        if host is None or sid is None or self.lost or self._lingering:
            return
        if not self.answered:
            if self.incoming:
                self.answered = True
                denied = self.owner.outcome is Outcome.DENIED
                host.refuse(sid, STATUS_DENIED if denied else STATUS_UNAVAILABLE)
            return  # out: the open still waiting is cancelled, and resets the stream itself
        self.send_eof()
        if self.read_eof or self.lost:
            return  # both directions are done: the stream closes as our END_STREAM goes out
        self._lingering = True
        self._held = None
        self.other = None
        self._update_reading()  # what is still owed goes back: the peer may finish sending
        self._linger_timer = self.owner.loop.call_later(legs.LINGER_SECONDS, self._linger_over)

    def abort(self, reset: bool = False) -> None:
        """RST_STREAM(CONNECT_ERROR) at once, whether or not a reset is being passed on."""
        host, sid = self.host, self.stream_id
        if host is None or sid is None or self.lost or (not self.incoming and not self.answered):
            return  # out and not answered yet: the cancelled open resets it
        self.answered = True
        host.reset(sid, ErrorCodes.CONNECT_ERROR)

    # -- attaching to a stream ----------------------------------------------------------------------

    def attach(self, host: StreamHost, stream_id: int, *, incoming: bool) -> None:
        """This leg is stream ``stream_id`` of ``host``: one the peer opened (``incoming``: it is up,
        report it with ``begin``), or one whose CONNECT we sent (``answer`` awaits the reply)."""
        self.host, self.stream_id, self.incoming = host, stream_id, incoming
        if incoming:
            self._connected = True
        else:
            self._answer = self.owner.loop.create_future()

    def begin(self) -> None:
        """In: report the stream up to the driver (which authorizes it and dials)."""
        self.owner.leg_connected(self)

    async def answer(self) -> None:
        """Until the peer answers 200; raises ``StreamRefusedError`` or ``StreamResetError``."""
        assert self._answer is not None, "attach first"
        await self._answer

    # -- what the tunnel reports ------------------------------------------------------------------

    def accepted(self) -> None:
        """Out: the peer answered 200."""
        self.answered = self._connected = True
        self.owner.leg_connected(self)
        if self._answer is not None and not self._answer.done():
            self._answer.set_result(None)

    def rejected(self, status: int) -> None:
        """Out: the peer answered ``status``; its reset and close follow."""
        self._fail_open(StreamRefusedError(status))

    def data(self, chunk: Bytes) -> None:
        self._owed += len(chunk)
        if not self._lingering:
            self._deliver(chunk)  # to the other leg, or held until streaming
        self._update_reading()

    def ended(self) -> None:
        """The peer sent END_STREAM."""
        if not self._lingering:
            self._end_of_data()

    def was_reset(self, error_code: int) -> None:
        self._reset = StreamResetError(error_code)
        self._fail_open(self._reset)

    def writable(self) -> None:
        """The stream's send queue drained: the other leg may read again."""
        self.resume_writing()

    def closed(self) -> None:
        """The stream is over (its last event): the leg is gone."""
        if self.lost:
            return
        self.lost = True
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        self._fail_open(self._reset or StreamResetError(ErrorCodes.CANCEL))
        if self._connected:
            self.owner.leg_lost(self, self._reset)

    # -- internals --------------------------------------------------------------------------------

    def _update_reading(self) -> None:
        """Hand the window back for what was delivered, unless the other leg's socket is full."""
        host, sid, owed = self.host, self.stream_id, self._owed
        if host is None or sid is None or not owed or self.lost:
            return
        if not self._lingering and (self._other_full or self.other is None):
            return
        self._owed = 0
        host.consumed(sid, owed)

    def _fail_open(self, error: OSError) -> None:
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(error)

    def _linger_over(self) -> None:
        self._linger_timer = None
        host, sid = self.host, self.stream_id
        if host is not None and sid is not None and not self.lost:
            host.reset(sid, ErrorCodes.CANCEL)  # the peer never finished: give up on the rest
