"""The life of one proxied connection as a state machine, without I/O.

Theory of operation. A proxied connection joins two legs: ``DOWN``, the side that connected to
us, and ``UP``, the target we dial. Its ``Policy`` says which leg, if any, speaks TLS with us, and
that fixes the order of its phases (``PLANS``): TLS on the ``DOWN`` leg (inbound: we terminate)
handshakes, authorizes the peer, then dials; TLS on the ``UP`` leg (outbound: we originate) dials,
then handshakes and authorizes; no TLS (plain passthrough) only dials. A leg can also be a stream
of a tunnel whose peer was verified when the tunnel was made (HBONE): a ``DOWN`` stream authorizes
that peer first, then dials; an ``UP`` stream only dials. Then bytes stream both ways; when
one direction ends (FIN or close_notify) the connection is half-closed and the other direction
keeps flowing; when both have ended, or anything fails, it closes; when both legs are gone, it is
closed and its ``Record`` is made.

The driver (``connection.py``) reports what happened on its sockets and timers by calling this
object's event methods, and carries out the actions they return, in order. Only lifecycle events
come here: the legs move bytes to each other directly. State changes follow ``TRANSITIONS``; an
event that the current state does not list is a bug in the caller and raises ``RelayBug``. The
outcome is decided once, when the connection starts to close (a drain's cut keeps an outcome
already decided), or when what it carries is refused (``refused``): that outcome stays whatever
ends the connection next. A transparent-mode listener also sets, before the connection starts,
where it was going (``original_dst``) and whether it is plain TCP let through (``passthrough``:
its record says ``passthrough`` where it would say ``ok``).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from .config import Address
from .errors import PeerError, RelayBug, TLSFailure
from .identity import PeerIdentity
from .record import Direction, Outcome, Record
from .tlsio import Negotiated


class Side(StrEnum):
    DOWN = "down"  # the leg that connected to us
    UP = "up"  # the leg we dialled


class State(StrEnum):
    ACCEPTED = "accepted"  # the DOWN leg is up; nothing decided yet
    HANDSHAKING = "handshaking"  # the TLS leg is handshaking (the peer is then authorized)
    AUTHORIZING = "authorizing"  # a peer verified before this connection began is checked (passing)
    DIALING = "dialing"  # connecting the UP leg to the target
    STREAMING = "streaming"  # bytes flow both ways
    HALF_CLOSED = "half_closed"  # one direction has ended, the other still flows
    CLOSING = "closing"  # both legs are closing, gracefully or not
    CLOSED = "closed"  # both legs are gone; the record is made


class Event(StrEnum):
    STARTED = "started"  # the DOWN leg's transport is up
    SECURED = "secured"  # the peer is verified (handshake completed, or known at start) and allowed
    DENIED = "denied"  # the peer is verified and not allowed
    DIALLED = "dialled"  # the UP leg's transport is up
    DIAL_FAILED = "dial_failed"
    FAILED = "failed"  # TLS (or the socket, during a handshake) failed on a leg
    EOF = "eof"  # one direction ended
    LOST = "lost"  # a leg's transport is gone
    TIMED_OUT = "timed_out"  # handshake_timeout, or idle_timeout with nothing moved
    REFUSED = "refused"  # what the connection carries must not reach the target (a ``Refusal``)
    CUT = "cut"  # the process ends it (drain_timeout)
    ENDED = "ended"  # both legs are gone


class Timer(StrEnum):
    HANDSHAKE = "handshake"
    IDLE = "idle"


NEXT_PHASE = None  # in TRANSITIONS: on to the next phase of the policy's plan, then STREAMING

_CLOSE = {Event.LOST: State.CLOSING, Event.FAILED: State.CLOSING, Event.CUT: State.CLOSING}
_LATE = {e: State.CLOSING for e in (Event.EOF, Event.LOST, Event.FAILED, Event.CUT, Event.TIMED_OUT)}

TRANSITIONS: dict[State, dict[Event, State | None]] = {
    State.ACCEPTED: {Event.STARTED: NEXT_PHASE},
    State.HANDSHAKING: {
        Event.SECURED: NEXT_PHASE,
        Event.DENIED: State.CLOSING,
        Event.EOF: State.HANDSHAKING,  # the plain leg finished sending: held, passed on when streaming
        Event.TIMED_OUT: State.CLOSING,
        **_CLOSE,
    },
    State.AUTHORIZING: {Event.SECURED: NEXT_PHASE, Event.DENIED: State.CLOSING, **_CLOSE},
    State.DIALING: {
        Event.DIALLED: NEXT_PHASE,
        Event.DIAL_FAILED: State.CLOSING,
        Event.EOF: State.DIALING,  # held, as above
        Event.REFUSED: State.CLOSING,  # what the target must be told first cannot be built
        **_CLOSE,
    },
    State.STREAMING: {
        Event.EOF: State.HALF_CLOSED,
        Event.TIMED_OUT: State.CLOSING,
        Event.REFUSED: State.CLOSING,
        **_CLOSE,
    },
    State.HALF_CLOSED: {
        Event.EOF: State.CLOSING,
        Event.TIMED_OUT: State.CLOSING,
        Event.REFUSED: State.CLOSING,
        **_CLOSE,
    },
    State.CLOSING: {
        **_LATE,
        Event.DIALLED: State.CLOSING,  # a dial that finished after the end: its leg is closed at once
        Event.DIAL_FAILED: State.CLOSING,
        Event.ENDED: State.CLOSED,
    },
    State.CLOSED: {Event.LOST: State.CLOSED, Event.DIALLED: State.CLOSED, Event.DIAL_FAILED: State.CLOSED},
}


# Which leg speaks TLS with us and which is a tunnel's stream fix the phases before STREAMING.
PLANS: dict[tuple[Side | None, Side | None], tuple[State, ...]] = {
    # (tls_side, stream_side)
    (Side.DOWN, None): (State.HANDSHAKING, State.DIALING),  # inbound: we terminate TLS
    (Side.UP, None): (State.DIALING, State.HANDSHAKING),  # outbound: we originate TLS
    (None, None): (State.DIALING,),  # plain passthrough
    (None, Side.DOWN): (State.AUTHORIZING, State.DIALING),  # a tunnel's stream in: its peer is known at start
    (None, Side.UP): (State.DIALING,),  # a stream out on a tunnel whose upstream was verified when made
}


# -- actions: what the driver must do, in order ------------------------------------------------


@dataclass(frozen=True, slots=True)
class Dial:
    target: Address


@dataclass(frozen=True, slots=True)
class ArmTimer:
    timer: Timer
    seconds: float


@dataclass(frozen=True, slots=True)
class Stream:
    """Join the legs: each hands on what it holds (and an end of data it saw), then reads freely."""


@dataclass(frozen=True, slots=True)
class SendEOF:
    """End our sending on ``side`` (close_notify, then FIN): a refused peer learns nothing more."""

    side: Side


@dataclass(frozen=True, slots=True)
class Close:
    """Close every leg: abort those in ``abort`` (at once, dropping what is buffered), the others
    gracefully (flush, end of data, linger). Timers and a dial still connecting are cancelled.
    ``reset``: the aborted legs end with a reset their far end sees (a TCP RST, an RST_STREAM),
    passing on the reset that ended the other leg."""

    abort: frozenset[Side] = frozenset()
    reset: bool = False


@dataclass(frozen=True, slots=True)
class Handshook:
    """A handshake ended: ``seconds`` when it completed, ``failure`` (a ``tlserrors`` reason) when
    it failed or its result was refused as such (both may be set). Its timer is no longer needed."""

    seconds: float | None = None
    failure: str | None = None


@dataclass(frozen=True, slots=True)
class Finish:
    record: Record


Action = Dial | ArmTimer | Stream | SendEOF | Close | Handshook | Finish

BOTH = frozenset({Side.DOWN, Side.UP})


class Policy(Protocol):
    """What one connection must do; listeners make one per connection (or share one)."""

    @property
    def name(self) -> str: ...  # the listener label

    @property
    def direction(self) -> Direction: ...

    @property
    def tls_side(self) -> Side | None: ...  # DOWN: we terminate TLS; UP: we originate; None: plain

    @property
    def stream_side(self) -> Side | None: ...  # the leg that is a stream of a verified tunnel, if any

    def target(self) -> Address: ...  # where to dial

    def authorize(self, peer: PeerIdentity) -> str | None: ...  # why the peer is refused, or None


class Relay:
    """One connection's state; every event method returns the actions to carry out."""

    __slots__ = (
        "_active_at",
        "_eofs",
        "_handshake_started",
        "_moved",
        "_phases",
        "client",
        "handshake_error",
        "handshake_timeout",
        "idle_timeout",
        "negotiated",
        "original_dst",
        "outcome",
        "passthrough",
        "policy",
        "reason",
        "started_at",
        "state",
    )

    def __init__(self, policy: Policy, *, handshake_timeout: float, idle_timeout: float, now: float) -> None:
        self.policy = policy
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout  # 0: no idle timeout
        self.state = State.ACCEPTED
        self._phases = PLANS[policy.tls_side, policy.stream_side]
        self.started_at = now
        self.client = "-"
        self.outcome: Outcome | None = None
        self.reason: str | None = None
        self.handshake_error: str | None = None
        self.negotiated: Negotiated | None = None
        self.original_dst: str | None = None
        self.passthrough = False
        self._eofs: frozenset[Side] = frozenset()  # the empty one is shared: nothing per connection
        self._handshake_started = now
        self._moved = 0  # bytes moved both ways when the idle timer last looked
        self._active_at = now

    @property
    def streaming(self) -> bool:
        return self.state in (State.STREAMING, State.HALF_CLOSED)

    @property
    def open(self) -> bool:
        return self.state not in (State.CLOSING, State.CLOSED)

    # -- events ---------------------------------------------------------------------------------

    def started(self, client: str, now: float, peer: Negotiated | None = None) -> list[Action]:
        """The ``DOWN`` leg is up; ``peer``: its verified peer, when that was settled before this
        connection began (a stream of a tunnel)."""
        self.client = client
        if peer is not None:
            self.negotiated = peer
        return self._go(Event.STARTED, now)

    def secured(self, negotiated: Negotiated, now: float, wall_now: float) -> list[Action]:
        """The handshake completed (``wall_now``: the epoch time, for certificate validity)."""
        if not self.open:
            return []  # completed in the same read that ended the connection
        self.negotiated = negotiated
        handshook = Handshook(seconds=now - self._handshake_started)
        actions: list[Action] = [handshook]
        side = self.policy.tls_side
        assert side is not None
        expired = negotiated.peer_not_after is not None and negotiated.peer_not_after < wall_now
        if negotiated.resumed and expired:
            # a ticket can outlive the certificate it was issued for: that peer must handshake anew
            why = "resumed a session of a certificate that has expired since"
            return self._untrusted(handshook, "expired", why, side)
        if negotiated.trust_problem is not None:
            # verified against the union of the trust bundles, but not by its own trust domain's
            return self._untrusted(handshook, "untrusted", negotiated.trust_problem, side)
        return actions + self._authorize(now, send_eof=side)

    def dialled(self, now: float, peer: Negotiated | None = None) -> list[Action]:
        """The ``UP`` leg is up; ``peer``: the upstream a tunnel verified when it was made."""
        if not self.open:
            self._go(Event.DIALLED, now)
            return [Close(abort=frozenset({Side.UP}))]  # too late: that leg goes at once
        if peer is not None:
            self.negotiated = peer
        return self._go(Event.DIALLED, now)

    def dial_failed(self, reason: str) -> list[Action]:
        if not self.open:
            self._go(Event.DIAL_FAILED, 0.0)
            return []
        return self._close(Event.DIAL_FAILED, Outcome.UPSTREAM_ERROR, reason)

    def failed(self, side: Side, error: PeerError) -> list[Action]:
        """TLS failed on ``side`` (or its socket, during a handshake)."""
        if not self.open:
            self._go(Event.FAILED, 0.0)
            return []
        if self.state is State.HANDSHAKING and side is self.policy.tls_side:
            self.handshake_error = error.reason
            # its alert is sent; nothing more is owed to a peer that failed its handshake. The other
            # leg, if any, closes cleanly: never a reset it could get for bytes we never read.
            return [Handshook(failure=error.reason), *self._close(Event.FAILED, Outcome.TLS_ERROR, error.text, {side})]
        outcome = Outcome.TLS_ERROR if isinstance(error, TLSFailure) else Outcome.OK
        return self._close(Event.FAILED, outcome, error.text, BOTH)

    def eof(self, side: Side) -> list[Action]:
        """``side``'s far end finished sending; the legs pass it on themselves once streaming."""
        self._eofs |= {side}
        if self.streaming and len(self._eofs) == 2:
            return self._close(Event.EOF, Outcome.OK, None)  # both directions are done
        return self._go(Event.EOF, 0.0)

    def lost(self, side: Side, error: str | None, *, reset: bool = False) -> list[Action]:
        """``side``'s transport is gone (``error``: the exception's name, if one closed it;
        ``reset``: it was reset, a TCP RST or an RST_STREAM). With a stream leg, a reset while
        streaming is passed on as a reset of the other leg."""
        if not self.open:
            self._go(Event.LOST, 0.0)
            return []
        if self.streaming:
            if reset and self.policy.stream_side is not None:
                other = Side.UP if side is Side.DOWN else Side.DOWN
                return self._close(Event.LOST, Outcome.OK, error, {other}, reset=True)
            return self._close(Event.LOST, Outcome.OK, error)
        tls = self.policy.tls_side
        if side is tls and self.state is State.HANDSHAKING:
            self.handshake_error = "eof"
            if side is Side.DOWN:
                outcome, reason = Outcome.TLS_ERROR, "closed during handshake"
            else:
                outcome, reason = Outcome.UPSTREAM_ERROR, "upstream closed during handshake"
            return [Handshook(failure="eof"), *self._close(Event.LOST, outcome, reason)]
        if side is Side.DOWN:
            return self._close(Event.LOST, Outcome.OK, "client closed before streaming")
        return self._close(Event.LOST, Outcome.UPSTREAM_ERROR, "closed before streaming")

    def timed_out(self, timer: Timer, now: float, moved: int = 0) -> list[Action]:
        """``timer`` fired; for ``IDLE``, ``moved`` is the bytes moved both ways so far."""
        if timer is Timer.HANDSHAKE:
            if self.state is not State.HANDSHAKING:
                return []  # fired as the handshake completed
            self.handshake_error = "timeout"
            return [
                Handshook(failure="timeout"),
                *self._close(Event.TIMED_OUT, Outcome.TIMEOUT, "handshake_timeout", BOTH),
            ]
        if not self.streaming:
            return []
        if moved != self._moved:
            self._moved, self._active_at = moved, now
        idle_for = now - self._active_at
        if idle_for >= self.idle_timeout:
            return self._close(Event.TIMED_OUT, Outcome.TIMEOUT, "idle_timeout")
        return [ArmTimer(Timer.IDLE, self._idle_step(self.idle_timeout - idle_for))]

    def refused(self, outcome: Outcome, reason: str, *, close: bool = True, abort: Side | None = None) -> list[Action]:
        """What the connection carries must not reach the target (a ``Refusal``): before the dial,
        or while streaming. The outcome is decided now and stays, whatever ends the connection
        next. ``close``: close it now, gracefully but for ``abort`` (a leg cut in the middle of a
        message); otherwise the driver first lets owed answers through, and calls again to close."""
        if not self.open:
            return []
        if not close and not self.streaming:
            raise RelayBug(f"a refusal waiting for answers in state {self.state}")
        if self.outcome is None:
            self.outcome, self.reason = outcome, reason
        if not close:
            return []
        return self._close(Event.REFUSED, outcome, reason, frozenset() if abort is None else {abort})

    def cut(self, reason: str) -> list[Action]:
        """End it now, aborting both legs; an outcome already decided stays."""
        if self.state is State.CLOSED:
            return []
        if self.state is State.CLOSING:
            self._go(Event.CUT, 0.0)
            return [Close(abort=BOTH)]
        return self._close(Event.CUT, self.outcome or Outcome.OK, reason, BOTH)

    def ended(self, to_upstream: int, to_downstream: int, now: float) -> list[Action]:
        """Both legs are gone: the record."""
        self._go(Event.ENDED, now)
        n = self.negotiated
        outcome = self.outcome or Outcome.OK
        if outcome is Outcome.OK and self.passthrough:
            outcome = Outcome.PASSTHROUGH
        record = Record(
            listener=self.policy.name,
            direction=self.policy.direction,
            client=self.client,
            outcome=outcome,
            original_dst=self.original_dst,
            reason=self.reason,
            peer_identity=n.peer.describe() if n is not None else None,
            handshake_error=self.handshake_error,
            bytes_to_upstream=to_upstream,
            bytes_to_downstream=to_downstream,
            duration_ms=round((now - self.started_at) * 1000, 3),
            tls_version=n.version if n is not None else None,
            cipher=n.cipher if n is not None else None,
            resumed=n.resumed if n is not None else False,
        )
        return [Finish(record)]

    # -- internals ------------------------------------------------------------------------------

    def _go(self, event: Event, now: float) -> list[Action]:
        """Take the transition for ``event``; the actions of entering the new state."""
        try:
            nxt = TRANSITIONS[self.state][event]
        except KeyError:
            raise RelayBug(f"event {event} in state {self.state}") from None
        if nxt is not NEXT_PHASE:
            self.state = nxt
            return []
        done = self._phases.index(self.state) + 1 if self.state in self._phases else 0
        if done < len(self._phases):
            return self._enter(self._phases[done], now)
        return self._enter(State.STREAMING, now)

    def _enter(self, state: State, now: float) -> list[Action]:
        self.state = state
        if state is State.AUTHORIZING:
            return self._authorize(now, send_eof=None)  # the stream leg answers a refusal itself
        if state is State.HANDSHAKING:
            self._handshake_started = now
            return [ArmTimer(Timer.HANDSHAKE, self.handshake_timeout)]
        if state is State.DIALING:
            return [Dial(self.policy.target())]
        actions: list[Action] = [Stream()]  # STREAMING
        if self._eofs:  # an end of data held while the connection was not yet streaming
            self.state = State.HALF_CLOSED
        if self.idle_timeout > 0:
            self._active_at = now
            actions.append(ArmTimer(Timer.IDLE, self._idle_step(self.idle_timeout)))
        return actions

    def _authorize(self, now: float, *, send_eof: Side | None) -> list[Action]:
        """The verified peer (``negotiated``) meets the policy: on to the next phase, or refused."""
        if self.negotiated is None:
            raise RelayBug(f"no verified peer to authorize in state {self.state}")
        refusal = self.policy.authorize(self.negotiated.peer)
        if refusal is not None:
            return self._close(Event.DENIED, Outcome.DENIED, refusal, send_eof=send_eof)
        return self._go(Event.SECURED, now)

    def _close(
        self,
        event: Event,
        outcome: Outcome,
        reason: str | None,
        abort: frozenset[Side] | set[Side] = frozenset(),
        *,
        send_eof: Side | None = None,
        reset: bool = False,
    ) -> list[Action]:
        self._go(event, 0.0)
        self.state = State.CLOSING
        if self.outcome is None:
            self.outcome, self.reason = outcome, reason
        actions: list[Action] = [] if send_eof is None else [SendEOF(send_eof)]
        actions.append(Close(abort=frozenset(abort), reset=reset))
        return actions

    def _untrusted(self, handshook: Handshook, failure: str, why: str, side: Side) -> list[Action]:
        """A completed handshake whose peer our checks after OpenSSL's refuse: counted as the
        handshake failure ``failure``, the connection ends as ``tls_error``."""
        self.handshake_error = failure
        actions: list[Action] = [Handshook(seconds=handshook.seconds, failure=failure)]
        return actions + self._close(Event.DENIED, Outcome.TLS_ERROR, why, send_eof=side)

    def _idle_step(self, left: float) -> float:
        """The idle timer looks every quarter of ``idle_timeout`` (every second at least apart), and
        at the deadline: a connection closes within 1.25 x ``idle_timeout`` of its last byte (plus
        up to a second: the driver checks the deadlines once a second)."""
        return min(left, max(self.idle_timeout / 4, 1.0))
