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
    stream_side: Side | None = None
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
    """A relay of a ``FakePolicy``; ``stream_side=`` in ``kw`` makes that leg a tunnel's stream."""
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
        assert rec.original_dst is None  # not captured


def test_an_end_of_data_held_before_streaming_makes_it_half_closed_at_once() -> None:
    r = relay(Side.UP, direction=Direction.OUTBOUND)
    r.started("c", 100.0)
    r.dialled(100.0)
    assert r.eof(Side.DOWN) == []  # the app finished sending during the upstream handshake
    assert r.state is State.HANDSHAKING
    r.secured(negotiated(), 100.1, 1.7e9)
    assert r.state is State.HALF_CLOSED
    assert r.eof(Side.UP) == [Close()]


# -- transparent mode: where it was going, and plain TCP let through ---------------------------------


def test_a_captured_connection_records_its_original_destination() -> None:
    r = relay(Side.DOWN)
    r.original_dst = "[fd00::7]:8080"
    r.started("c", 100.0)
    r.secured(negotiated(), 100.0, 1.7e9)
    r.dialled(100.0)
    r.eof(Side.DOWN)
    r.eof(Side.UP)
    (finish,) = r.ended(1, 2, 100.5)
    assert isinstance(finish, Finish)
    assert (finish.record.original_dst, finish.record.outcome) == ("[fd00::7]:8080", Outcome.OK)


@pytest.mark.parametrize(
    ("ending", "outcome"),
    [
        ("both_eof", Outcome.PASSTHROUGH),  # ended well: let through, not ok (no mTLS was involved)
        ("lost_streaming", Outcome.PASSTHROUGH),
        ("client_left_early", Outcome.PASSTHROUGH),
        ("dial_failed", Outcome.UPSTREAM_ERROR),  # failures keep their own outcome
        ("cut", Outcome.PASSTHROUGH),
    ],
)
def test_plain_tcp_let_through_ends_as_passthrough_where_it_would_be_ok(ending: str, outcome: Outcome) -> None:
    r = relay(None, direction=Direction.OUTBOUND)
    r.passthrough = True
    r.original_dst = "10.0.0.7:5432"
    r.started("c", 100.0)
    if ending == "client_left_early":
        r.lost(Side.DOWN, None)
    elif ending == "dial_failed":
        r.dial_failed("connect to 10.0.0.7:5432: Connection refused")
    else:
        r.dialled(100.0)
        if ending == "both_eof":
            r.eof(Side.UP)
            r.eof(Side.DOWN)
        elif ending == "lost_streaming":
            r.lost(Side.UP, "ConnectionResetError")
        else:
            r.cut("drain_timeout")
    assert r.state is State.CLOSING
    (finish,) = r.ended(0, 0, 100.1)
    assert isinstance(finish, Finish)
    assert finish.record.outcome is outcome
    assert finish.record.original_dst == "10.0.0.7:5432"
    assert finish.record.peer_identity is None and finish.record.tls_version is None


# -- a stream of a verified tunnel ---------------------------------------------------------------------


def test_a_stream_in_authorizes_the_tunnels_peer_first_then_dials() -> None:
    r = relay(None, stream_side=Side.DOWN)
    actions = r.started("127.0.0.1:15008", 100.0, negotiated())
    assert actions == [Dial(FORWARD)]  # no handshake of its own: the tunnel's peer is known and allowed
    assert r.state is State.DIALING
    assert kinds(r.dialled(100.1)) == [Stream, ArmTimer]
    r.eof(Side.DOWN)
    r.eof(Side.UP)
    (finish,) = r.ended(3, 4, 101.0)
    assert isinstance(finish, Finish)
    assert (finish.record.peer_identity, finish.record.tls_version) == ("spiffe://mesh.local/frontend", "TLSv1.3")
    assert finish.record.handshake_error is None


def test_a_stream_in_from_a_peer_not_allowed_is_refused_before_any_dial() -> None:
    r = relay(None, stream_side=Side.DOWN)
    actions = r.started("127.0.0.1:15008", 100.0, negotiated(STRANGER))
    assert actions == [Close()]  # no SendEOF: the stream leg answers the refusal (403) as it closes
    assert r.policy.targets == []  # type: ignore[attr-defined]
    assert (r.outcome, r.reason) == (Outcome.DENIED, "identity spiffe://mesh.local/stranger is not in allow")
    (finish,) = r.ended(0, 0, 100.0)
    assert isinstance(finish, Finish)
    assert finish.record.outcome is Outcome.DENIED and finish.record.peer_identity == "spiffe://mesh.local/stranger"


def test_a_stream_in_without_its_tunnels_peer_is_a_bug() -> None:
    r = relay(None, stream_side=Side.DOWN)
    with pytest.raises(RelayBug, match="no verified peer"):
        r.started("c", 100.0)


def test_a_stream_out_dials_and_takes_the_upstream_the_tunnel_verified() -> None:
    r = relay(None, stream_side=Side.UP, direction=Direction.OUTBOUND)
    assert r.started("127.0.0.1:5000", 100.0) == [Dial(FORWARD)]  # the dial is the stream's open
    assert kinds(r.dialled(100.1, negotiated(STRANGER))) == [Stream, ArmTimer]  # verified by the pool, not here
    r.eof(Side.UP)
    r.eof(Side.DOWN)
    (finish,) = r.ended(1, 2, 100.5)
    assert isinstance(finish, Finish)
    assert finish.record.peer_identity == "spiffe://mesh.local/stranger"


@pytest.mark.parametrize("reset", [Side.DOWN, Side.UP])
def test_with_a_stream_leg_a_reset_is_passed_on_as_a_reset(reset: Side) -> None:
    r = relay(None, stream_side=Side.UP, direction=Direction.OUTBOUND)
    r.started("c", 100.0)
    r.dialled(100.0, negotiated())
    other = Side.UP if reset is Side.DOWN else Side.DOWN
    assert r.lost(reset, "ConnectionResetError", reset=True) == [Close(abort=frozenset({other}), reset=True)]
    assert (r.outcome, r.reason) == (Outcome.OK, "ConnectionResetError")


def test_without_a_stream_leg_a_reset_still_closes_the_other_leg_gracefully() -> None:
    r = inbound_streaming()
    assert r.lost(Side.UP, "ConnectionResetError", reset=True) == [Close()]


def test_a_stream_lost_without_a_reset_closes_the_other_leg_gracefully() -> None:
    r = relay(None, stream_side=Side.DOWN)
    r.started("c", 100.0, negotiated())
    r.dialled(100.0)
    assert r.lost(Side.DOWN, None) == [Close()]


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


@pytest.mark.parametrize("tls_side", [Side.DOWN, Side.UP])
def test_a_peer_its_own_trust_domain_does_not_vouch_for_is_refused_before_allow(tls_side: Side) -> None:
    """The material's trust-domain check (``Negotiated.trust_problem``) comes before ``allow``: an
    allowed identity is refused as a TLS failure (``untrusted``), and nothing is dialled or streamed."""
    r = relay(tls_side, direction=Direction.INBOUND if tls_side is Side.DOWN else Direction.OUTBOUND)
    r.started("c", 100.0)
    if tls_side is Side.UP:
        r.dialled(100.0)
    problem = "spiffe://mesh.local/frontend: its chain does not lead to the bundle of its trust domain mesh.local"
    impostor = Negotiated("TLSv1.3", "TLS_AES_128_GCM_SHA256", False, FRONTEND, 2e9, trust_problem=problem)
    actions = r.secured(impostor, 100.1, 1.7e9)
    seconds = took(actions, 0.1)
    assert actions == [Handshook(seconds=seconds, failure="untrusted"), SendEOF(tls_side), Close()]
    assert r.policy.targets == ([] if tls_side is Side.DOWN else [FORWARD])  # type: ignore[attr-defined]
    (finish,) = r.ended(0, 0, 100.2)
    assert isinstance(finish, Finish)
    rec = finish.record
    assert (rec.outcome, rec.handshake_error, rec.reason) == (Outcome.TLS_ERROR, "untrusted", problem)
    assert rec.peer_identity == "spiffe://mesh.local/frontend"  # what it claimed, for the record


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


# -- refusals of what the connection carries (identity forwarding) ----------------------------------


def test_a_refusal_before_the_dial_closes_without_dialling() -> None:
    r = relay(Side.DOWN)
    r.started("c", 100.0)
    assert kinds(r.secured(negotiated(), 100.1, 1.7e9)) == [Handshook, Dial]  # the driver refuses before dialling
    assert r.refused(Outcome.LIMIT, "proxy_header_too_large: 70000 bytes") == [Close()]
    assert (r.state, r.outcome, r.reason) == (State.CLOSING, Outcome.LIMIT, "proxy_header_too_large: 70000 bytes")
    assert r.dial_failed("cancelled") == []
    (finish,) = r.ended(0, 0, 100.2)
    assert isinstance(finish, Finish) and finish.record.outcome is Outcome.LIMIT


def test_a_refusal_while_streaming_is_decided_at_once_and_kept_whatever_ends_the_connection() -> None:
    for end in ("lost", "eof", "idle", "cut", "close"):
        r = inbound_streaming()
        assert r.refused(Outcome.DENIED, "ambiguous_length (400): TE and CL", close=False) == []
        assert r.state is State.STREAMING  # owed answers still go out
        if end == "lost":
            assert r.lost(Side.DOWN, "ConnectionResetError") == [Close()]
        elif end == "eof":
            r.eof(Side.UP)
            assert r.eof(Side.DOWN) == [Close()]
        elif end == "idle":
            assert r.timed_out(Timer.IDLE, 1000.0, moved=0) == [Close()]
        elif end == "cut":
            assert r.cut("drain_timeout") == [Close(abort=BOTH)]
        else:
            assert r.refused(Outcome.DENIED, "ambiguous_length (400): TE and CL") == [Close()]
        assert (r.outcome, r.reason) == (Outcome.DENIED, "ambiguous_length (400): TE and CL"), end


def test_a_refusal_inside_a_message_aborts_that_leg() -> None:
    r = inbound_streaming()
    r.eof(Side.DOWN)
    assert r.state is State.HALF_CLOSED
    actions = r.refused(Outcome.DENIED, "bad_chunk (400): malformed", abort=Side.UP)
    assert actions == [Close(abort=frozenset({Side.UP}))]
    assert r.refused(Outcome.LIMIT, "later") == []  # once closing, nothing changes
    assert r.outcome is Outcome.DENIED


def test_a_refusal_can_wait_for_answers_only_while_streaming() -> None:
    r = relay(Side.DOWN)
    r.started("c", 100.0)
    with pytest.raises(RelayBug, match="waiting for answers in state handshaking"):
        r.refused(Outcome.DENIED, "x", close=False)
    with pytest.raises(RelayBug, match="refused in state handshaking"):
        r.refused(Outcome.DENIED, "x")


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
    for state in (State.HANDSHAKING, State.AUTHORIZING, State.DIALING, State.STREAMING, State.HALF_CLOSED):
        assert TRANSITIONS[state][Event.CUT] is State.CLOSING
        assert TRANSITIONS[state][Event.LOST] is State.CLOSING
    assert TRANSITIONS[State.CLOSING][Event.ENDED] is State.CLOSED
    assert set(TRANSITIONS) == set(State)
