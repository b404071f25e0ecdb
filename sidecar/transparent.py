"""Transparent mode's two listeners, ``transparent-outbound`` and ``transparent-inbound``: each
captured connection gets its relay policy when it is accepted (contract section 8).

Theory of operation. A connection the nat rules redirected to a capture port arrives with its
original destination in conntrack (``origdst.original_dst``). Before a byte is relayed, that
destination and the pure decisions of ``capture.py`` choose what it becomes: mTLS with one of the
ordinary relay policies (outbound: to the original destination, checking the route's identity, or,
on a route with ``tunnel: hbone``, a CONNECT stream of that destination on a pooled tunnel to port
15008 of its address; inbound: the port's ``allow``, then ``127.0.0.1:<original port>``), plain
TCP (``PlainPolicy``, recorded as ``passthrough``), or a refusal (closed at once, recorded as
``denied``: no route under ``unmatched: deny``, a port not captured, or a connection made straight
to the capture port, which has no original destination and is also what makes a capture loop
impossible). The transport is then handed to a relay ``Connection`` as if it had just been accepted.

In permissive mode inbound first holds the connection's first bytes (``origdst.FirstBytes``): a
TLS ClientHello goes to mTLS, anything else reaches the app as plain TCP, and so does a client that
sends nothing within ``PEEK_TIMEOUT`` (a protocol whose server speaks first: SMTP, MySQL, SSH).
The held bytes are handed on unchanged. Connections still waiting for their first bytes count
toward ``max_connections``; a drain decides them at once with what they have sent.

The capture ports are bound where REDIRECT delivers, for IPv4 and, where the host has IPv6 (the
condition under which ``sidecar iptables install`` adds ip6tables rules), for IPv6 with
``IPV6_V6ONLY``: loopback for outbound, every address for inbound. The process must run as
``transparent.uid``, whose connections the rules never capture: otherwise the sidecar's own
connections to peers would come back to it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
from collections import OrderedDict
from collections.abc import Callable
from typing import cast

from prometheus_client import Gauge

from .capture import INBOUND_LISTENER, OUTBOUND_LISTENER, Action, first_bytes_action, plan_inbound, plan_outbound
from .config import (
    Address,
    Config,
    Inbound,
    InboundMode,
    Limits,
    Outbound,
    Route,
    TransparentInbound,
    TransparentOutbound,
)
from .errors import SidecarError
from .forwarding import Forwarding
from .hbone.authority import format_authority
from .hbone.outbound import TunnelPolicy, TunnelPool
from .identity import PeerIdentity
from .iptables import ipv6_enabled
from .legs import peer_address
from .listeners import BaseListener
from .logs import event
from .metrics import DataMetrics, ListenerMetrics
from .origdst import FirstBytes, Socket, format_dst, original_dst
from .policies import InboundPolicy, OutboundPolicy
from .record import Direction, Outcome, Record, log_access
from .routes import RouteTable
from .tls import TLSStore
from .tlsio import TLSEngine

log = logging.getLogger("sidecar")

# How long permissive inbound waits for a client's first bytes. A TLS client sends its ClientHello
# as soon as it is connected; a client that says nothing for this long is waiting for the server to
# speak first, and is passed through as plain TCP (Istio calls this protocolDetectionTimeout).
PEEK_TIMEOUT = 1.0
KEPT_DESTINATIONS = 1024  # outbound mTLS policies (or tunnel pools) kept, per route and destination (or its address)
HBONE_PORT = 15008  # a route's tunnel goes to this port of the original destination's address (contract section 11)
LOOPBACK = ("127.0.0.1", "::1")
ANY_ADDRESS = ("0.0.0.0", "::")

OriginalDst = Callable[[Socket], "tuple[str, int] | None"]
TunnelUpstream = Callable[[str], Address]  # a destination address -> where its hbone listener is


def hbone_upstream(ip: str) -> Address:
    return Address(ip, HBONE_PORT)


class PlainPolicy:
    """Plain TCP to ``target``: no TLS leg, so no identity (``passthrough`` in the record)."""

    tls_side = None
    stream_side = None
    streams = None
    sessions = None
    needs_spki = False

    def __init__(self, name: str, direction: Direction, target: Address, forwarding: Forwarding | None = None) -> None:
        self.forwarding = forwarding  # a permissive port's plain caller: the `conn` header, no XFCC of its own
        self.name = name
        self.direction = direction
        self._target = target

    def tls_engine(self) -> TLSEngine:
        raise RuntimeError("a plain policy has no TLS leg")

    def target(self) -> Address:
        return self._target

    def authorize(self, peer: PeerIdentity) -> str | None:
        return "plain TCP carries no identity"  # never asked: there is no handshake


class RoutePolicies:
    """transparent-outbound's policies. A route without a tunnel: an mTLS policy per destination,
    each keeping the TLS session of that destination. A route with one: a pool of tunnels per
    destination address (``upstream(ip)``, port 15008 of it), each tunnel verified as the route
    says, and a policy per connection that CONNECTs its original destination there. Beyond
    ``KEPT_DESTINATIONS`` of either, the least recently used go (a pool let go closes once the
    streams on it have ended)."""

    def __init__(
        self,
        listen: Address,
        store: TLSStore,
        limits: Limits,
        metrics: ListenerMetrics,
        gauge: Gauge | None,
        upstream: TunnelUpstream = hbone_upstream,
    ) -> None:
        self._listen = listen
        self._store = store
        self._limits = limits
        self._metrics = metrics
        self._gauge = gauge  # sidecar_hbone_pool_connections, when a route has a tunnel
        self._upstream = upstream
        self._kept: OrderedDict[tuple[int, Address], OutboundPolicy] = OrderedDict()
        self._pools: OrderedDict[tuple[int, str], TunnelPool] = OrderedDict()

    def get(self, route: Route, dst: Address) -> OutboundPolicy | TunnelPolicy:
        if route.tunnel is not None:
            authority = format_authority(dst.host, dst.port)
            return TunnelPolicy(OUTBOUND_LISTENER, self._pool(route, dst.host), dst, authority)
        key = (id(route), dst)  # routes live as long as the config
        kept = self._kept
        policy = kept.get(key)
        if policy is not None:
            kept.move_to_end(key)
            return policy
        spec = Outbound(OUTBOUND_LISTENER, self._listen, dst, route.server_identity, route.server_name)
        policy = kept[key] = OutboundPolicy(spec, self._store)
        if len(kept) > KEPT_DESTINATIONS:
            kept.popitem(last=False)
        return policy

    def close(self) -> None:
        """Shutting down: close every pooled tunnel."""
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()

    def _pool(self, route: Route, ip: str) -> TunnelPool:
        key = (id(route), ip)
        pools = self._pools
        pool = pools.get(key)
        if pool is not None:
            pools.move_to_end(key)
            return pool
        assert self._gauge is not None, "made when a route has a tunnel"
        spec = Outbound(
            OUTBOUND_LISTENER, self._listen, self._upstream(ip), route.server_identity, route.server_name, route.tunnel
        )
        pool = pools[key] = TunnelPool(spec, self._store, self._limits, self._metrics, self._gauge)
        if len(pools) > KEPT_DESTINATIONS:
            pools.popitem(last=False)[1].retire_all()
        return pool


class Pending(asyncio.Protocol):
    """A captured connection whose policy is not chosen yet: the transport's protocol until then.

    Its listener chooses as soon as it is connected, or, when it must see the first bytes, once
    they decide, the client finishes sending, or ``PEEK_TIMEOUT`` passes."""

    __slots__ = ("accepted_at", "dst", "eof", "first", "listener", "timer", "transport")

    def __init__(self, listener: CaptureListener) -> None:
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self.accepted_at = 0.0
        self.dst: tuple[str, int] | None = None
        self.first: FirstBytes | None = None  # set while its first bytes are awaited
        self.timer: asyncio.TimerHandle | None = None
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.listener.choose(self)

    def data_received(self, data: bytes) -> None:
        first = self.first
        if first is not None and first.feed(data) is not None:
            self.listener.peeked(self)

    def eof_received(self) -> bool:
        self.eof = True
        self.listener.peeked(self)
        return True  # the connection may still be answered

    def connection_lost(self, exc: Exception | None) -> None:
        self.listener.gone(self)


class CaptureListener(BaseListener):
    """A capture port: what each connection becomes is chosen per connection (``decide``)."""

    label: str  # the ``listener`` label
    flow: Direction

    def __init__(self, listen: Address, limits: Limits, metrics: DataMetrics, lookup: OriginalDst) -> None:
        name = self.label
        super().__init__(name, self.flow, listen, limits, metrics.for_listener(name, self.flow))
        self._lookup = lookup  # the original destination of an accepted socket
        self._pair = LOOPBACK if ipaddress.ip_address(listen.host).is_loopback else ANY_ADDRESS
        self._ipv6 = ipv6_enabled()
        if self._ipv6 and not _bindable(self._pair[1]):
            self._ipv6 = False  # IPv6 disabled on the interfaces (a container without IPv6, say)
            event(log, logging.WARNING, "IPv6 capture port not bound", listener=name, address=self._pair[1])
        self.peeking: set[Pending] = set()

    def hosts(self) -> list[str]:
        return list(self._pair) if self._ipv6 else [self._pair[0]]

    def accepted(self) -> asyncio.Protocol:
        pending = Pending(self)
        pending.accepted_at = asyncio.get_running_loop().time()
        return pending

    def stop_accepting(self) -> None:
        super().stop_accepting()
        for pending in list(self.peeking):
            self.peeked(pending)  # decided now with what came: the drain then waits for it as for any other

    # -- what a pending connection reports ------------------------------------------------------

    def choose(self, pending: Pending) -> None:
        transport = pending.transport
        assert transport is not None
        sock = transport.get_extra_info("socket")
        pending.dst = self._lookup(sock) if sock is not None else None
        self.decide(pending, pending.dst)

    def decide(self, pending: Pending, dst: tuple[str, int] | None) -> None:
        raise NotImplementedError

    def peeked(self, pending: Pending) -> None:
        """Its first bytes decided, it finished sending, or the wait is over (only when peeking)."""

    def gone(self, pending: Pending) -> None:
        """Its transport closed before it was handed over (only when peeking)."""

    # -- the three ends of a choice -------------------------------------------------------------

    def refuse(self, pending: Pending, reason: str) -> None:
        """Close at once; counted and logged as ``denied``, never opened."""
        transport = pending.transport
        assert transport is not None
        client = peer_address(transport)
        transport.abort()
        self.metrics.ended(Outcome.DENIED)
        dst = format_dst(pending.dst) if pending.dst is not None else None
        log_access(Record(self.name, self.direction, client, Outcome.DENIED, original_dst=dst, reason=reason))

    def hand_over(
        self, pending: Pending, policy: InboundPolicy | OutboundPolicy | TunnelPolicy | PlainPolicy, held: bytes = b""
    ) -> None:
        """Give the transport to a relay connection with ``policy``, as if just accepted, then
        what the client already sent (``held``, and its end of data)."""
        transport, dst = pending.transport, pending.dst
        assert transport is not None and dst is not None
        conn = self.open(policy)
        conn.destination = dst  # what the app is told the caller was calling: the original destination
        relay = conn.relay
        relay.original_dst = format_dst(dst)
        relay.passthrough = isinstance(policy, PlainPolicy)
        relay.started_at = pending.accepted_at  # a wait for the first bytes is part of its life
        leg = conn.down
        transport.set_protocol(leg)
        leg.connection_made(transport)
        if held and not transport.is_closing():
            leg.data_received(held)
        if pending.eof and not transport.is_closing():
            leg.eof_received()


class OutboundCapture(CaptureListener):
    """``transparent-outbound``: the app's connections, to the original destination with mTLS
    (a route; through a tunnel if it has one), as plain TCP (``unmatched: passthrough``) or not at
    all. ``upstream`` says where a destination address's hbone listener is (port 15008 of it)."""

    label, flow = OUTBOUND_LISTENER, Direction.OUTBOUND

    def __init__(
        self,
        spec: TransparentOutbound,
        store: TLSStore,
        limits: Limits,
        metrics: DataMetrics,
        lookup: OriginalDst = original_dst,
        upstream: TunnelUpstream = hbone_upstream,
    ) -> None:
        super().__init__(spec.listen, limits, metrics, lookup)
        self.spec = spec
        self.routes = RouteTable(spec.routes)
        gauge = None
        if any(route.tunnel is not None for route in spec.routes):
            store.want_h2()  # before the first material is loaded
            gauge = metrics.hbone_pool_connections.labels(listener=self.name)
        self.policies = RoutePolicies(spec.listen, store, limits, self.metrics, gauge, upstream)

    async def start(self, sockets: list[socket.socket] | None = None) -> None:
        await self.routes.start()  # host-name routes resolved before the first connection
        await super().start(sockets)

    async def wait_closed(self) -> None:
        await self.routes.aclose()
        await super().wait_closed()
        self.policies.close()

    def decide(self, pending: Pending, dst: tuple[str, int] | None) -> None:
        plan = plan_outbound(dst, self.routes, self.spec)
        if plan.action is Action.REFUSE:
            self.refuse(pending, str(plan.reason))
            return
        assert plan.dial is not None
        if plan.action is Action.MTLS:
            assert plan.route is not None
            self.hand_over(pending, self.policies.get(plan.route, plan.dial))
        else:
            self.hand_over(pending, PlainPolicy(self.name, self.direction, plan.dial))


class InboundCapture(CaptureListener):
    """``transparent-inbound``: peers' connections to a captured app port, through mTLS and the
    port's ``allow`` to ``127.0.0.1:<port>``; in permissive mode plain TCP too."""

    label, flow = INBOUND_LISTENER, Direction.INBOUND

    def __init__(
        self,
        spec: TransparentInbound,
        store: TLSStore,
        limits: Limits,
        metrics: DataMetrics,
        lookup: OriginalDst = original_dst,
    ) -> None:
        super().__init__(spec.listen, limits, metrics, lookup)
        self.spec = spec
        self.ports: dict[int, tuple[InboundPolicy, PlainPolicy]] = {}
        for port in spec.ports:
            app = Address("127.0.0.1", port.port)
            inbound = Inbound(
                INBOUND_LISTENER, spec.listen, app, port.allow, port.proxy_protocol, port.client_cert_header
            )
            mtls = InboundPolicy(inbound, store)
            self.ports[port.port] = (mtls, PlainPolicy(INBOUND_LISTENER, Direction.INBOUND, app, mtls.forwarding))

    def decide(self, pending: Pending, dst: tuple[str, int] | None) -> None:
        plan = plan_inbound(dst, self.spec)
        if plan.action is Action.REFUSE:
            self.refuse(pending, str(plan.reason))
            return
        assert dst is not None
        if self.spec.mode is InboundMode.STRICT:
            self.hand_over(pending, self.ports[dst[1]][0])  # plaintext fails the handshake: tls_error
            return
        pending.first = FirstBytes()
        pending.timer = asyncio.get_running_loop().call_later(PEEK_TIMEOUT, self.peeked, pending)
        self.peeking.add(pending)
        self.choosing += 1

    def peeked(self, pending: Pending) -> None:
        first = self._done_peeking(pending)
        if first is None:
            return
        held = first.take()
        # Undecided (fewer than 6 bytes, all of them a ClientHello's so far) goes to the handshake,
        # which handshake_timeout bounds; nothing at all is a client waiting for the server.
        tls = first.verdict if first.verdict is not None else bool(held)
        action, _ = first_bytes_action(tls, InboundMode.PERMISSIVE)
        assert pending.dst is not None
        mtls, plain = self.ports[pending.dst[1]]
        self.hand_over(pending, mtls if action is Action.MTLS else plain, held)

    def gone(self, pending: Pending) -> None:
        if self._done_peeking(pending) is None:
            return  # refused, or handed over: the connection's leg heard it
        self.metrics.ended(Outcome.OK)
        dst = format_dst(pending.dst) if pending.dst is not None else None
        client = peer_address(pending.transport)
        reason = "client closed before its first bytes"
        log_access(Record(self.name, self.direction, client, Outcome.OK, original_dst=dst, reason=reason))

    def _done_peeking(self, pending: Pending) -> FirstBytes | None:
        if pending not in self.peeking:
            return None
        self.peeking.discard(pending)
        self.choosing -= 1
        if pending.timer is not None:
            pending.timer.cancel()
            pending.timer = None
        first, pending.first = pending.first, None
        return first


def capture_listeners(cfg: Config, store: TLSStore, metrics: DataMetrics) -> list[tuple[str, CaptureListener]]:
    """The config's capture listeners, each with its YAML path (for errors); raises
    ``SidecarError`` unless this process runs as ``transparent.uid``."""
    t = cfg.transparent
    if t is None:
        return []
    euid = os.geteuid()
    if euid != t.uid:
        raise SidecarError(
            f"transparent.uid: the sidecar runs as uid {euid}, not {t.uid}: run it as transparent.uid "
            "(the nat rules let that uid's connections through; any other uid's would be captured again)"
        )
    out: list[tuple[str, CaptureListener]] = []
    if t.outbound is not None:
        out.append(("transparent.outbound.listen", OutboundCapture(t.outbound, store, cfg.limits, metrics)))
    if t.inbound is not None:
        out.append(("transparent.inbound.listen", InboundCapture(t.inbound, store, cfg.limits, metrics)))
    return out


def _bindable(host: str) -> bool:
    """Whether ``host`` can be bound here (``::1`` cannot where IPv6 is disabled on loopback)."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
    except OSError:
        return False
    return True
