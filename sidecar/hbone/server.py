"""The accepting half of HBONE: CONNECT requests in, 200 or an error status out, per stream.

The server answers itself what is not a request at all: 405 for a method other than CONNECT, 400
for a malformed ``:authority``. A well-formed CONNECT becomes a ``DialRequested``; the driver
authorizes the peer for that port (403 through ``refuse``, nothing dialled), dials, and answers
200 (``accept``) or 503 (``refuse``). The host in ``:authority`` is ignored: the driver dials
``127.0.0.1:<port>``.
"""

from __future__ import annotations

import h2.events as h2e
from h2.errors import ErrorCodes

from . import events as ev
from .authority import parse_authority
from .connection import STATUS_OK, TunnelConnection, TunnelSettings, _Stream


class HboneServer(TunnelConnection):
    """One accepted TLS connection from a verified peer."""

    def __init__(self, *, now: float, settings: TunnelSettings | None = None) -> None:
        super().__init__(client_side=False, settings=settings or TunnelSettings(), now=now)

    def accept(self, stream_id: int) -> None:
        """The dial succeeded: answer 200 and deliver what the peer already sent. A no-op for a
        stream already reset (its ``StreamClosed`` came first): the driver closes what it dialled."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        self._h2.send_headers(stream_id, [(b":status", b"200")])
        stream.open_for_data = True
        held, stream.held = stream.held or [], None
        self._events.extend(ev.StreamData(stream_id, data) for data in held)
        if stream.remote_ended:
            self._events.append(ev.StreamEnded(stream_id))
        self._flush()

    def refuse(self, stream_id: int, status: int = 503) -> None:
        """The dial failed (503) or the peer may not reach that port (403): the stream is over."""
        stream = self._streams.pop(stream_id, None)
        if stream is None:
            return
        self._sending.pop(stream_id, None)
        self._answer_and_close(stream_id, status, remote_ended=stream.remote_ended)

    def _on_other(self, event: h2e.Event) -> None:
        if isinstance(event, h2e.RequestReceived):
            self._on_request(event)

    def _on_request(self, event: h2e.RequestReceived) -> None:
        stream_id = event.stream_id
        if self.goaway_sent:  # opened after our GOAWAY: never taken, the peer may retry elsewhere
            self._h2.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
            return
        headers = {bytes(k): bytes(v) for k, v in event.headers or ()}
        if headers.get(b":method") != b"CONNECT":
            self._refuse_request(event, 405, "method_not_allowed")
            return
        authority = headers.get(b":authority", b"").decode("ascii", "replace")
        try:
            _host, port = parse_authority(authority)
        except ValueError:
            self._refuse_request(event, 400, "bad_authority")
            return
        self._streams[stream_id] = _Stream(stream_id, held=[])
        forwarded = headers.get(b"forwarded")
        self._events.append(
            ev.DialRequested(
                stream_id, port, authority, forwarded_for(forwarded.decode("latin-1")) if forwarded else None
            )
        )

    def _refuse_request(self, event: h2e.RequestReceived, status: int, reason: str) -> None:
        self._events.append(ev.StreamRefused(event.stream_id, status, reason))
        self._answer_and_close(event.stream_id, status, remote_ended=bool(event.stream_ended))

    def _answer_and_close(self, stream_id: int, status: int, *, remote_ended: bool) -> None:
        """A final status with END_STREAM; RST_STREAM(NO_ERROR) asks the peer to stop sending."""
        assert status != STATUS_OK
        self._h2.send_headers(stream_id, [(b":status", str(status).encode())], end_stream=True)
        if not remote_ended:
            self._h2.reset_stream(stream_id, ErrorCodes.NO_ERROR)
        self._events.append(ev.StreamClosed(stream_id))


def forwarded_for(value: str) -> str | None:
    """The first ``for=`` of a ``Forwarded`` header (RFC 7239), quotes removed; ztunnel sends
    ``for="ip:port"``."""
    for element in value.split(","):
        for pair in element.split(";"):
            name, _, token = pair.strip().partition("=")
            if name.lower() == "for" and token:
                return token.strip('"') or None
    return None
