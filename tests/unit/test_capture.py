"""Tests for sidecar.capture: the per-connection decisions of the capture listeners, from the
original destination (or its absence) and the config, before any byte moves."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.capture import Action, Reason, first_bytes_action, plan_inbound, plan_outbound
from sidecar.config import Address, InboundMode, Transparent, TransparentOutbound, Unmatched, parse
from sidecar.routes import RouteTable


def transparent(unmatched: str = "passthrough") -> Transparent:
    t = {
        "uid": 10001,
        "outbound": {
            "listen": "127.0.0.1:15001",
            "routes": [{"to": "10.0.0.0/8:8080", "server_identity": ["spiffe://mesh.local/orders"]}],
            "unmatched": unmatched,
        },
        "inbound": {"listen": "0.0.0.0:15006", "ports": [{"port": 8080, "allow": ["spiffe://mesh.local/frontend"]}]},
    }
    cfg = parse({"tls": {"cert": "c", "key": "k", "ca": "a"}, "transparent": t}, base_dir=Path("/"))
    assert cfg.transparent is not None
    return cfg.transparent


def outbound(unmatched: str = "passthrough") -> tuple[RouteTable, TransparentOutbound]:
    out = transparent(unmatched).outbound
    assert out is not None
    return RouteTable(out.routes), out


def test_a_routed_destination_is_dialled_as_is_with_mtls_and_the_routes_identity() -> None:
    table, cfg = outbound()
    plan = plan_outbound(("10.1.2.3", 8080), table, cfg)
    assert plan.action is Action.MTLS and plan.dial == Address("10.1.2.3", 8080)
    assert plan.route is cfg.routes[0]


@pytest.mark.parametrize(("unmatched", "action"), [("passthrough", Action.PASSTHROUGH), ("deny", Action.REFUSE)])
def test_unmatched_destinations(unmatched: str, action: Action) -> None:
    table, cfg = outbound(unmatched)
    assert cfg.unmatched is Unmatched(unmatched)
    plan = plan_outbound(("10.1.2.3", 9090), table, cfg)
    assert plan.action is action and plan.route is None
    if action is Action.PASSTHROUGH:
        assert plan.dial == Address("10.1.2.3", 9090)
    else:
        assert plan.reason is Reason.NO_ROUTE and plan.dial is None


@pytest.mark.parametrize(
    ("dst", "reason"),
    [(None, Reason.NOT_REDIRECTED), (("127.0.0.1", 15001), Reason.LOOPBACK), (("::1", 8080), Reason.LOOPBACK)],
)
def test_outbound_refusals(dst: tuple[str, int] | None, reason: Reason) -> None:
    table, cfg = outbound()
    plan = plan_outbound(dst, table, cfg)
    assert plan.action is Action.REFUSE and plan.reason is reason and plan.dial is None


def test_inbound_forwards_the_original_port_to_loopback_with_its_allow_list() -> None:
    inbound = transparent().inbound
    assert inbound is not None
    plan = plan_inbound(("10.231.1.1", 8080), inbound)
    assert plan.action is Action.MTLS and plan.forward == Address("127.0.0.1", 8080)
    assert [p.text for p in plan.allow] == ["spiffe://mesh.local/frontend"]
    assert plan_inbound(("fd00::1", 8080), inbound).forward == Address("127.0.0.1", 8080)


@pytest.mark.parametrize(
    ("dst", "reason"), [(None, Reason.NOT_REDIRECTED), (("10.0.0.1", 9090), Reason.PORT_NOT_CAPTURED)]
)
def test_inbound_refusals(dst: tuple[str, int] | None, reason: Reason) -> None:
    inbound = transparent().inbound
    assert inbound is not None
    plan = plan_inbound(dst, inbound)
    assert plan.action is Action.REFUSE and plan.reason is reason and plan.forward is None and plan.allow == ()


def test_first_bytes_decide_by_mode() -> None:
    assert first_bytes_action(True, InboundMode.STRICT) == (Action.MTLS, None)
    assert first_bytes_action(True, InboundMode.PERMISSIVE) == (Action.MTLS, None)
    assert first_bytes_action(False, InboundMode.PERMISSIVE) == (Action.PASSTHROUGH, None)
    assert first_bytes_action(False, InboundMode.STRICT) == (Action.REFUSE, Reason.NOT_TLS)
