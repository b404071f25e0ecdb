"""One HBONE tunnel: a TLS connection with ALPN h2 carrying CONNECT streams, and its driver.

Theory of operation. A ``Tunnel`` owns the TLS connection (``TunnelLeg``: a TLS leg whose plaintext
goes to HTTP/2 rather than to another leg), the sans-IO HTTP/2 side (``HboneServer`` or
``HboneClient``) and the ``StreamLeg`` of each stream on it, which it serves as their
``StreamHost``. Bytes read from TLS are fed to HTTP/2 and its events handed to the stream legs;
what HTTP/2 has to send is written to TLS once per round (``_pump``), so the frames of every stream
that moved go out in one TLS write. The TLS side is always read: HTTP/2's per-stream windows, not
the socket, bound what a stalled stream holds.

Its life: HANDSHAKING (under ``handshake_timeout``) -> OPEN -> CLOSED. The handshake must agree on
ALPN ``h2`` (else it fails as ``protocol``) and pass the subclass's check of the peer; it is
counted on the listener's handshake metrics. A tunnel writes no access record: its streams do.
While open, a keepalive timer pings a silent peer. ``stop_streams`` (GOAWAY) lets open streams
finish and closes the tunnel after the last; ``close`` ends it now, resetting what is left.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from enum import StrEnum
from typing import Any

from ..config import Limits
from ..errors import PeerError, TLSFailure
from ..legs import Bytes, Leg, TLSLeg
from ..metrics import ListenerMetrics
from ..record import Outcome
from ..relay import Side
from ..tlsio import Negotiated, TLSEngine
from . import events as ev
from .connection import TunnelConnection
from .streamleg import StreamLeg

ALPN = "h2"
KEEPALIVE_TICK = 2.5  # seconds between keepalive checks (the connection decides when to ping)


# What each stream event becomes on the stream's leg; the tunnel handles the rest itself.
_TO_LEG: dict[type[ev.Event], Callable[[StreamLeg, Any], None]] = {
    ev.StreamData: lambda leg, e: leg.data(e.data),
    ev.StreamWritable: lambda leg, e: leg.writable(),
    ev.StreamEnded: lambda leg, e: leg.ended(),
    ev.StreamReset: lambda leg, e: leg.was_reset(e.error_code),
    ev.StreamAccepted: lambda leg, e: leg.accepted(),
    ev.StreamRejected: lambda leg, e: leg.rejected(e.status),
}


class TunnelState(StrEnum):
    HANDSHAKING = "handshaking"
    OPEN = "open"
    CLOSED = "closed"


class TunnelLeg(TLSLeg):
    """The TLS connection under a tunnel: its plaintext goes to the tunnel, not to another leg."""

    __slots__ = ("tunnel",)
    reads_into_scratch = False  # HTTP/2 framing may keep part of what it reads past the read

    def __init__(self, tunnel: Tunnel, engine: TLSEngine, *, client: bool) -> None:
        super().__init__(tunnel, Side.UP if client else Side.DOWN, engine, client=client)
        self.tunnel = tunnel

    def pause_writing(self) -> None:
        self.tunnel.mux.pause_output()  # frames wait in HTTP/2's queues; streams pause at send_buffer

    def resume_writing(self) -> None:
        self.tunnel.mux.resume_output()
        self.tunnel.pump()

    def _deliver(self, data: Bytes) -> None:
        self.received += len(data)
        self.tunnel.receive(data)

    def _update_reading(self) -> None:
        """Always reading (see the module docstring)."""

    def send_pieces(self, pieces: list[Bytes]) -> None:
        """Encrypt ``pieces`` in order and write the records at once (one write, not one per piece)."""
        transport, tls = self.transport, self.tls
        if transport is None or self.lost or self.write_eof:
            return
        try:
            for piece in pieces:
                tls.write(piece)
        except TLSFailure as exc:
            self.owner.leg_failed(self, exc)
            return
        transport.write(tls.output())


class Tunnel:
    """A TLS connection and the CONNECT streams on it; subclasses are the two ends."""

    def __init__(
        self,
        mux: TunnelConnection,
        engine: TLSEngine,
        *,
        client: bool,
        limits: Limits,
        metrics: ListenerMetrics,
        loop: asyncio.AbstractEventLoop,
        pin: bool = False,
    ) -> None:
        self.loop = loop
        self._pin = pin  # the peer's identity carries its key pin (some pattern pins a key)
        self.mux = mux
        self.limits = limits
        self.metrics = metrics
        self.leg = TunnelLeg(self, engine, client=client)
        self.legs: dict[int, StreamLeg] = {}
        mux.on_data = self._stream_data  # a stream leg holds what comes before its 200 is handled
        self.state = TunnelState.HANDSHAKING
        self._negotiated: Negotiated | None = None
        self._peer_address = "-"
        self._started = loop.time()
        self._timer: asyncio.TimerHandle | None = None
        self._pumping = False
        self._stop_when_open = False  # stop_streams came during the handshake

    # -- StreamHost: what its stream legs ask -----------------------------------------------------

    @property
    def negotiated(self) -> Negotiated | None:
        return self._negotiated

    @property
    def peer_address(self) -> str:
        return self._peer_address

    def send(self, stream_id: int, data: Bytes) -> bool:
        ok = self.mux.send(stream_id, data)
        self.pump()
        return ok

    def end_stream(self, stream_id: int) -> None:
        self.mux.end_stream(stream_id)
        self.pump()

    def reset(self, stream_id: int, error_code: int) -> None:
        self.mux.reset(stream_id, error_code)
        self.pump()

    def consumed(self, stream_id: int, size: int) -> None:
        if self.mux.consumed(stream_id, size):
            self.pump()

    def accept(self, stream_id: int) -> None:
        raise NotImplementedError("only a server tunnel answers streams")

    def refuse(self, stream_id: int, status: int) -> None:
        raise NotImplementedError("only a server tunnel answers streams")

    # -- LegOwner: what its TLS leg reports -------------------------------------------------------

    @property
    def outcome(self) -> Outcome | None:
        return None  # a tunnel has no outcome of its own: its streams do

    def leg_connected(self, leg: Leg) -> None:
        self._peer_address = leg.far_address()
        self._started = self.loop.time()
        self._timer = self.loop.call_later(self.limits.handshake_timeout, self._handshake_timed_out)

    def leg_secured(self, leg: TLSLeg) -> None:
        if self.state is not TunnelState.HANDSHAKING:
            return
        self._cancel_timer()
        seconds = self.loop.time() - self._started
        negotiated = leg.tls.negotiated(pin=self._pin)
        problem = self._check(negotiated)
        if problem is not None:
            reason, text = problem
            self.metrics.handshook(seconds, None if reason == "denied" else reason)  # completed, then refused
            self._handshake_failed(reason, text)
            self.state = TunnelState.CLOSED
            leg.close()  # the handshake itself completed: close_notify, then FIN
            return
        self._negotiated = negotiated
        self.state = TunnelState.OPEN
        self.metrics.handshook(seconds, None)
        self._arm_keepalive()
        self.pump()  # our SETTINGS (and the client's preface)
        self._opened()
        if self._stop_when_open:
            self.stop_streams()

    def leg_failed(self, leg: Leg, error: PeerError) -> None:
        if self.state is TunnelState.HANDSHAKING:
            self._cancel_timer()
            self.metrics.handshook(None, error.reason)
            self._handshake_failed(error.reason, error.text)
        self._end()
        leg.abort()  # the alert, if any, is out; nothing more is owed

    def leg_eof(self, leg: Leg) -> None:
        self.close()  # the peer finished the TLS connection: nothing more can arrive on any stream

    def leg_lost(self, leg: Leg, exc: Exception | None) -> None:
        if self.state is TunnelState.HANDSHAKING:
            self._cancel_timer()
            self.metrics.handshook(None, "eof")
            self._handshake_failed("eof", "closed during the handshake")
        self._end()
        self._gone()

    # -- the tunnel as a whole --------------------------------------------------------------------

    @property
    def usable(self) -> bool:
        return self.state is TunnelState.OPEN and self.mux.usable

    def receive(self, data: Bytes) -> None:
        """Plaintext from the TLS connection."""
        self.mux.receive_data(data, self.loop.time())
        self.pump()

    def stop_streams(self) -> None:
        """GOAWAY: no new streams; the open ones finish, then the tunnel closes."""
        if self.state is TunnelState.HANDSHAKING:
            self._stop_when_open = True
            return
        self.mux.stop_streams()
        self.pump()
        self._close_if_done()

    def close(self) -> None:
        """End now: a final GOAWAY, every open stream reset, then close_notify and FIN."""
        if self.state is TunnelState.CLOSED:
            return
        self._end()
        self._write()  # closing from inside a round: what that round queued goes out first
        self.leg.close()

    def abort(self) -> None:
        """End now without a word to the peer (a dial given up): timers stop, streams reset."""
        self._end()
        self.leg.abort()

    def pump(self) -> None:
        """Hand HTTP/2's events to the stream legs until there are none, then write its output."""
        if self._pumping:
            return  # called from inside a round: that round picks it up
        self._pumping = True
        try:
            mux = self.mux
            while events := mux.events():
                for event in events:
                    self._dispatch(event)
            self._write()
        finally:
            self._pumping = False

    def _write(self) -> None:
        out = self.mux.output()
        if out and self.leg.ready:  # before the handshake completed there is no HTTP/2 to speak
            self.leg.send_pieces(out)

    # -- what the two ends add --------------------------------------------------------------------

    def _check(self, negotiated: Negotiated) -> tuple[str, str] | None:
        """Why this handshake's result is refused, as ``(reason, text)``; ``reason`` is a
        ``tlserrors`` class, or ``denied`` for a verified peer that is not the one wanted."""
        if negotiated.alpn != ALPN:
            return "protocol", f"the peer did not agree on ALPN {ALPN} (got {negotiated.alpn or 'none'})"
        if negotiated.resumed and negotiated.peer_not_after is not None and negotiated.peer_not_after < time.time():
            return "expired", "resumed a session of a certificate that has expired since"
        if negotiated.trust_problem is not None:  # verified by the bundles' union, not by its own trust domain's
            return "untrusted", negotiated.trust_problem
        return None

    def _opened(self) -> None:
        """The handshake passed: streams may start."""

    def _handshake_failed(self, reason: str, text: str) -> None:
        """The handshake failed or was refused."""

    def _gone(self) -> None:
        """The TLS connection is gone."""

    def _on_event(self, event: ev.Event) -> None:
        """An event the stream legs do not take: requests, refusals, settings, GOAWAY."""

    def _stream_closed(self, stream_id: int) -> None:
        """A stream of this tunnel ended."""

    # -- internals --------------------------------------------------------------------------------

    def _stream_data(self, stream_id: int, data: Bytes) -> None:
        leg = self.legs.get(stream_id)
        if leg is not None:
            leg.data(data)

    def _dispatch(self, event: ev.Event) -> None:
        to_leg = _TO_LEG.get(type(event))
        if to_leg is not None:
            leg = self.legs.get(event.stream_id)  # type: ignore[union-attr]
            if leg is not None:
                to_leg(leg, event)
        elif isinstance(event, ev.StreamClosed):
            leg = self.legs.pop(event.stream_id, None)
            if leg is not None:
                leg.closed()
            self._stream_closed(event.stream_id)
            self._close_if_done()
        elif isinstance(event, ev.ConnectionTerminated):
            self._on_event(event)
            if event.local or event.error_code:
                self.close()  # we gave up on it, or the peer did: every stream is reset already
            else:
                self._close_if_done()  # a graceful GOAWAY: the open streams finish first
        else:
            self._on_event(event)

    def _close_if_done(self) -> None:
        if self.state is TunnelState.OPEN and not self.mux.usable and not self.legs and not self.mux.open_streams:
            self.close()

    def _end(self) -> None:
        """No more streams: reset what is open (their legs report it) and stop the timers."""
        if self.state is TunnelState.CLOSED:
            return
        self.state = TunnelState.CLOSED
        self._cancel_timer()
        self.mux.close()
        self.pump()

    def _handshake_timed_out(self) -> None:
        self._timer = None
        if self.state is not TunnelState.HANDSHAKING:
            return
        self.metrics.handshook(None, "timeout")
        self._handshake_failed("timeout", "handshake_timeout")
        self.state = TunnelState.CLOSED
        self.leg.abort()

    def _arm_keepalive(self) -> None:
        self._timer = self.loop.call_later(KEEPALIVE_TICK, self._keepalive)

    def _keepalive(self) -> None:
        self._timer = None
        if self.state is not TunnelState.OPEN:
            return
        self.mux.tick(self.loop.time())
        self.pump()
        if self.state is TunnelState.OPEN:
            self._arm_keepalive()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
