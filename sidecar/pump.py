"""Joining two legs of a proxied connection: bytes, TLS framing, flow control, half-close.

Theory of operation. A ``Connection`` owns two ``Leg`` protocols: ``down`` (the side that connected
to us) and ``up`` (the target we dialed). A leg is a raw TCP transport; a TLS leg drives an
``ssl.SSLObject`` over two ``MemoryBIO``s itself, because asyncio's own SSL transports can neither
half-close nor let us pick the context per connection. Data read on one leg is written to the
other leg directly from ``data_received`` (no queues, no coroutine per chunk).

- Before the connection is *streaming* (handshake, authorization and dialing still under way) a
  leg buffers at most one read of plaintext and stops reading.
- Flow control: when a leg's transport buffer passes its high-water mark, the other leg stops
  reading until it drains. Memory per connection is bounded by two write buffers plus one read.
- Half-close: end of data on one leg (TCP FIN, or TLS close_notify) is passed on as end of data on
  the other (FIN, or close_notify sent with ``SSLObject.unwrap``) while the other direction keeps
  flowing. When both directions have ended, both transports are closed.

This module knows no policy: subclasses of ``Connection`` (``listeners.py``) decide what happens
when a handshake completes and how a connection's outcome is named.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from typing import Any, cast

READ_SIZE = 256 * 1024
WRITE_HIGH_WATER = 256 * 1024
WRITE_LOW_WATER = 64 * 1024
LINGER_SECONDS = 2.0


class Leg(asyncio.Protocol):
    """One TCP connection of a proxied pair, plain or TLS (server or client side)."""

    def __init__(
        self,
        conn: Connection,
        *,
        tls: ssl.SSLObject | None = None,
        incoming: ssl.MemoryBIO | None = None,
        outgoing: ssl.MemoryBIO | None = None,
    ) -> None:
        self.conn = conn
        self.transport: asyncio.Transport | None = None
        self.peer: Leg | None = None
        self.tls = tls
        self._in = incoming
        self._out = outgoing
        self.handshake_done = tls is None
        self.read_eof = False  # the far end of this leg finished sending
        self.write_eof = False  # we finished sending on this leg
        self.received = 0  # plaintext bytes read from this leg and handed on to the other
        self._held: list[bytes] = []
        self._peer_full = False
        self._reading_paused = False
        self.lost = False
        self._lingering = False
        self._linger_timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        if self.conn.closing:  # dialled, but the connection ended meanwhile: connection_lost follows
            self.transport.abort()
            return
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)
        # uvloop starts reading only after connection_made returns, undoing a pause made here; the
        # callback runs before the loop next polls for I/O, so nothing is read before it.
        self.conn.loop.call_soon(self._update_reading)
        self.conn.leg_connected(self)
        if self.tls is not None and not self.tls.server_side and not self.lost:
            self._handshake()  # client side speaks first

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return  # closing: what the far end still sends is read only to be dropped
        if self.tls is None:
            self._deliver(data)
            return
        assert self._in is not None
        self._in.write(data)
        if not self.handshake_done:
            self._handshake()
            if not self.handshake_done or self.lost:
                return
        self._read_tls()

    def eof_received(self) -> bool:
        if self._lingering:
            return False  # the far end has finished too: close now
        if not self.handshake_done:
            self.conn.leg_failed(self, ConnectionResetError("peer closed the connection during the handshake"))
            return False
        self._end_of_data()
        return True  # keep the transport open: the other direction may still be flowing

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        self.conn.leg_lost(self, exc)

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer._peer_full = True
            self.peer._update_reading()

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer._peer_full = False
            self.peer._update_reading()

    # -- called by the connection and the other leg -------------------------------------------

    def send(self, data: bytes) -> None:
        """Write plaintext toward this leg's far end (encrypting on a TLS leg)."""
        transport = self.transport
        if transport is None or self.lost or self.write_eof:
            return
        if self.tls is None:
            transport.write(data)
            return
        try:
            self.tls.write(data)
        except ssl.SSLError as exc:
            self.conn.leg_failed(self, exc)
            return
        self._flush()

    def send_eof(self) -> None:
        """End our sending on this leg: TCP FIN, preceded by close_notify on a TLS leg."""
        transport = self.transport
        if transport is None or self.lost or self.write_eof:
            return
        self.write_eof = True
        if self.tls is not None:
            try:
                self.tls.unwrap()  # queues close_notify; the read side stays usable in TLS 1.3
            except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                pass
            except ssl.SSLError:
                pass  # the peer will see FIN without close_notify: still an end of data
            self._flush()
        if transport.can_write_eof():
            transport.write_eof()

    def start_streaming(self, peer: Leg) -> None:
        """Join this leg to ``peer``: hand on what was held, pass on an early EOF, read freely."""
        self.peer = peer
        held, self._held = self._held, []
        for chunk in held:
            self.received += len(chunk)
            peer.send(chunk)
        if self.read_eof:
            peer.send_eof()
        self._update_reading()

    def close(self) -> None:
        """Close gracefully: flush, say end of data, and linger until the far end has finished too.

        A TLS leg past its handshake sends close_notify first (RFC 8446 6.1). Closing a socket that
        still has unread bytes makes the kernel answer with a reset, which can destroy a response the
        far end has not read yet; so while the far end may still be sending, we send FIN, read and
        drop until its FIN or ``LINGER_SECONDS`` (as nginx's lingering_close does), then close.
        """
        transport = self.transport
        if transport is None or transport.is_closing() or self.lost or self._lingering:
            return
        if self.tls is not None and not self.handshake_done:
            transport.close()
            return
        self.send_eof()
        if self.read_eof or not transport.can_write_eof():
            transport.close()  # flushes what is buffered first
            return
        self._lingering = True
        self._held.clear()
        self.peer = None
        transport.resume_reading()
        self._linger_timer = self.conn.loop.call_later(LINGER_SECONDS, transport.close)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # -- internals ---------------------------------------------------------------------------

    def _handshake(self) -> None:
        assert self.tls is not None
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except (ssl.SSLError, ssl.CertificateError, OSError) as exc:
            self._flush()  # carries the alert that tells the peer why
            self.conn.leg_failed(self, exc)
            return
        self.handshake_done = True
        self._flush()
        self.conn.leg_handshake(self)
        self._update_reading()

    def _read_tls(self) -> None:
        tls = self.tls
        assert tls is not None
        incoming = self._in
        assert incoming is not None
        chunks: list[bytes] = []
        try:
            while True:
                chunk = tls.read(READ_SIZE)
                if not chunk:  # close_notify: the far end finished sending (CPython returns b"")
                    raise ssl.SSLZeroReturnError
                chunks.append(chunk)
                if not incoming.pending and not tls.pending():
                    break  # all consumed: skip the read that would only raise SSLWantReadError
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:  # close_notify, once we sent ours too
            self._hand_on(chunks)
            self._flush()
            self._end_of_data()
            return
        except ssl.SSLError as exc:
            self._flush()
            self.conn.leg_failed(self, exc)
            return
        self._hand_on(chunks)
        if self._out is not None and self._out.pending:
            self._flush()  # post-handshake messages (tickets, key updates)

    def _hand_on(self, chunks: list[bytes]) -> None:
        if chunks:
            self._deliver(chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def _deliver(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None:
            self.received += len(data)
            peer.send(data)
        else:
            self._held.append(data)
            self._update_reading()

    def _end_of_data(self) -> None:
        if self.read_eof:
            return
        self.read_eof = True
        if self.peer is not None:
            self.peer.send_eof()
        self.conn.leg_eof(self)

    def _flush(self) -> None:
        out = self._out
        if out is not None and out.pending and self.transport is not None and not self.lost:
            self.transport.write(out.read())

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None or self.lost or self._lingering:
            return
        paused = self._peer_full or (self.handshake_done and self.peer is None)
        if paused != self._reading_paused:
            self._reading_paused = paused
            if transport.is_closing():
                return
            if paused:
                transport.pause_reading()
            else:
                transport.resume_reading()


class Connection:
    """A proxied connection: its two legs, when it streams, and when it ends.

    Subclasses implement ``leg_handshake`` (authorize, dial) and name outcomes; ``ended`` is called
    exactly once, after both transports are gone, with the final byte counts.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.down: Leg | None = None
        self.up: Leg | None = None
        self.streaming = False
        self.closing = False
        self.outcome: str | None = None
        self.reason: str | None = None
        self.started = time.perf_counter()
        self._ended = False

    # -- state -------------------------------------------------------------------------------

    @property
    def bytes_to_upstream(self) -> int:
        return self.down.received if self.down is not None else 0

    @property
    def bytes_to_downstream(self) -> int:
        return self.up.received if self.up is not None else 0

    def start_streaming(self) -> None:
        down, up = self.down, self.up
        assert down is not None and up is not None
        self.streaming = True
        down.peer, up.peer = up, down  # both first: a write below may already call pause_writing
        down.start_streaming(up)
        up.start_streaming(down)

    def finish(self, outcome: str, reason: str | None = None, *, abort: bool = False) -> None:
        """End the connection now with ``outcome``, unless it is ending already."""
        if self.outcome is None:
            self.outcome, self.reason = outcome, reason
        if self.closing:
            if abort:
                for leg in self._legs():
                    leg.abort()
            return
        self.closing = True
        self.cancel_pending()
        for leg in self._legs():
            leg.abort() if abort else leg.close()
        self._maybe_ended()

    # -- leg events --------------------------------------------------------------------------

    def leg_connected(self, leg: Leg) -> None:
        """A leg's transport is up (override to act on it)."""

    def leg_handshake(self, leg: Leg) -> None:
        """A TLS leg completed its handshake (override: authorize, then dial or stream)."""

    def leg_failed(self, leg: Leg, exc: BaseException) -> None:
        """A leg hit a TLS or socket error (override to classify it); aborts the connection."""
        self.finish("tls_error", type(exc).__name__, abort=True)

    def leg_eof(self, leg: Leg) -> None:
        down, up = self.down, self.up
        if self.streaming and down is not None and up is not None and down.read_eof and up.read_eof:
            self.finish("ok")  # both directions are done: close, flushing what is buffered

    def leg_lost(self, leg: Leg, exc: Exception | None) -> None:
        if not self.closing:
            if self.streaming:
                self.finish("ok", None if exc is None else type(exc).__name__)
            else:
                self.on_lost_before_streaming(leg, exc)
        self._maybe_ended()

    def on_lost_before_streaming(self, leg: Leg, exc: Exception | None) -> None:
        self.finish("tls_error", "closed before streaming")

    def cancel_pending(self) -> None:
        """Cancel timers and tasks the subclass owns (override)."""

    def ended(self) -> None:
        """Called once when both transports are gone (override: count and log)."""

    # -- internals ---------------------------------------------------------------------------

    def _legs(self) -> list[Leg]:
        return [leg for leg in (self.down, self.up) if leg is not None]

    def _maybe_ended(self) -> None:
        if self._ended or not self.closing:
            return
        if all(leg.lost or leg.transport is None for leg in self._legs()):
            self._ended = True
            self.ended()


def ssl_error_text(exc: BaseException) -> str:
    """A short, key-free description of a TLS error for logs."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return str(getattr(exc, "reason", None) or exc)
    return str(exc) or type(exc).__name__


def peer_address(transport: asyncio.BaseTransport | None) -> str:
    peer: Any = transport.get_extra_info("peername") if transport is not None else None
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return "-"
