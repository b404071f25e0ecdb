"""The driver of one proxied connection: it feeds the relay what its legs and timers report, and
carries out the relay's actions (dial, arm a timer, stream, end our sending, close, count, finish).

Every timer and task of a connection is owned here and gone when it closes: the handshake timer, the
idle deadline (checked by the listener's once-a-second ``tick``, not a timer per connection: an idle
connection holds no timer handle), and the dial (cancelled while it is still connecting; a leg that
connects after the end is aborted at once, since uvloop can hand it its transport before
``create_connection`` returns).

A policy with ``forwarding`` (``proxy_protocol``, ``client_cert_header``) has what the app is told
of its caller made before the dial (a refusal if it cannot be: nothing is dialled); its preamble
goes to the app first, and with a rewriter the app's leg is a ``RewritingLeg``.
A policy with a ``stream_side`` makes that leg a stream of a tunnel through its ``streams``
(``StreamSource``): the leg comes from there, and on the ``UP`` side it is opened there too
instead of a TCP dial.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

from .config import Address, Limits
from .errors import HTTPRefusal, PeerError, Refusal
from .forwarding import Forwarding, Introduction, describe, outcome_of
from .legs import Leg, LegOwner, TLSLeg
from .metrics import ListenerMetrics
from .record import Outcome, Record
from .relay import (
    Action,
    ArmTimer,
    Close,
    Dial,
    Finish,
    Handshook,
    Policy,
    Relay,
    SendEOF,
    Side,
    State,
    Stream,
    Timer,
)
from .rewriting import RewritingLeg
from .sessions import SessionCache
from .tlsio import TLSEngine


class StreamSource(Protocol):
    """Where a policy's stream leg comes from (an HBONE tunnel)."""

    def leg(self, owner: LegOwner, side: Side) -> Leg: ...

    async def open(self, leg: Leg, target: Address, client: str) -> None:
        """Open the ``UP`` stream ``leg`` toward ``target`` for ``client`` (the app's address);
        returns once the leg is connected; raises ``OSError`` naming why it could not be."""


class ConnectionPolicy(Policy, Protocol):
    """A relay policy as the driver needs it: it also makes the engine of its TLS leg, keeps the
    sessions its TLS client leg may resume (None: it keeps none), says whether the peer's identity
    must carry its key pin, what the app is told of its caller (None: nothing), and gives its
    stream leg, if any (``streams``, with ``stream_side`` set)."""

    @property
    def sessions(self) -> SessionCache | None: ...

    @property
    def needs_spki(self) -> bool: ...  # whether authorizing needs the peer's key pin

    @property
    def forwarding(self) -> Forwarding | None: ...

    @property
    def streams(self) -> StreamSource | None: ...

    def tls_engine(self) -> TLSEngine: ...


class Home(Protocol):
    """What a connection needs from the listener that accepted it."""

    limits: Limits
    metrics: ListenerMetrics

    def finished(self, conn: Connection, record: Record) -> None: ...  # once, when it has ended


class Connection:
    """Two legs, one relay, its timers and its dial."""

    __slots__ = (
        "_dial_task",
        "_handshake_timer",
        "_idle_due",
        "_published",
        "destination",
        "down",
        "introduction",
        "listener",
        "loop",
        "policy",
        "relay",
        "up",
    )

    def __init__(self, listener: Home, policy: ConnectionPolicy, loop: asyncio.AbstractEventLoop) -> None:
        self.listener = listener
        self.loop = loop
        self.policy = policy
        limits = listener.limits
        self.relay = Relay(
            policy, handshake_timeout=limits.handshake_timeout, idle_timeout=limits.idle_timeout, now=loop.time()
        )
        # where the caller was going, when not the address it reached (a capture's original destination)
        self.destination: tuple[str, int] | None = None
        self.introduction: Introduction | None = None  # what the app is told of its caller
        self.down: Leg = self._leg(Side.DOWN)
        self.up: Leg | None = None
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._idle_due = 0.0  # loop time when the relay looks at the idle timeout again; 0: not armed
        self._dial_task: asyncio.Task[None] | None = None
        self._published = (0, 0)  # bytes each way already added to the metrics

    @property
    def bytes_to_upstream(self) -> int:
        return self.down.received

    @property
    def bytes_to_downstream(self) -> int:
        return self.up.received if self.up is not None else 0

    @property
    def outcome(self) -> Outcome | None:
        return self.relay.outcome

    def cut(self, reason: str) -> None:
        """End now, aborting both legs (the drain's deadline)."""
        self._run(self.relay.cut(reason))

    def tick(self, now: float) -> None:
        """The listener's once-a-second look: the idle deadline, if it has passed."""
        if self._idle_due and now >= self._idle_due:
            self._idle_due = 0.0
            self._fire(Timer.IDLE)

    def publish_bytes(self) -> None:
        """Add the bytes moved since the last call to the listener's byte counters."""
        up, down = self.bytes_to_upstream, self.bytes_to_downstream
        old_up, old_down = self._published
        if up != old_up or down != old_down:
            self.listener.metrics.moved(up - old_up, down - old_down)
            self._published = (up, down)

    # -- what the legs report (LegOwner) ----------------------------------------------------------

    def leg_connected(self, leg: Leg) -> None:
        now = self.loop.time()
        if leg is self.down:
            self._run(self.relay.started(leg.far_address(), now, leg.verified))
        else:
            self._run(self.relay.dialled(now, leg.verified))

    def leg_secured(self, leg: TLSLeg) -> None:
        self._run(self.relay.secured(leg.tls.negotiated(pin=self.policy.needs_spki), self.loop.time(), time.time()))
        if self.relay.streaming and leg.side is Side.UP and self.policy.sessions is not None:
            leg.after_read = self._keep_session

    def leg_failed(self, leg: Leg, error: PeerError) -> None:
        self._run(self.relay.failed(leg.side, error))

    def leg_eof(self, leg: Leg) -> None:
        self._run(self.relay.eof(leg.side))

    def leg_lost(self, leg: Leg, exc: Exception | None) -> None:
        error = None if exc is None else type(exc).__name__
        self._run(self.relay.lost(leg.side, error, reset=isinstance(exc, ConnectionResetError)))
        self._maybe_ended()

    def leg_refused(self, leg: Leg, refusal: HTTPRefusal, *, close: bool) -> None:
        self._refuse(refusal, close=close, abort=leg.side if refusal.partial else None)

    # -- actions ----------------------------------------------------------------------------------

    def _run(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Stream):
                self._stream()
            elif isinstance(action, ArmTimer):
                self._arm(action.timer, action.seconds)
            elif isinstance(action, Dial):
                self._dial(action.target)
            elif isinstance(action, SendEOF):
                leg = self.down if action.side is Side.DOWN else self.up
                if leg is not None:
                    leg.send_eof()
            elif isinstance(action, Close):
                self._close(action.abort, action.reset)
            elif isinstance(action, Handshook):
                self._disarm(Timer.HANDSHAKE)  # else it stays armed, and in memory, for handshake_timeout
                self.listener.metrics.handshook(action.seconds, action.failure)
            elif isinstance(action, Finish):
                up = self.up
                if action.record.outcome is Outcome.OK and isinstance(up, TLSLeg) and up.after_read is not None:
                    up.after_read(up)  # a ticket that came with the last bytes
                self.publish_bytes()
                self.listener.finished(self, action.record)

    def _stream(self) -> None:
        down, up = self.down, self.up
        assert up is not None
        down.other, up.other = up, down  # both first: a write below may already call pause_writing
        intro = self.introduction
        if intro is not None and intro.preamble:
            Leg.send(up, intro.preamble)  # the app's first bytes; past the rewriter, if there is one
        down.start_streaming(up)
        up.start_streaming(down)

    def _arm(self, timer: Timer, seconds: float) -> None:
        if not self.relay.open:
            return  # the connection ended while the actions that armed it ran
        self._disarm(timer)
        if timer is Timer.IDLE:
            self._idle_due = self.loop.time() + seconds
        else:
            self._handshake_timer = self.loop.call_later(seconds, self._fire, timer)

    def _disarm(self, timer: Timer) -> None:
        if timer is Timer.IDLE:
            self._idle_due = 0.0
        elif self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None

    def _fire(self, timer: Timer) -> None:
        if timer is Timer.HANDSHAKE:
            self._handshake_timer = None
        moved = self.bytes_to_upstream + self.bytes_to_downstream
        self._run(self.relay.timed_out(timer, self.loop.time(), moved))

    def _dial(self, target: Address) -> None:
        """Connect the ``up`` leg to ``target``; failing that within ``connect_timeout`` ends the
        connection."""
        forwarding = self.policy.forwarding
        if forwarding is not None and not self._introduce(forwarding):
            return
        self.up = up = self._leg(Side.UP)
        self._dial_task = self.loop.create_task(self._connect(target, up))

    async def _connect(self, target: Address, leg: Leg) -> None:
        started = self.loop.time()
        try:
            async with asyncio.timeout(self.listener.limits.connect_timeout):  # no extra task, unlike wait_for
                streams = self.policy.streams
                if streams is not None and leg.side is self.policy.stream_side:
                    await streams.open(leg, target, self.relay.client)
                else:
                    await self.loop.create_connection(lambda: leg, target.host, target.port)
        except TimeoutError:
            self._dial_failed(f"connect to {target} timed out")
            return
        except OSError as exc:
            self._dial_failed(f"connect to {target}: {exc.strerror or exc}")
            return
        finally:
            self._dial_task = None
        self.listener.metrics.upstream_connect_seconds.observe(self.loop.time() - started)

    def _introduce(self, forwarding: Forwarding) -> bool:
        """Make what the app is told of its caller; False when it cannot be (the connection is refused)."""
        down = self.down
        assert down.transport is not None
        source = _ip_port(down.transport.get_extra_info("peername"))
        destination = self.destination or _ip_port(down.transport.get_extra_info("sockname"))
        tls = down.tls if isinstance(down, TLSLeg) else None
        try:
            self.introduction = forwarding.introduce(source, destination, tls, self.relay.negotiated)
        except Refusal as refusal:
            self._refuse(refusal)
            return False
        return True

    def _refuse(self, refusal: Refusal, *, close: bool = True, abort: Side | None = None) -> None:
        self._run(self.relay.refused(outcome_of(refusal), describe(refusal), close=close, abort=abort))

    def _dial_failed(self, reason: str) -> None:
        self._run(self.relay.dial_failed(reason))
        self._maybe_ended()

    def _close(self, abort: frozenset[Side], reset: bool) -> None:
        self._disarm(Timer.HANDSHAKE)
        self._disarm(Timer.IDLE)
        up = self.up
        if self._dial_task is not None and (up is None or not up.connected):
            # uvloop can hand the leg its transport (and the handshake can even finish) before
            # create_connection returns; cancelling it then closes that transport without ever
            # calling connection_lost. A connected leg is closed like any other; only a dial still
            # connecting is cancelled.
            self._dial_task.cancel()
            self._dial_task = None
        for leg in (self.down, up):
            if leg is not None:
                if leg.side in abort:
                    leg.abort(reset)
                else:
                    leg.close()
        self._maybe_ended()

    def _maybe_ended(self) -> None:
        if self.relay.state is not State.CLOSING:
            return
        if all(leg.lost or not leg.connected for leg in (self.down, self.up) if leg is not None):
            self._run(self.relay.ended(self.bytes_to_upstream, self.bytes_to_downstream, self.loop.time()))

    # -- internals --------------------------------------------------------------------------------

    def _leg(self, side: Side) -> Leg:
        streams = self.policy.streams
        if streams is not None and self.policy.stream_side is side:
            return streams.leg(self, side)
        if self.policy.tls_side is side:
            return TLSLeg(self, side, self.policy.tls_engine(), client=side is Side.UP)
        intro = self.introduction
        if side is Side.UP and intro is not None and intro.rewriter is not None:
            return RewritingLeg(self, side, intro.rewriter)
        return Leg(self, side)

    def _keep_session(self, leg: TLSLeg) -> None:
        sessions = self.policy.sessions
        if sessions is None or sessions.keep(leg.tls):
            leg.after_read = None


def _ip_port(name: tuple[str, int] | tuple[str, int, int, int]) -> tuple[str, int]:
    """A socket address as ``(ip, port)`` (IPv6's flow info and scope dropped)."""
    return str(name[0]), int(name[1])
