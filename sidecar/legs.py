"""The two legs of a proxied connection: asyncio protocols that move bytes to each other directly.

A ``Leg`` is one raw TCP connection; a ``TLSLeg`` adds a ``TLSEngine`` (server or client side).
Once joined (``start_streaming``), bytes read on one leg are written to the other from inside
``data_received``: no queue, no task, no coroutine per chunk. Before that, a leg holds at most
what one read brought and stops reading.

- Flow control: when a leg's transport buffer passes ``WRITE_HIGH_WATER``, the other leg stops
  reading until it drains below ``WRITE_LOW_WATER``. Memory per connection is bounded by two write
  buffers and one read.
- Half-close: the end of data on one leg (TCP FIN, or TLS close_notify) is passed on as the end of
  data on the other (FIN, or close_notify then FIN) while the other direction keeps flowing.
- Closing gracefully flushes, ends our sending and lingers, reading and dropping, until the far
  end has finished too (``LINGER_SECONDS`` at most): closing a socket with unread bytes makes the
  kernel answer with a reset, which can destroy a response the far end has not read yet.
- Aborting drops what is buffered; ``abort(reset=True)`` makes it a TCP reset (SO_LINGER 0),
  to pass on a reset of the other leg.

A leg may also be a stream of a tunnel (``sidecar.hbone.streamleg.StreamLeg``): the same
interface toward the driver and the other leg, over an HTTP/2 stream instead of a socket.

Legs report lifecycle events to their ``LegOwner`` (the connection driver) and know no policy.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from typing import Any, Protocol, cast

from mypy_extensions import mypyc_attr

from .errors import PeerError, TLSFailure
from .record import Outcome
from .relay import Side
from .tlsio import Negotiated, TLSEngine

WRITE_HIGH_WATER = 256 * 1024
WRITE_LOW_WATER = 64 * 1024
LINGER_SECONDS = 2.0
READ_SIZE = 256 * 1024  # plaintext taken out of OpenSSL per call into the reused buffer
SMALL_READ = 32 * 1024  # up to this much ciphertext, plaintext is read into a bytes object of its size


class Scratch(threading.local):
    """The buffer every TLS leg of a thread reads plaintext into. What a read produced is consumed
    before the callback returns (written to the other leg), so one buffer serves every connection.
    A transport that could not send all of it at once keeps a view of it: that buffer is then the
    transport's (``lent``), and the thread takes a new one."""

    def __init__(self) -> None:
        self.plaintext = memoryview(bytearray(READ_SIZE))

    def lent(self, view: memoryview) -> None:
        if view.obj is self.plaintext.obj:
            self.plaintext = memoryview(bytearray(READ_SIZE))


SCRATCH = Scratch()


class LegOwner(Protocol):
    """What a leg reports to; each call is a lifecycle event, never a data chunk."""

    loop: asyncio.AbstractEventLoop

    @property
    def outcome(self) -> Outcome | None: ...  # how the connection ends, once that is decided

    def leg_connected(self, leg: Leg) -> None: ...

    def leg_secured(self, leg: TLSLeg) -> None: ...

    def leg_failed(self, leg: Leg, error: PeerError) -> None: ...

    def leg_eof(self, leg: Leg) -> None: ...

    def leg_lost(self, leg: Leg, exc: Exception | None) -> None: ...


@mypyc_attr(allow_interpreted_subclasses=True)  # the stream, rewriting and tunnel legs
class Leg(asyncio.Protocol):
    """One plain TCP connection of a proxied pair."""

    __slots__ = (
        "_held",
        "_linger_timer",
        "_lingering",
        "_other_full",
        "_reading_paused",
        "lost",
        "other",
        "owner",
        "read_eof",
        "ready",
        "received",
        "side",
        "transport",
        "write_eof",
    )

    def __init__(self, owner: LegOwner, side: Side) -> None:
        self.owner = owner
        self.side = side
        self.transport: asyncio.Transport | None = None
        self.other: Leg | None = None  # the leg this one's bytes go to, once streaming
        self.ready = True  # no handshake to wait for: what it reads is plaintext
        self.read_eof = False  # the far end of this leg finished sending
        self.write_eof = False  # we finished sending on this leg
        self.received = 0  # plaintext bytes read from this leg and handed on to the other
        self.lost = False  # the transport is gone
        self._held: list[Bytes] | None = None  # read before streaming
        self._other_full = False
        self._reading_paused = False
        self._lingering = False
        self._linger_timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = t = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        t.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)
        # uvloop starts reading only after connection_made returns, undoing a pause made here; the
        # callback runs before the loop next polls for I/O, so nothing is read before it.
        self.owner.loop.call_soon(self._update_reading)
        self.owner.leg_connected(self)

    def data_received(self, data: bytes) -> None:
        if not self._lingering:  # closing: what the far end still sends is read only to be dropped
            self._deliver(data)

    def eof_received(self) -> bool:
        if self._lingering:
            return False  # the far end has finished too: close now
        self._end_of_data()
        return True  # keep the transport open: the other direction may still be flowing

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        self.owner.leg_lost(self, exc)

    def pause_writing(self) -> None:
        other = self.other
        if other is not None:
            other._other_full = True
            other._update_reading()

    def resume_writing(self) -> None:
        other = self.other
        if other is not None:
            other._other_full = False
            other._update_reading()

    # -- called by the driver and the other leg ---------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether the leg has come up (its transport was made)."""
        return self.transport is not None

    @property
    def verified(self) -> Negotiated | None:
        """The peer behind this leg, when it was verified before the leg existed (a tunnel's)."""
        return None

    def far_address(self) -> str:
        """``ip:port`` of the far end, or ``-``."""
        return peer_address(self.transport)

    def send(self, data: Bytes) -> None:
        """Write plaintext toward this leg's far end."""
        transport = self.transport
        if transport is not None and not self.lost and not self.write_eof:
            transport.write(data)
            if type(data) is memoryview and transport.get_write_buffer_size():
                SCRATCH.lent(data)  # the transport holds on to what it has not sent

    def send_eof(self) -> None:
        """End our sending on this leg (TCP FIN)."""
        transport = self.transport
        if transport is None or self.lost or self.write_eof:
            return
        self.write_eof = True
        self._before_fin()
        if transport.can_write_eof():
            transport.write_eof()

    def start_streaming(self, other: Leg) -> None:
        """Join this leg to ``other``: hand on what was held, pass on an early end of data, read freely."""
        self.other = other
        held, self._held = self._held, None
        for chunk in held or ():
            self.received += len(chunk)
            other.send(chunk)
        if self.read_eof:
            other.send_eof()
        self._update_reading()

    def close(self) -> None:
        """Close gracefully: flush, end of data, and linger until the far end has finished too."""
        transport = self.transport
        if transport is None or transport.is_closing() or self.lost or self._lingering:
            return
        if not self.ready:  # a TLS leg mid-handshake: nothing of ours to flush or to end
            transport.close()
            return
        self.send_eof()
        if self.read_eof or not transport.can_write_eof():
            transport.close()  # flushes what is buffered first
            return
        self._lingering = True
        self._held = None
        self.other = None
        transport.resume_reading()
        self._linger_timer = self.owner.loop.call_later(LINGER_SECONDS, transport.close)

    def abort(self, reset: bool = False) -> None:
        """Close at once: what is still buffered is dropped; no close_notify, no linger.
        ``reset``: the far end gets a TCP RST (SO_LINGER 0), not a FIN."""
        transport = self.transport
        if transport is None:
            return
        if reset and not self.lost:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
        transport.abort()

    # -- internals ------------------------------------------------------------------------------

    def _before_fin(self) -> None:
        """What must precede our FIN on this leg (a TLS leg's close_notify)."""

    def _deliver(self, data: Bytes) -> None:
        other = self.other
        if other is not None:
            self.received += len(data)
            other.send(data)
        else:
            if self._held is None:
                self._held = []
            self._held.append(bytes(data))  # a view's buffer is reused
            self._update_reading()

    def _end_of_data(self) -> None:
        if self.read_eof:
            return
        self.read_eof = True
        if self.other is not None:
            self.other.send_eof()
        self.owner.leg_eof(self)

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None or self.lost or self._lingering:
            return
        paused = self._other_full or (self.ready and self.other is None)
        if paused != self._reading_paused:
            self._reading_paused = paused
            if transport.is_closing():
                return
            if paused:
                transport.pause_reading()
            else:
                transport.resume_reading()


@mypyc_attr(allow_interpreted_subclasses=True)
class TLSLeg(Leg):
    """One TLS connection of a proxied pair: we are its server or its client."""

    __slots__ = ("_client", "after_read", "tls")
    # large reads go into the thread's SCRATCH buffer, handed on as views that must be consumed
    # (or lent) before data_received returns; a leg whose reader may keep them opts out
    reads_into_scratch = True

    def __init__(self, owner: LegOwner, side: Side, tls: TLSEngine, *, client: bool) -> None:
        super().__init__(owner, side)
        self.tls = tls
        self.ready = False  # until the handshake completes
        self.after_read: Any = None  # called after each read while set (a client keeping its session)
        self._client = client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self._client and self.transport is not None and not self.transport.is_closing():
            self._handshake()  # the client speaks first

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return
        tls = self.tls
        tls.feed(data)
        if not self.ready:
            self._handshake()
            if not self.ready or self.lost or self._lingering:
                return
        try:
            if tls.unread <= SMALL_READ or not self.reads_into_scratch:
                if plaintext := tls.read():
                    self._deliver(plaintext)
            else:
                while True:
                    buffer = SCRATCH.plaintext
                    n = tls.read_into(buffer)
                    if n:
                        self._deliver(buffer[:n])
                    if n < len(buffer) or self.lost:
                        break
        except TLSFailure as exc:
            self._send_output()
            self.owner.leg_failed(self, exc)
            return
        if tls.peer_finished:
            self._send_output()
            self._end_of_data()
        elif tls.has_output:
            self._send_output()  # post-handshake messages (tickets, key updates)
        if self.after_read is not None:
            self.after_read(self)

    def eof_received(self) -> bool:
        if not self.ready and not self._lingering:
            self.owner.leg_failed(self, PeerError("eof", "peer closed the connection during the handshake"))
            return False
        return super().eof_received()

    def send(self, data: Bytes) -> None:
        transport = self.transport
        if transport is None or self.lost or self.write_eof:
            return
        try:
            self.tls.write(data)
        except TLSFailure as exc:
            self.owner.leg_failed(self, exc)
            return
        transport.write(self.tls.output())

    def _before_fin(self) -> None:
        self.tls.close_notify()
        self._send_output()

    def _handshake(self) -> None:
        try:
            done = self.tls.handshake()
        except TLSFailure as exc:
            self._send_output()  # carries the alert that tells the peer why
            self.owner.leg_failed(self, exc)
            return
        self._send_output()
        if done:
            self.ready = True
            self.owner.leg_secured(self)
            self._update_reading()

    def _send_output(self) -> None:
        tls, transport = self.tls, self.transport
        if tls.has_output and transport is not None and not self.lost:
            transport.write(tls.output())


Bytes = bytes | bytearray | memoryview  # what legs read and write: received bytes, or views of them

_LINGER_ZERO = struct.pack("ii", 1, 0)  # struct linger {l_onoff = 1, l_linger = 0}: close sends RST


def peer_address(transport: asyncio.BaseTransport | None) -> str:
    """``ip:port`` (``[ip]:port`` for IPv6) of a transport's far end, or ``-``."""
    peer: Any = transport.get_extra_info("peername") if transport is not None else None
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return "-"
