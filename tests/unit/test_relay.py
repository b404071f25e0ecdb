"""The relay's state machine in memory: every transition, the actions each one asks for, each
failure path. No sockets, no event loop: events in, actions out."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from sidecar.config import Address
from sidecar.errors import PeerError, TLSFailure
from sidecar.identity import PeerIdentity, parse_pattern
from sidecar.record import Direction, Outcome
from sidecar.relay import (
    BOTH,
    TRANSITIONS,
    Action,
    ArmTimer,
    Close,
    Dial,
    Event,
    Finish,
    Handshook,
    Relay,
    RelayBug,
    SendEOF,
    Side,
    State,
    Stream,
    Timer,
)
from sidecar.tlsio import Negotiated

FORWARD = Address("127.0.0.1", 8080)
FRONTEND = PeerIdentity(uris=("spiffe://mesh.local/frontend",))
STRANGER = PeerIdentity(uris=("spiffe://mesh.local/stranger",))
HANDSHAKE_TIMEOUT = 10.0
IDLE_TIMEOUT = 300.0


@dataclass
class FakePolicy:
    """A policy is plain data and one pure decision: the relay's input, not the thing under test."""

    tls_side: Side | None
    direction: Direction = Direction.INBOUND
    name: str = "orders"
    allowed: tuple[str, ...] = ("spiffe://mesh.local/frontend",)
    targets: list[Address] = field(default_factory=list)

    def target(self) -> Address:
        self.targets.append(FORWARD)
        return FORWARD

    def authorize(self, peer: PeerIdentity) -> str | None:
        patterns = [parse_pattern(p) for p in self.allowed]
        return None if any(p.matches(peer) for p in patterns) else f"identity {peer.describe()} is not in allow"


def took(actions: list[Action], expected: float) -> float:
    """The first action's handshake time, once it is checked to be ``expected`` (a float: a
    compiled ``Handshook`` takes nothing else, so ``pytest.approx`` cannot go in its place)."""
    first = actions[0]
    assert isinstance(first, Handshook) and first.seconds == pytest.approx(expected), first
    return first.seconds


def relay(tls_side: Side | None = Side.DOWN, *, idle: float = IDLE_TIMEOUT, **kw: object) -> Relay:
    policy = FakePolicy(tls_side, **kw)  # type: ignore[arg-type]
    return Relay(policy, handshake_timeout=HANDSHAKE_TIMEOUT, idle_timeout=idle, now=100.0)


def negotiated(peer: PeerIdentity = FRONTEND, *, resumed: bool = False, not_after: float = 2e9) -> Negotiated:
    return Negotiated("TLSv1.3", "TLS_AES_128_GCM_SHA256", resumed, peer, not_after)


def inbound_streaming() -> Relay:
    r = relay(Side.DOWN)
    r.started("127.0.0.1:5000", 100.0)
    r.secured(negotiated(), 100.01, 1.7e9)
    r.dialled(100.02)
    assert r.state is State.STREAMING
    return r


def kinds(actions: list[Action]) -> list[type]:
    return [type(a) for a in actions]


# -- the happy paths, one per phase plan -------------------------------------------------------------


def test_inbound_handshakes_authorizes_then_dials_then_streams() -> None:
    r = relay(Side.DOWN)
    assert r.state is State.ACCEPTED
    assert r.started("127.0.0.1:5000", 100.0) == [ArmTimer(Timer.HANDSHAKE, HANDSHAKE_TIMEOUT)]
    assert r.state is State.HANDSHAKING
    actions = r.secured(negotiated(), 100.25, 1.7e9)
    assert actions == [Handshook(seconds=took(actions, 0.25)), Dial(FORWARD)]
    assert r.state is State.DIALING
    assert r.dialled(100.3) == [Stream(), ArmTimer(Timer.IDLE, IDLE_TIMEOUT / 4)]
    assert r.state is State.STREAMING


def test_outbound_dials_then_handshakes_then_streams() -> None:
    r = relay(Side.UP, direction=Direction.OUTBOUND)
    assert r.started("127.0.0.1:5000", 100.0) == [Dial(FORWARD)]
    assert r.state is State.DIALING
    assert r.dialled(100.1) == [ArmTimer(Timer.HANDSHAKE, HANDSHAKE_TIMEOUT)]
    assert r.state is State.HANDSHAKING
    actions = r.secured(negotiated(), 100.3, 1.7e9)
    assert kinds(actions) == [Handshook, Stream, ArmTimer]
    assert actions[0] == Handshook(seconds=took(actions, 0.2))  # from the dial, not from the accept
    assert r.state is State.STREAMING


def test_plain_passthrough_only_dials() -> None:
    r = relay(None)
    assert r.started("127.0.0.1:5000", 100.0) == [Dial(FORWARD)]
    assert kinds(r.dialled(100.1)) == [Stream, ArmTimer]
    assert r.state is State.STREAMING


def test_half_close_each_way_then_both_ends_close_gracefully() -> None:
    for first, second in ((Side.DOWN, Side.UP), (Side.UP, Side.DOWN)):
        r = inbound_streaming()
        assert r.eof(first) == []
        assert r.state is State.HALF_CLOSED  # the other direction keeps flowing
        assert r.eof(second) == [Close()]
        assert r.state is State.CLOSING and r.outcome is Outcome.OK
        (finish,) = r.ended(13, 21, 101.0)
        assert isinstance(finish, Finish)
        rec = finish.record
        assert r.state is State.CLOSED
        assert (rec.outcome, rec.bytes_to_upstream, rec.bytes_to_downstream) == (Outcome.OK, 13, 21)
        assert (rec.peer_identity, rec.tls_version, rec.client) == (
            "spiffe://mesh.local/frontend",
            "TLSv1.3",
            "127.0.0.1:5000",
        )
        assert rec.duration_ms == pytest.approx(1000.0)


def test_an_end_of_data_held_before_streaming_makes_it_half_closed_at_once() -> None:
    r = relay(Side.UP, direction=Direction.OUTBOUND)
    r.started("c", 100.0)
    r.dialled(100.0)
    assert r.eof(Side.DOWN) == []  # the app finished sending during the upstream handshake
    assert r.state is State.HANDSHAKING
    r.secured(negotiated(), 100.1, 1.7e9)
    assert r.state is State.HALF_CLOSED
    assert r.eof(Side.UP) == [Close()]


# -- refusals: nothing is dialled --------------------------------------------------------------------


def test_a_peer_not_allowed_is_refused_before_any_dial() -> None:
    r = relay(Side.DOWN)
    r.started("c", 100.0)
    actions = r.secured(negotiated(STRANGER), 100.1, 1.7e9)
    assert actions == [Handshook(seconds=took(actions, 0.1)), SendEOF(Side.DOWN), Close()]
    assert not any(isinstance(a, Dial) for a in actions)
    assert r.policy.targets == []  # type: ignore[attr-defined]
    assert (r.outcome, r.reason) == (Outcome.DENIED, "identity spiffe://mesh.local/stranger is not in allow")
    (finish,) = r.ended(0, 0, 100.2)
    assert isinstance(finish, Finish)
    assert finish.record.outcome is Outcome.DENIED
    assert finish.record.peer_identity == "spiffe://mesh.local/stranger"


def test_an_upstream_not_allowed_gets_none_of_the_apps_bytes() -> None:
    r = relay(Side.UP, direction=Direction.OUTBOUND)
    r.started("c", 100.0)
    r.dialled(100.0)
    actions = r.secured(negotiated(STRANGER), 100.1, 1.7e9)
    assert Stream() not in actions and SendEOF(Side.UP) in actions
    assert r.outcome is Outcome.DENIED


def test_a_resumed_session_of_an_expired_certificate_is_refused() -> None:
    r = relay(Side.DOWN)
    r.started("c", 100.0)
    actions = r.secured(negotiated(resumed=True, not_after=1.6e9), 100.1, 1.7e9)
    assert actions == [Handshook(seconds=took(actions, 0.1), failure="expired"), SendEOF(Side.DOWN), Close()]
    assert (r.outcome, r.handshake_error) == (Outcome.TLS_ERROR, "expired")


def test_a_full_handshake_is_not_held_to_the_resumption_rule() -> None:
    r = relay(Side.DOWN)
    r.started("c", 100.0)
    # OpenSSL itself refuses an expired certificate in a full handshake; only resumption skips that
    assert kinds(r.secured(negotiated(resumed=False, not_after=1.6e9), 100.1, 1.7e9)) == [Handshook, Dial]


# -- failures --------------------------------------------------------------------------------------


def test_a_failed_handshake_aborts_only_its_own_leg() -> None:
    r = relay(Side.UP, direction=Direction.OUTBOUND)
    r.started("c", 100.0)
    r.dialled(100.0)
    actions = r.failed(Side.UP, TLSFailure("untrusted", "certificate verify failed: unable to get local issuer"))
    assert actions == [Handshook(failure="untrusted"), Close(abort=frozenset({Side.UP}))]
    assert (r.outcome, r.handshake_error) == (Outcome.TLS_ERROR, "untrusted")


def test_a_tls_failure_while_streaming_aborts_both_legs() -> None:
    r = inbound_streaming()
    assert r.failed(Side.DOWN, TLSFailure("protocol", "DECRYPTION_FAILED_OR_BAD_RECORD_MAC")) == [Close(abort=BOTH)]
    assert r.outcome is Outcome.TLS_ERROR and r.handshake_error is None


def test_a_socket_failure_while_streaming_is_still_ok() -> None:
    r = inbound_streaming()
    assert r.failed(Side.UP, PeerError("eof", "reset")) == [Close(abort=BOTH)]
    assert r.outcome is Outcome.OK


@pytest.mark.parametrize(
    ("tls_side", "lost", "outcome", "handshake_error"),
    [
        (Side.DOWN, Side.DOWN, Outcome.TLS_ERROR, "eof"),  # the peer hung up mid-handshake
        (Side.UP, Side.UP, Outcome.UPSTREAM_ERROR, "eof"),  # the upstream hung up mid-handshake
        (Side.UP, Side.DOWN, Outcome.OK, None),  # the app gave up while we were handshaking for it
    ],
)
def test_a_leg_lost_during_the_handshake(
    tls_side: Side, lost: Side, outcome: Outcome, handshake_error: str | None
) -> None:
    r = relay(tls_side)
    r.started("c", 100.0)
    if tls_side is Side.UP:
        r.dialled(100.0)
    assert r.state is State.HANDSHAKING
    actions = r.lost(lost, None)
    assert actions[-1] == Close()
    assert (Handshook(failure="eof") in actions) is (handshake_error == "eof")
    assert (r.outcome, r.handshake_error) == (outcome, handshake_error)


def test_the_peer_leaving_while_we_dial_is_not_an_error() -> None:
    r = relay(Side.DOWN)
    r.started("c", 100.0)
    r.secured(negotiated(), 100.0, 1.7e9)
    assert r.lost(Side.DOWN, "ConnectionResetError") == [Close()]
    assert (r.outcome, r.reason) == (Outcome.OK, "client closed before streaming")


def test_a_failed_dial_closes_the_peer_gracefully() -> None:
    r = relay(Side.DOWN)
    r.started("c", 100.0)
    r.secured(negotiated(), 100.0, 1.7e9)
    assert r.dial_failed("connect to 127.0.0.1:8080: Connection refused") == [Close()]
    assert (r.outcome, r.reason) == (Outcome.UPSTREAM_ERROR, "connect to 127.0.0.1:8080: Connection refused")


def test_a_dial_that_completes_after_the_end_is_aborted_at_once() -> None:
    r = relay(Side.UP, direction=Direction.OUTBOUND)
    r.started("c", 100.0)
    r.lost(Side.DOWN, None)
    assert r.state is State.CLOSING
    assert r.dialled(100.1) == [Close(abort=frozenset({Side.UP}))]
    assert r.dial_failed("late") == []
    assert r.outcome is Outcome.OK


def test_losing_a_leg_while_streaming_closes_the_other_gracefully() -> None:
    r = inbound_streaming()
    assert r.lost(Side.UP, "ConnectionResetError") == [Close()]
    assert (r.outcome, r.reason) == (Outcome.OK, "ConnectionResetError")
    assert r.lost(Side.DOWN, None) == []  # late news once closing


# -- timers ----------------------------------------------------------------------------------------


def test_the_handshake_timer_cuts_a_stalled_handshake() -> None:
    r = relay(Side.DOWN)
    r.started("c", 100.0)
    assert r.timed_out(Timer.HANDSHAKE, 110.0) == [Handshook(failure="timeout"), Close(abort=BOTH)]
    assert (r.outcome, r.reason, r.handshake_error) == (Outcome.TIMEOUT, "handshake_timeout", "timeout")


def test_a_handshake_timer_that_fires_after_the_handshake_does_nothing() -> None:
    r = inbound_streaming()
    assert r.timed_out(Timer.HANDSHAKE, 110.0) == []
    assert r.state is State.STREAMING


def test_the_idle_timer_rearms_while_bytes_move_and_closes_once_they_stop() -> None:
    r = inbound_streaming()  # streaming since 100.02: first look at idle/4 = 75 s
    assert r.timed_out(Timer.IDLE, 175.0, moved=10) == [ArmTimer(Timer.IDLE, 75.0)]  # moved: idle from now
    assert r.timed_out(Timer.IDLE, 250.0, moved=10) == [ArmTimer(Timer.IDLE, 75.0)]  # 75 s idle, 225 left
    assert r.timed_out(Timer.IDLE, 325.0, moved=10) == [ArmTimer(Timer.IDLE, 75.0)]  # 150 s idle, 150 left
    assert r.timed_out(Timer.IDLE, 400.0, moved=10) == [ArmTimer(Timer.IDLE, 75.0)]  # 225 idle, 75 left
    assert r.timed_out(Timer.IDLE, 475.0, moved=10) == [Close()]  # 300 s without a byte
    assert (r.outcome, r.reason) == (Outcome.TIMEOUT, "idle_timeout")


def test_the_idle_timer_is_precise_for_short_timeouts() -> None:
    r = relay(Side.DOWN, idle=0.5)
    r.started("c", 100.0)
    r.secured(negotiated(), 100.0, 1.7e9)
    assert r.dialled(100.0)[-1] == ArmTimer(Timer.IDLE, 0.5)
    assert r.timed_out(Timer.IDLE, 100.5, moved=0) == [Close()]


def test_no_idle_timer_when_idle_timeout_is_zero() -> None:
    r = relay(Side.DOWN, idle=0)
    r.started("c", 100.0)
    r.secured(negotiated(), 100.0, 1.7e9)
    assert r.dialled(100.0) == [Stream()]


# -- the drain's cut ---------------------------------------------------------------------------------


def test_a_cut_aborts_both_legs_and_names_the_drain() -> None:
    r = inbound_streaming()
    assert r.cut("drain_timeout") == [Close(abort=BOTH)]
    assert (r.outcome, r.reason) == (Outcome.OK, "drain_timeout")


def test_a_cut_while_closing_keeps_the_outcome_already_decided() -> None:
    r = relay(Side.DOWN)
    r.started("c", 100.0)
    r.secured(negotiated(STRANGER), 100.0, 1.7e9)  # denied: lingering on its close
    assert r.cut("drain_timeout") == [Close(abort=BOTH)]
    assert r.outcome is Outcome.DENIED and r.reason != "drain_timeout"


# -- the table itself --------------------------------------------------------------------------------


def test_events_a_state_does_not_list_are_bugs() -> None:
    r = inbound_streaming()
    with pytest.raises(RelayBug, match="ended in state streaming"):
        r.ended(0, 0, 101.0)
    r2 = relay(Side.DOWN)
    r2.started("c", 100.0)
    with pytest.raises(RelayBug, match="dialled in state handshaking"):
        r2.dialled(100.0)  # an inbound connection dials only after its handshake


def test_every_open_state_can_be_cut_and_every_closing_one_ends() -> None:
    for state in (State.HANDSHAKING, State.DIALING, State.STREAMING, State.HALF_CLOSED):
        assert TRANSITIONS[state][Event.CUT] is State.CLOSING
        assert TRANSITIONS[state][Event.LOST] is State.CLOSING
    assert TRANSITIONS[State.CLOSING][Event.ENDED] is State.CLOSED
    assert set(TRANSITIONS) == set(State)
