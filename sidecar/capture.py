"""What a capture listener does with one captured connection, decided before a byte moves (pure).

Outbound: the original destination and the route table give mTLS (with the route's identity check;
directly, or through a tunnel when the route has one), plain passthrough, or a refusal. Inbound:
the original port gives the port's ``allow`` list and the app address ``127.0.0.1:<port>``, or a
refusal; in permissive mode, the first bytes decide between mTLS and plaintext passthrough. The
relay does the I/O; this module only decides.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from enum import StrEnum

from .config import TRANSPARENT_INBOUND, Address, InboundMode, Route, TransparentInbound, TransparentOutbound, Unmatched
from .identity import Pattern
from .routes import RouteTable

OUTBOUND_LISTENER = "transparent-outbound"  # the `listener` label values (contract section 8)
INBOUND_LISTENER = TRANSPARENT_INBOUND


class Action(StrEnum):
    MTLS = "mtls"  # TLS 1.3 with client certificates on the peer leg
    PASSTHROUGH = "passthrough"  # plain TCP, counted with outcome `passthrough`
    REFUSE = "refuse"  # close at once, counted with outcome `denied`


class Reason(StrEnum):
    """Why a captured connection was refused; the access record's ``reason``."""

    NOT_REDIRECTED = "not_redirected"  # made straight to a capture port
    LOOPBACK = "loopback_destination"  # loopback is never captured: only a rules mismatch gets here
    NO_ROUTE = "no_route"  # outbound, `unmatched: deny`
    PORT_NOT_CAPTURED = "port_not_captured"  # inbound, a port not in `transparent.inbound.ports`
    NOT_TLS = "not_tls"  # inbound strict mode, first bytes not a ClientHello


@dataclass(frozen=True)
class OutboundPlan:
    action: Action
    dial: Address | None = None  # the original destination, dialled as is
    route: Route | None = None  # for MTLS: server_identity / server_name to verify, sni to send
    reason: Reason | None = None


@dataclass(frozen=True)
class InboundPlan:
    action: Action  # MTLS (then the allow check), or REFUSE; permissive plaintext is decided later
    forward: Address | None = None  # 127.0.0.1:<original port>
    allow: tuple[Pattern, ...] = ()  # the port's allow list, checked after the handshake
    reason: Reason | None = None


def plan_outbound(dst: tuple[str, int] | None, table: RouteTable, cfg: TransparentOutbound) -> OutboundPlan:
    """``dst`` is ``origdst.original_dst(sock)`` of the accepted connection."""
    if dst is None:
        return OutboundPlan(Action.REFUSE, reason=Reason.NOT_REDIRECTED)
    ip, port = dst
    if ipaddress.ip_address(ip).is_loopback:
        return OutboundPlan(Action.REFUSE, reason=Reason.LOOPBACK)
    route = table.lookup(ip, port)
    if route is not None:
        return OutboundPlan(Action.MTLS, Address(ip, port), route)
    if cfg.unmatched is Unmatched.PASSTHROUGH:
        return OutboundPlan(Action.PASSTHROUGH, Address(ip, port))
    return OutboundPlan(Action.REFUSE, reason=Reason.NO_ROUTE)


def plan_inbound(dst: tuple[str, int] | None, cfg: TransparentInbound) -> InboundPlan:
    """``dst`` is ``origdst.original_dst(sock)``; the app is always dialled on loopback."""
    if dst is None:
        return InboundPlan(Action.REFUSE, reason=Reason.NOT_REDIRECTED)
    entry = cfg.port(dst[1])
    if entry is None:
        return InboundPlan(Action.REFUSE, reason=Reason.PORT_NOT_CAPTURED)
    return InboundPlan(Action.MTLS, Address("127.0.0.1", entry.port), entry.allow)


def first_bytes_action(is_client_hello: bool, mode: InboundMode) -> tuple[Action, Reason | None]:
    """Once ``origdst.FirstBytes`` has a verdict: a ClientHello goes to mTLS; anything else reaches
    the app as plain TCP in permissive mode and is refused in strict mode (where sniffing is
    optional: without it the TLS handshake refuses plaintext, as a ``tls_error``)."""
    if is_client_hello:
        return Action.MTLS, None
    if mode is InboundMode.PERMISSIVE:
        return Action.PASSTHROUGH, None
    return Action.REFUSE, Reason.NOT_TLS
