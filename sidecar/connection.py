"""The driver of one proxied connection: it feeds the relay what its legs and timers report, and
carries out the relay's actions (dial, arm a timer, stream, end our sending, close, count, finish).

Every timer and task of a connection is owned here and gone when it closes: the handshake timer, the
idle deadline (checked by the listener's once-a-second ``tick``, not a timer per connection: an idle
connection holds no timer handle), and the dial (cancelled while it is still connecting; a leg that
connects after the end is aborted at once, since uvloop can hand it its transport before
``create_connection`` returns).
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

from .config import Address, Limits
from .errors import PeerError
from .legs import Leg, TLSLeg, peer_address
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
from .sessions import SessionCache
from .tlsio import TLSEngine


class ConnectionPolicy(Policy, Protocol):
    """A relay policy as the driver needs it: it also makes the engine of its TLS leg, and keeps
    the sessions its TLS client leg may resume (None: it keeps none)."""

    @property
    def sessions(self) -> SessionCache | None: ...

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
        "down",
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
            self._run(self.relay.started(peer_address(leg.transport), now))
        else:
            self._run(self.relay.dialled(now))

    def leg_secured(self, leg: TLSLeg) -> None:
        self._run(self.relay.secured(leg.tls.negotiated(), self.loop.time(), time.time()))
        if self.relay.streaming and leg.side is Side.UP and self.policy.sessions is not None:
            leg.after_read = self._keep_session

    def leg_failed(self, leg: Leg, error: PeerError) -> None:
        self._run(self.relay.failed(leg.side, error))

    def leg_eof(self, leg: Leg) -> None:
        self._run(self.relay.eof(leg.side))

    def leg_lost(self, leg: Leg, exc: Exception | None) -> None:
        self._run(self.relay.lost(leg.side, None if exc is None else type(exc).__name__))
        self._maybe_ended()

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
                self._close(action.abort)
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
        self.up = up = self._leg(Side.UP)
        self._dial_task = self.loop.create_task(self._connect(target, up))

    async def _connect(self, target: Address, leg: Leg) -> None:
        started = self.loop.time()
        try:
            async with asyncio.timeout(self.listener.limits.connect_timeout):  # no extra task, unlike wait_for
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

    def _dial_failed(self, reason: str) -> None:
        self._run(self.relay.dial_failed(reason))
        self._maybe_ended()

    def _close(self, abort: frozenset[Side]) -> None:
        self._disarm(Timer.HANDSHAKE)
        self._disarm(Timer.IDLE)
        up = self.up
        if self._dial_task is not None and (up is None or up.transport is None):
            # uvloop can hand the leg its transport (and the handshake can even finish) before
            # create_connection returns; cancelling it then closes that transport without ever
            # calling connection_lost. A connected leg is closed like any other; only a dial still
            # connecting is cancelled.
            self._dial_task.cancel()
            self._dial_task = None
        for leg in (self.down, up):
            if leg is not None:
                if leg.side in abort:
                    leg.abort()
                else:
                    leg.close()
        self._maybe_ended()

    def _maybe_ended(self) -> None:
        if self.relay.state is not State.CLOSING:
            return
        if all(leg.lost or leg.transport is None for leg in (self.down, self.up) if leg is not None):
            self._run(self.relay.ended(self.bytes_to_upstream, self.bytes_to_downstream, self.loop.time()))

    # -- internals --------------------------------------------------------------------------------

    def _leg(self, side: Side) -> Leg:
        if self.policy.tls_side is side:
            return TLSLeg(self, side, self.policy.tls_engine(), client=side is Side.UP)
        return Leg(self, side)

    def _keep_session(self, leg: TLSLeg) -> None:
        sessions = self.policy.sessions
        if sessions is None or sessions.keep(leg.tls):
            leg.after_read = None
