"""The opening half of HBONE: one CONNECT stream per app connection over a pooled connection.

A stream's bytes wait until the peer answers 200 (queued, within ``send_buffer``, so the app's
reader is paused rather than buffered without end); any other status ends the stream with
``StreamRejected``, and the driver closes the app connection.
"""

from __future__ import annotations

import h2.events as h2e
from h2.errors import ErrorCodes

from . import events as ev
from .connection import STATUS_OK, TunnelConnection, TunnelSettings, _Stream


class TunnelUnavailable(Exception):
    """No new stream fits on this connection (GOAWAY, failed, or at the peer's stream limit)."""


class HboneClient(TunnelConnection):
    """One pooled TLS connection to a peer's HBONE listener, identity already verified."""

    def __init__(self, *, now: float, settings: TunnelSettings | None = None) -> None:
        super().__init__(client_side=True, settings=settings or TunnelSettings(), now=now)

    @property
    def has_capacity(self) -> bool:
        """Whether ``open_stream`` would succeed now."""
        return self.usable and self._h2.open_outbound_streams < self.peer_max_streams

    def open_stream(self, authority: str, *, forwarded_for: str | None = None) -> int:
        """Send ``CONNECT authority``; ``forwarded_for`` (the app's ``ip:port``) goes in a
        ``forwarded: for="..."`` header as ztunnel writes it. Returns the stream id."""
        if not self.has_capacity:
            raise TunnelUnavailable("no new stream fits on this connection")
        stream_id = self._h2.get_next_available_stream_id()
        headers = [(b":method", b"CONNECT"), (b":authority", authority.encode("ascii"))]
        if forwarded_for is not None:
            headers.append((b"forwarded", f'for="{forwarded_for}"'.encode("ascii")))
        self._h2.send_headers(stream_id, headers)
        self._streams[stream_id] = _Stream(stream_id)
        return stream_id

    def _on_other(self, event: h2e.Event) -> None:
        if not isinstance(event, h2e.ResponseReceived):
            return  # 1xx, trailers, pushes (disabled), unknown frames: nothing for a tunnel
        stream = self._streams.get(event.stream_id)
        if stream is None:
            return
        status = dict(event.headers or ()).get(b":status", b"")
        if status == str(STATUS_OK).encode():
            stream.open_for_data = True
            self._events.append(ev.StreamAccepted(event.stream_id))
            return
        self._events.append(ev.StreamRejected(event.stream_id, int(status) if status.isdigit() else 0))
        self.reset(event.stream_id, ErrorCodes.CANCEL)
