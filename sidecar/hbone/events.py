"""What an HBONE tunnel connection tells its driver: one frozen dataclass per kind of event.

Every event names the stream it concerns (``stream_id``), except the connection-wide ones at the
end. Every stream's last event is exactly one ``StreamClosed`` (also for a stream this side reset
or refused); nothing about that stream follows it: that is where its access record is written.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class DialRequested:
    """Server: a well-formed CONNECT; the driver authorizes the peer for ``port`` (``refuse`` with
    403 if not), dials ``127.0.0.1:port`` and then calls ``accept`` (200) or ``refuse`` (503).
    Data the peer sends meanwhile is held, not delivered."""

    stream_id: int
    port: int
    authority: str
    forwarded_for: str | None  # the peer's ``forwarded: for=...`` claim, unverified


@dataclass(frozen=True, slots=True)
class StreamRefused:
    """Server: the connection answered this stream itself (400, 405); nothing was dialled."""

    stream_id: int
    status: int
    reason: str  # bad_authority, method_not_allowed


@dataclass(frozen=True, slots=True)
class StreamAccepted:
    """Client: the peer answered 200; data flows from now on."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamRejected:
    """Client: the peer answered a status other than 200; the stream is over."""

    stream_id: int
    status: int


@dataclass(frozen=True, slots=True)
class StreamData:
    """Bytes for the stream's TCP side. Call ``consumed(stream_id, len(data))`` once they are
    really gone (written out, not merely queued): that, and only that, reopens the peer's window."""

    stream_id: int
    data: bytes | memoryview  # a view of the received bytes: hand it on, do not keep it mutable


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer half-closed its direction (END_STREAM): shut down writing on the TCP side."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The stream was aborted (a received RST_STREAM, a GOAWAY that excluded it, or a dead
    connection): abort the TCP side with a reset. ``before_response``: no 200 had been seen."""

    stream_id: int
    error_code: int
    before_response: bool


@dataclass(frozen=True, slots=True)
class StreamWritable:
    """A stream whose ``send`` returned False has drained its buffer: resume reading its TCP side."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamClosed:
    """The last event of a stream: both directions are done or it was reset."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class PeerSettingsChanged:
    """The peer's SETTINGS arrived or changed; ``max_concurrent_streams`` is what it accepts now."""

    max_concurrent_streams: int


@dataclass(frozen=True, slots=True)
class ConnectionTerminated:
    """The connection is over for new streams: a GOAWAY arrived (``local`` False) or this side
    gave up on it (a protocol error, a keepalive timeout; ``local`` True). Streams the peer did
    not take were reset before this event; the others may still finish when ``local`` is False."""

    error_code: int
    local: bool
    reason: str


Event = (
    DialRequested
    | StreamRefused
    | StreamAccepted
    | StreamRejected
    | StreamData
    | StreamEnded
    | StreamReset
    | StreamWritable
    | StreamClosed
    | PeerSettingsChanged
    | ConnectionTerminated
)
