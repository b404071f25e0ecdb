"""The shared core of an HBONE connection: HTTP/2 (python-hyper's ``h2``) over one TLS stream, sans-IO.

Theory of operation. The driver feeds the TLS plaintext in (``receive_data``), reads ``events()``
and writes ``output()`` (or ``data_to_send()``, the same joined) back out; it never touches ``h2``
itself. Each CONNECT stream is a
TCP connection's stand-in: DATA is its bytes, END_STREAM its FIN, RST_STREAM its reset.

Flow control, both ways, is what keeps memory bounded and one slow stream from stalling the rest:

- Receiving: the *stream* window is reopened only by ``consumed`` -- when the driver has really
  written the bytes to the stream's TCP side -- so a stalled reader stops its writer after one
  stream window, and that window bounds what this side holds for the stream. The *connection*
  window is reopened as soon as DATA arrives, so data parked on a stalled stream never holds
  connection credit the other streams need (with h2's usual "credit on consume" for the
  connection too, a few stalled streams could starve every other stream on it).
- Sending: ``send`` queues a stream's bytes and moves them into DATA frames only as the peer's
  windows allow, taking one frame per stream per round so streams share the connection window
  fairly; past ``send_buffer`` queued bytes it returns False (pause that TCP reader) and a later
  ``StreamWritable`` says when to resume. ``pause_output`` stops all of this while the TLS
  transport's own buffer is full.

A driver may take stream bytes through ``on_data`` instead of ``StreamData`` events; they come in
order, possibly before the stream's ``StreamAccepted`` has been read from ``events()`` (the driver
holds what comes first).

The bulk of the bytes, DATA frames of flowing streams, bypass h2's frame objects: an incoming
payload is handed on as views of the received bytes as they arrive (no copy, no waiting for the
whole frame) and an outgoing one is written after its 9-byte header, while h2 keeps the state
machines and every window exactly as if it had handled them (``_take_data``, ``_write_data``).
Every other frame, and DATA that ends or pads a stream, goes through h2 whole and in order.
"""

from __future__ import annotations

import contextlib
import itertools
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import h2.events as h2e
from h2.config import H2Configuration
from h2.connection import ConnectionState, H2Connection
from h2.errors import ErrorCodes
from h2.exceptions import FlowControlError, FrameTooLargeError, ProtocolError, StreamClosedError
from h2.settings import SettingCodes, Settings
from h2.stream import H2Stream, StreamState
from hyperframe.frame import DataFrame, Frame, GoAwayFrame

from ..legs import Bytes
from . import events as ev

MiB = 1024 * 1024
DEFAULT_CONNECTION_WINDOW = 65535  # RFC 9113: every connection starts with this much credit
STATUS_OK = 200
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # what a client sends first (RFC 9113 3.4)
FRAME_HEADER = 9
_HEADER = struct.Struct(">BHBBL")  # length (24 bits, as 8 + 16), type, flags, reserved bit + stream id
COPY_BELOW = 16 * 1024  # smaller DATA payloads are copied behind their header: one TLS record, not two
DATA = 0x0
END_STREAM_OR_PADDED = 0x1 | 0x8  # DATA flags that change a stream's state or its payload's meaning
_FLOWING = (StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL)  # states where DATA may arrive and go on
_OPEN = (ConnectionState.CLIENT_OPEN, ConnectionState.SERVER_OPEN)


@dataclass(frozen=True)
class TunnelSettings:
    """The sizes one HBONE connection works with; docs/hbone.md says why these defaults."""

    stream_window: int = 4 * MiB  # SETTINGS_INITIAL_WINDOW_SIZE: the most held per stream
    connection_window: int = 16 * MiB  # what may be in flight on the TLS connection at once
    max_frame_size: int = 256 * 1024  # SETTINGS_MAX_FRAME_SIZE we accept; the peer's caps what we send
    max_concurrent_streams: int = 100  # streams we let the peer open at once
    max_header_list_size: int = 16 * 1024
    send_buffer: int = 256 * 1024  # queued bytes per stream before ``send`` says "pause"
    keepalive_interval: float = 10.0  # a PING after this long without a byte from the peer
    keepalive_timeout: float = 20.0  # no PING ack within this: the connection is dead


class _QuietDataFrame(DataFrame):
    """A DATA frame whose repr does not hex-dump its payload (see ``_H2._receive_frame``)."""

    def __repr__(self) -> str:
        return f"DataFrame(stream_id={self.stream_id}, length={len(self.data)})"


class _H2(H2Connection):
    """``h2`` with two changes, each pinned by a test:

    - RFC 9113 6.8's graceful GOAWAY: h2 (python-hyper/h2#1181) closes the whole connection when
      a GOAWAY is sent or received, cutting streams that may finish. Here a GOAWAY with NO_ERROR
      only stops new streams; an error GOAWAY still closes everything at once.
    - h2 formats every received frame for a trace log even when nothing logs it; for DATA that is
      a hex dump of the payload, a third of bulk transfer's CPU (bench/hbone_frames.py). DATA
      frames get a short repr instead.
    """

    def __init__(self, config: H2Configuration) -> None:
        super().__init__(config)
        self._frame_dispatch_table[_QuietDataFrame] = self._receive_data_frame

    def _receive_frame(self, frame: Frame) -> list[h2e.Event]:
        if type(frame) is DataFrame:
            frame.__class__ = _QuietDataFrame
        return super()._receive_frame(frame)

    def _receive_goaway_frame(self, frame: GoAwayFrame) -> tuple[list[Frame], list[h2e.Event]]:
        if frame.error_code != ErrorCodes.NO_ERROR:
            return super()._receive_goaway_frame(frame)
        event = h2e.ConnectionTerminated()
        event.error_code = ErrorCodes.NO_ERROR
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]

    def send_goaway(self) -> None:
        """GOAWAY(NO_ERROR) naming the last stream the peer opened; the connection stays open."""
        state = self.state_machine.state
        self.close_connection(ErrorCodes.NO_ERROR)
        self.state_machine.state = state


@dataclass
class _Stream:
    """This side's bookkeeping for one CONNECT stream."""

    stream_id: int
    open_for_data: bool = False  # client: a 200 arrived; server: ``accept`` was called
    out: deque[Bytes] = field(default_factory=deque)  # queued toward the peer, uncopied
    queued: int = 0  # bytes in ``out``
    end_requested: bool = False  # the TCP side finished sending; END_STREAM once ``out`` drains
    local_ended: bool = False
    remote_ended: bool = False
    paused: bool = False  # ``send`` returned False; a StreamWritable is owed
    uncredited: int = 0  # consumed bytes not yet handed back in a stream WINDOW_UPDATE
    held: list[bytes | memoryview] | None = None  # server: DATA that came before ``accept``


class TunnelConnection:
    """One HTTP/2 connection carrying CONNECT streams; ``HboneServer`` and ``HboneClient`` add the
    request and response halves."""

    def __init__(self, *, client_side: bool, settings: TunnelSettings, now: float) -> None:
        self.settings = settings
        self._h2 = _H2(H2Configuration(client_side=client_side, header_encoding=None))
        self._h2.local_settings = Settings(
            client=client_side,
            initial_values={
                SettingCodes.ENABLE_PUSH: 0,
                SettingCodes.MAX_CONCURRENT_STREAMS: settings.max_concurrent_streams,
                SettingCodes.INITIAL_WINDOW_SIZE: settings.stream_window,
                SettingCodes.MAX_FRAME_SIZE: settings.max_frame_size,
                SettingCodes.MAX_HEADER_LIST_SIZE: settings.max_header_list_size,
            },
        )
        self._h2.max_inbound_frame_size = settings.max_frame_size
        self._h2.initiate_connection()
        if settings.connection_window > DEFAULT_CONNECTION_WINDOW:
            self._h2.increment_flow_control_window(settings.connection_window - DEFAULT_CONNECTION_WINDOW)
        # A driver that takes a stream's bytes at once sets this instead of reading StreamData
        # events: bulk and keep-alive traffic then costs no event object per chunk.
        self.on_data: Callable[[int, Bytes], None] | None = None
        self._pieces: list[Bytes] = []  # output before h2's own buffer: large payloads stay uncopied
        self._partial: bytearray | None = None  # the start of a header, or of a frame for h2, split across reads
        self._partial_left: int | None = None  # bytes of that frame still to come (None: still its header)
        self._data_stream = 0  # the stream of the DATA payload being taken here
        self._data_left = 0  # bytes of that payload still to come
        self._preface_left = 0 if client_side else len(PREFACE)
        self._streams: dict[int, _Stream] = {}
        self._sending: dict[int, None] = {}  # streams with queued bytes or a pending END_STREAM, in turn order
        self._events: list[ev.Event] = []
        self._uncredited_connection = 0
        self._output_paused = False
        self._seen_peer_settings = False
        self.goaway_sent = False  # this side said "no new streams"; taken ones may finish
        self.goaway_received = False  # the peer said so
        self.failed = False  # dead: nothing more goes either way
        self._last_heard = now
        self._ping_sent_at: float | None = None
        self._ping_ids = itertools.count(1)

    # -- the driver's side: bytes in, events and bytes out ----------------------------------

    def receive_data(self, data: Bytes, now: float) -> None:
        """Feed bytes read from the TLS connection; then read ``events()`` and ``data_to_send()``."""
        self._last_heard = now
        if self.failed:
            return
        try:
            self._receive(data)
        except ProtocolError as exc:  # FlowControlError is one too: a peer overran a window
            code = ErrorCodes.FLOW_CONTROL_ERROR if isinstance(exc, FlowControlError) else ErrorCodes.PROTOCOL_ERROR
            self._fail(code, f"protocol error: {exc}")
            return
        self._flush()

    def events(self) -> list[ev.Event]:
        """Everything that happened since the last call, in order."""
        out, self._events = self._events, []
        return out

    def data_to_send(self) -> bytes:
        """Everything to write to the TLS connection, in order, as one string."""
        return b"".join(self.output())

    def output(self) -> list[Bytes]:
        """The same as pieces to write in order, large DATA payloads uncopied."""
        h2 = self._h2
        pieces, last = self._pieces, h2._data_to_send
        if last:
            h2._data_to_send = bytearray()
            if not pieces:
                return [last]
            pieces.append(last)
        elif not pieces:
            return pieces
        self._pieces = []
        return pieces

    def pause_output(self) -> None:
        """The TLS transport's buffer is full: stop turning queued stream bytes into frames."""
        self._output_paused = True

    def resume_output(self) -> None:
        self._output_paused = False
        self._flush()

    def tick(self, now: float) -> None:
        """Keepalive, called now and then: PING a silent peer, give up on one that stays silent."""
        if self.failed:
            return
        s = self.settings
        if self._ping_sent_at is not None:
            if now - self._ping_sent_at >= s.keepalive_timeout:
                self._fail(ErrorCodes.NO_ERROR, "keepalive timeout")
        elif now - self._last_heard >= s.keepalive_interval:
            self._h2.ping(next(self._ping_ids).to_bytes(8, "big"))
            self._ping_sent_at = now

    def stop_streams(self) -> None:
        """Graceful GOAWAY: the peer opens no new streams (later ones are refused); the open
        streams finish. For a drain, or a pooled connection the client retires."""
        if not self.goaway_sent and not self.failed:
            self.goaway_sent = True
            self._h2.send_goaway()

    def close(self) -> None:
        """The final GOAWAY before the driver closes the TLS connection; open streams are reset."""
        if not self.failed:
            self._fail(ErrorCodes.NO_ERROR, "closed")

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    @property
    def usable(self) -> bool:
        """Whether new streams may start on this connection."""
        return not (self.goaway_sent or self.goaway_received or self.failed)

    # -- the stream's side ----------------------------------------------------------------

    def send(self, stream_id: int, data: Bytes) -> bool:
        """Queue bytes from the stream's TCP side; False means "pause reading it" until a
        ``StreamWritable``. Bytes for a stream that is gone are dropped (it was reset)."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.end_requested:
            return True
        if not stream.queued and stream.open_for_data and not self._output_paused and not self.failed:
            h2, size = self._h2, len(data)
            window = min(h2.outbound_flow_control_window, h2.streams[stream_id].outbound_flow_control_window)
            if size <= window and size <= h2.max_outbound_frame_size:
                self._write_data(stream_id, data)  # nothing waits ahead of it and it fits: one frame now
                return True
        if data:
            stream.out.append(data)
            stream.queued += len(data)
        self._sending[stream_id] = None
        self._flush()
        if stream.queued >= self.settings.send_buffer:
            stream.paused = True
            return False
        return True

    def end_stream(self, stream_id: int) -> None:
        """The TCP side finished sending (FIN): END_STREAM once the queued bytes are out."""
        stream = self._streams.get(stream_id)
        if stream is not None and not stream.end_requested:
            stream.end_requested = True
            self._sending[stream_id] = None
            self._flush()

    def reset(self, stream_id: int, error_code: int = ErrorCodes.CONNECT_ERROR) -> None:
        """The TCP side was aborted: RST_STREAM (CONNECT_ERROR by default); queued bytes are
        dropped and ``StreamClosed`` follows."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        if not self.failed:
            # h2 may already know the stream closed from frames whose events are still on their way
            with contextlib.suppress(StreamClosedError):
                self._h2.reset_stream(stream_id, error_code)
        self._forget(stream)
        self._events.append(ev.StreamClosed(stream_id))

    def consumed(self, stream_id: int, size: int) -> bool:
        """``size`` bytes of this stream's data were written out: hand the window back. True when
        that put a WINDOW_UPDATE in ``data_to_send``."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.remote_ended or self.failed:
            return False
        stream.uncredited += size
        if stream.uncredited < self.settings.stream_window // 4:
            return False
        with contextlib.suppress(StreamClosedError):
            self._h2.increment_flow_control_window(stream.uncredited, stream_id=stream_id)
        stream.uncredited = 0
        return True

    # -- shared internals -------------------------------------------------------------------

    def _receive(self, data: Bytes) -> None:
        """Cut the received bytes into frames. The payload of a DATA frame of a flowing stream is
        handed on piece by piece as it arrives, as views of ``data`` (no copy, whichever reads the
        frame spans); every other frame goes to h2 whole and in order, so h2 never holds a part."""
        view = memoryview(data)
        end, pos = len(view), 0
        if self._preface_left:  # the client's preface: h2 checks it
            pos = min(self._preface_left, end)
            self._preface_left -= pos
        h2_from = 0  # view[h2_from:pos] is whole frames (or the preface) not yet handed to h2
        while pos < end:
            if self._data_left:  # inside a DATA payload taken here
                n = min(self._data_left, end - pos)
                self._data_left -= n
                self._on_data(self._data_stream, view[pos : pos + n], n)
                pos = h2_from = pos + n
                continue
            if self._partial is not None:  # inside a header, or a frame for h2, split across reads
                pos = h2_from = self._continue_partial(view, pos)
                continue
            if end - pos < FRAME_HEADER:  # a header split across reads: the rest comes later
                if h2_from < pos:
                    self._feed_h2(view[h2_from:pos])
                self._partial, self._partial_left = bytearray(view[pos:]), None
                pos = h2_from = end
                break
            length, flowing = self._header(view, pos)
            if flowing is not None:
                if h2_from < pos:
                    self._feed_h2(view[h2_from:pos])
                self._take_data(flowing, length)
                pos = h2_from = pos + FRAME_HEADER
                continue
            stop = pos + FRAME_HEADER + length
            if stop > end:  # a frame for h2 that has not all arrived: its start waits
                if h2_from < pos:
                    self._feed_h2(view[h2_from:pos])
                self._partial, self._partial_left = bytearray(view[pos:]), stop - end
                pos = h2_from = end
                break
            pos = stop
        if h2_from < pos:
            self._feed_h2(view[h2_from:pos])

    def _continue_partial(self, view: memoryview, pos: int) -> int:
        """Add to the header or frame begun in an earlier read; where the next byte to look at is."""
        partial = self._partial
        assert partial is not None
        if self._partial_left is None:  # still a header
            n = min(FRAME_HEADER - len(partial), len(view) - pos)
            partial += view[pos : pos + n]
            pos += n
            if len(partial) < FRAME_HEADER:
                return pos
            length, flowing = self._header(partial, 0)
            if flowing is not None:
                self._partial = None
                self._take_data(flowing, length)
                return pos
            self._partial_left = length
        n = min(self._partial_left, len(view) - pos)
        partial += view[pos : pos + n]
        self._partial_left -= n
        if not self._partial_left:
            self._partial, self._partial_left = None, None
            self._feed_h2(memoryview(partial))
        return pos + n

    def _header(self, buf: Bytes, at: int) -> tuple[int, H2Stream | None]:
        """The frame's payload length (refused past our SETTINGS_MAX_FRAME_SIZE), and h2's stream
        when the frame is DATA that may bypass h2: a flowing stream, and no END_STREAM or padding
        (which change its state or its payload's meaning)."""
        high, low, kind, flags, stream_id = _HEADER.unpack_from(buf, at)
        length = high << 16 | low
        h2 = self._h2
        if length > h2.max_inbound_frame_size:
            raise FrameTooLargeError(f"received a frame of {length} bytes, more than SETTINGS_MAX_FRAME_SIZE")
        if kind != DATA or flags & END_STREAM_OR_PADDED:
            return length, None
        stream_id &= 0x7FFFFFFF
        if stream_id not in self._streams or h2.state_machine.state not in _OPEN:
            return length, None
        h2s = h2.streams.get(stream_id)
        return length, (h2s if h2s is not None and h2s.state_machine.state in _FLOWING else None)

    def _take_data(self, h2s: H2Stream, length: int) -> None:
        """A DATA frame of ``length`` taken without h2: its windows consume it now, as h2's own
        receive would; its payload follows as it arrives."""
        self._h2._inbound_flow_control_window_manager.window_consumed(length)  # FlowControlError if overrun
        h2s._inbound_window_manager.window_consumed(length)
        self._data_stream, self._data_left = h2s.stream_id, length

    def _feed_h2(self, frames: memoryview) -> None:
        for event in self._h2.receive_data(frames):
            self._dispatch(event)

    def _write_data(self, stream_id: int, chunk: Bytes) -> None:
        """One DATA frame without h2's frame objects; its windows shrink as h2's own send would.
        A large payload is not copied into the output: it follows as a piece of its own."""
        h2, size = self._h2, len(chunk)
        h2.outbound_flow_control_window -= size
        h2.streams[stream_id].outbound_flow_control_window -= size
        out = h2._data_to_send
        out += size.to_bytes(3, "big") + b"\x00\x00" + stream_id.to_bytes(4, "big")
        if size < COPY_BELOW:
            out += chunk
        else:
            self._pieces.append(out)  # what precedes the payload, its header last
            h2._data_to_send = bytearray()
            self._pieces.append(chunk)

    def _dispatch(self, event: h2e.Event) -> None:
        if isinstance(event, h2e.DataReceived):
            self._on_data(event.stream_id, event.data, event.flow_controlled_length)
        elif isinstance(event, h2e.StreamEnded):
            self._on_remote_end(event.stream_id)
        elif isinstance(event, h2e.StreamReset):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                self._reset_event(stream, int(event.error_code))
        elif isinstance(event, h2e.RemoteSettingsChanged):
            if SettingCodes.MAX_CONCURRENT_STREAMS in event.changed_settings or not self._seen_peer_settings:
                self._seen_peer_settings = True
                self._events.append(ev.PeerSettingsChanged(self.peer_max_streams))
        elif isinstance(event, h2e.ConnectionTerminated):
            self._on_goaway(event)
        elif isinstance(event, h2e.PingAckReceived):
            self._ping_sent_at = None
        else:
            self._on_other(event)

    @property
    def peer_max_streams(self) -> int:
        """How many streams the peer lets this side open at once, capped by our own limit."""
        return min(self._h2.remote_settings.max_concurrent_streams, self.settings.max_concurrent_streams)

    def _on_other(self, event: h2e.Event) -> None:
        """Request and response headers: the server and client halves override this."""

    def _on_data(self, stream_id: int, data: bytes | memoryview, length: int) -> None:
        """``data`` arrived on ``stream_id``, ``length`` of the window's bytes (padding included)."""
        self._uncredited_connection += length
        if self._uncredited_connection >= self.settings.connection_window // 4:
            self._h2.increment_flow_control_window(self._uncredited_connection)
            self._uncredited_connection = 0
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        stream.uncredited += length - len(data)  # padding is never "consumed" by anyone
        if not data:
            return
        if stream.held is not None:
            stream.held.append(data)
        elif stream.open_for_data:
            if self.on_data is not None:
                self.on_data(stream_id, data)
            else:
                self._events.append(ev.StreamData(stream_id, data))
        else:  # DATA before the response: a peer breaking CONNECT's rules
            self._events.append(ev.StreamReset(stream_id, ErrorCodes.PROTOCOL_ERROR, before_response=True))
            self.reset(stream_id, ErrorCodes.PROTOCOL_ERROR)

    def _on_remote_end(self, stream_id: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        stream.remote_ended = True
        if stream.held is None and stream.open_for_data:
            self._events.append(ev.StreamEnded(stream_id))
            self._maybe_closed(stream)

    def _on_goaway(self, event: h2e.ConnectionTerminated) -> None:
        """NO_ERROR: streams past ``last_stream_id`` were never taken, the rest may finish.
        An error code: the peer gave up on the connection and every stream with it."""
        self.goaway_received = True
        code = int(event.error_code) if event.error_code is not None else 0
        graceful = code == ErrorCodes.NO_ERROR
        last = event.last_stream_id if event.last_stream_id is not None else 0
        if not graceful:
            self.failed = True
        for stream in list(self._streams.values()):
            if not graceful:
                self._reset_event(stream, code)
            elif self._is_local(stream.stream_id) and stream.stream_id > last:
                self._reset_event(stream, ErrorCodes.REFUSED_STREAM)
        self._events.append(ev.ConnectionTerminated(code, local=False, reason="goaway"))

    def _is_local(self, stream_id: int) -> bool:
        return stream_id % 2 == int(self._h2.config.client_side)

    def _fail(self, error_code: int, reason: str) -> None:
        """Give up on the connection: GOAWAY if still possible, every stream reset."""
        if self.failed:
            return
        self.failed = True
        if self._h2.state_machine.state is not ConnectionState.CLOSED:
            self._h2.close_connection(error_code)
        for stream in list(self._streams.values()):
            self._reset_event(stream, ErrorCodes.CONNECT_ERROR)
        self._events.append(ev.ConnectionTerminated(int(error_code), local=True, reason=reason))

    def _reset_event(self, stream: _Stream, error_code: int) -> None:
        self._events.append(ev.StreamReset(stream.stream_id, error_code, before_response=not stream.open_for_data))
        self._forget(stream)
        self._events.append(ev.StreamClosed(stream.stream_id))

    def _forget(self, stream: _Stream) -> None:
        self._streams.pop(stream.stream_id, None)
        self._sending.pop(stream.stream_id, None)

    def _maybe_closed(self, stream: _Stream) -> None:
        if stream.local_ended and stream.remote_ended:
            self._forget(stream)
            self._events.append(ev.StreamClosed(stream.stream_id))

    def _flush(self) -> None:
        """Move queued bytes into DATA frames within the peer's windows, one frame per stream per
        round so that streams share the connection window."""
        if self._output_paused or self.failed or not self._sending:
            return
        progress = True
        while progress and self._sending:
            progress = False
            for stream_id in list(self._sending):
                stream = self._streams[stream_id]
                if not stream.open_for_data:
                    continue
                if stream.queued:
                    h2 = self._h2
                    window = min(h2.outbound_flow_control_window, h2.streams[stream_id].outbound_flow_control_window)
                    size = min(window, h2.max_outbound_frame_size)
                    if size <= 0:
                        continue
                    self._write_data(stream_id, _take(stream, size))
                    progress = True
                if stream.queued:
                    continue
                del self._sending[stream_id]
                if stream.paused:
                    stream.paused = False
                    self._events.append(ev.StreamWritable(stream_id))
                if stream.end_requested and not stream.local_ended:
                    self._h2.end_stream(stream_id)
                    stream.local_ended = True
                    self._maybe_closed(stream)
        self._resume_drained()

    def _resume_drained(self) -> None:
        """Streams paused at ``send_buffer`` that drained below half of it may read again."""
        low = self.settings.send_buffer // 2
        for stream_id in list(self._sending):
            stream = self._streams[stream_id]
            if stream.paused and stream.queued < low:
                stream.paused = False
                self._events.append(ev.StreamWritable(stream_id))


def _take(stream: _Stream, size: int) -> Bytes:
    """Up to ``size`` queued bytes for one DATA frame: a whole queued chunk when it fits (no
    copy), else a slice of it; h2 copies once more when it serializes the frame."""
    first = stream.out[0]
    if len(first) <= size:
        stream.out.popleft()
        stream.queued -= len(first)
        return first
    view = first if isinstance(first, memoryview) else memoryview(first)
    stream.out[0] = view[size:]
    stream.queued -= size
    return view[:size]
