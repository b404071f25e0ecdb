"""The leg to an app whose requests are rewritten (``client_cert_header: xfcc``): a plain ``Leg``
whose caller->app bytes pass an ``XfccRewriter`` and whose app->caller bytes the rewriter reads to
frame the responses. The driver makes the app's leg one of these only when the listener asks for
it, so every other connection keeps the plain per-chunk path.

What it adds to a plain leg:
- Holding: while the rewriter holds the caller's bytes (a request waits for the app's answer to an
  upgrade, or too many requests are unanswered), the caller's leg stops reading, as it does while
  this leg's write buffer is full.
- The caller's end of data reaches the app once the rewriter has handed on all it holds.
- Refusal (``HTTPRefusal``): the valid bytes before the refused ones still reach the app, the
  caller's leg stops reading, and the owner hears of it at once (the outcome is decided then).
  The caller is told (400 or 431, ``connection: close``) as soon as no answer of the app's is owed
  or in flight, or the app has finished; then the owner closes the connection. A refusal inside a
  request body (part of that request already went to the app) does not wait: the app's leg is
  reset (an abort with SO_LINGER 0) so the app cannot take the cut request as complete, and the
  caller is told only if the app's answers so far end on a response boundary.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from typing import Protocol

from .errors import HTTPRefusal
from .http1 import XfccRewriter, refusal_response
from .legs import Leg, LegOwner
from .relay import Side

_LINGER_ZERO = struct.pack("ii", 1, 0)  # struct linger {l_onoff = 1, l_linger = 0}: close sends RST


class RefusalOwner(LegOwner, Protocol):
    """A leg owner that also hears of refusals."""

    def leg_refused(self, leg: Leg, refusal: HTTPRefusal, *, close: bool) -> None:
        """``refusal`` is decided (``close`` False: the caller is told later), or the caller has
        been told and the connection must close now (``close`` True; abort the app's leg when
        ``refusal.partial``)."""


class RewritingLeg(Leg):
    """A plain leg to the app; what it is sent passes ``rewriter``, what it reads is shown to it."""

    __slots__ = ("_caller_ended", "_closing", "_full", "_refusals", "_told", "refusal", "rewriter")

    def __init__(self, owner: RefusalOwner, side: Side, rewriter: XfccRewriter) -> None:
        super().__init__(owner, side)
        self._refusals = owner
        self.rewriter = rewriter
        self.refusal: HTTPRefusal | None = None
        self._full = False  # our transport's buffer is past its high-water mark
        self._caller_ended = False  # the caller finished sending; its end goes on once nothing is held
        self._closing = False
        self._told = False  # the caller was told of the refusal (or could not be)

    # -- caller -> app ----------------------------------------------------------------------------

    def send(self, data: bytes | bytearray | memoryview) -> None:
        if self.refusal is not None:
            return  # nothing the caller sends after a refusal reaches the app
        if type(data) is not bytes:
            data = bytes(data)  # a view of a reused buffer: the rewriter may keep part of it
        try:
            out = self.rewriter.feed(data)
        except HTTPRefusal as refusal:
            self._refuse(refusal, app_ended=self.read_eof)
            return
        if out:
            super().send(out)
        self._gate()

    def send_eof(self) -> None:
        rw = self.rewriter
        if not self._closing and not rw.finished:
            if self.refusal is not None:
                return  # the app's answers owed before the refusal may still be on their way
            self._caller_ended = True
            rw.end()
            if not rw.finished:
                return  # held bytes wait for the app's answer; the end follows them
        super().send_eof()

    def close(self) -> None:
        self._closing = True  # our own end of data goes at once
        super().close()

    # -- app -> caller ----------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return
        released = self.rewriter.feed_response(data)
        self._deliver(data)
        if released:
            super().send(released)  # caller bytes the app's answer let through
        self._answered(app_ended=False)

    def eof_received(self) -> bool:
        if not self._lingering:
            self.rewriter.end_response()
            self._answered(app_ended=True)  # a refusal's answer goes before the end of data
        return super().eof_received()

    def pause_writing(self) -> None:
        self._full = True
        self._gate()

    def resume_writing(self) -> None:
        self._full = False
        self._gate()

    # -- internals --------------------------------------------------------------------------------

    def _answered(self, *, app_ended: bool) -> None:
        """After the app's bytes (or its end): a refusal they caused, one they let be told, held
        bytes they released (and the caller's end of data behind them)."""
        rw = self.rewriter
        if self.refusal is not None:
            self._tell(app_ended=app_ended)
            return
        if rw.refusal is not None:  # the app's answer refused the stream (an unexpected switch, say)
            self._refuse(rw.refusal, app_ended=app_ended)
            return
        if self._caller_ended and rw.finished:
            super().send_eof()
        self._gate()

    def _refuse(self, refusal: HTTPRefusal, *, app_ended: bool) -> None:
        self.refusal = refusal
        if refusal.forward:
            super().send(refusal.forward)  # valid requests before the refused one, from the same read
        self._gate()
        self._refusals.leg_refused(self, refusal, close=False)
        self._tell(app_ended=app_ended)

    def _tell(self, *, app_ended: bool) -> None:
        """Tell the caller once the app's answers owed before the refusal are out; then close."""
        refusal = self.refusal
        assert refusal is not None
        if self._told or self.lost:
            return
        rw = self.rewriter
        cut = refusal.partial  # the app's leg is aborted: all it sent is all it will send
        if not (cut or app_ended or rw.answerable()):
            return  # an answer is owed or in flight: wait for it
        self._told = True
        caller = self.other
        if caller is not None and rw.answerable(app_ended=app_ended or cut):
            caller.send(refusal_response(refusal.status))
        if cut:
            self._reset_on_close()
        self._refusals.leg_refused(self, refusal, close=True)

    def _reset_on_close(self) -> None:
        """Closing (an abort) will send the app a TCP reset, not a FIN: a cut request is an error
        to every parser, never a message that merely ended early."""
        transport = self.transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)

    def _gate(self) -> None:
        """The caller's leg reads only while this leg's buffer has room, nothing is held, and
        nothing was refused."""
        caller = self.other
        if caller is None:
            return
        stop = self._full or self.refusal is not None or self.rewriter.holding
        if caller._other_full is not stop:
            caller._other_full = stop
            caller._update_reading()
