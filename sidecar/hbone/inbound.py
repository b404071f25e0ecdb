"""The ``hbone`` listener: TLS connections in, each a tunnel whose CONNECT streams are connections.

A verified peer is accepted at TLS (ALPN ``h2`` required); each well-formed CONNECT becomes one
``Connection`` with the policy of its port (``PortPolicy``), relayed like any other: the relay
authorizes the tunnel's peer against that port's ``allow`` (403, nothing dialled, outcome
``denied``), dials ``127.0.0.1:<port>`` (503 when that fails), and streams. Streams count toward
``limits.max_connections`` and write the access records; 400 and 405 (not a CONNECT to
``host:port``) are refused by the tunnel itself and recorded as ``denied``. A reload or a drain
sends GOAWAY on the tunnels made before it: their open streams finish, new ones go elsewhere.
"""

from __future__ import annotations

import asyncio
import logging

from h2.errors import ErrorCodes

from ..config import Address, Hbone, Limits
from ..connection import Connection
from ..identity import Pattern, PeerIdentity, needs_spki
from ..legs import Leg, LegOwner
from ..listeners import BaseListener, Refuse
from ..logs import event
from ..metrics import ListenerMetrics
from ..policies import refusal
from ..record import Direction, Outcome, Record, log_access
from ..relay import Side
from ..tls import Material, TLSStore
from ..tlsio import TLSEngine
from . import events as ev
from .server import HboneServer
from .streamleg import StreamLeg
from .tunnel import Tunnel

log = logging.getLogger("sidecar.hbone")
FORWARD_HOST = "127.0.0.1"


class IncomingStreams:
    """The ``StreamSource`` of streams the peer opens: a fresh leg, attached by the tunnel."""

    def leg(self, owner: LegOwner, side: Side) -> Leg:
        return StreamLeg(owner, side)

    async def open(self, leg: Leg, target: Address, client: str) -> None:
        raise NotImplementedError("a stream in is opened by its peer, never dialled")


INCOMING = IncomingStreams()


class PortPolicy:
    """A stream to one port of the hbone listener: authorize the tunnel's peer, dial 127.0.0.1:port.
    ``allow`` None: the port is not in ``hbone.ports``, and nobody may reach it."""

    direction = Direction.INBOUND
    tls_side = None  # the TLS is the tunnel's
    stream_side = Side.DOWN
    streams = INCOMING
    sessions = None
    forwarding = None  # contract section 11's ports say nothing of PROXY headers or XFCC
    needs_spki = False  # the peer's identity is its tunnel's, pinned there when a port pins

    def __init__(self, name: str, port: int, allow: tuple[Pattern, ...] | None) -> None:
        self.name = name
        self.port = port
        self.allow = allow
        self._target = Address(FORWARD_HOST, port)

    def target(self) -> Address:
        return self._target

    def authorize(self, peer: PeerIdentity) -> str | None:
        if self.allow is None:
            return f"port {self.port} is not in hbone.ports"
        return refusal(peer, self.allow, f"hbone.ports[port {self.port}].allow")

    def tls_engine(self) -> TLSEngine:
        raise NotImplementedError("a stream's TLS is its tunnel's")


class ServerTunnel(Tunnel):
    """One accepted TLS connection of the hbone listener."""

    def __init__(self, listener: HboneListener, engine: TLSEngine, generation: int) -> None:
        loop = asyncio.get_running_loop()
        super().__init__(
            HboneServer(now=loop.time()),
            engine,
            client=False,
            limits=listener.limits,
            metrics=listener.metrics,
            loop=loop,
            pin=listener.needs_spki,
        )
        self.listener = listener
        self.generation = generation  # of the TLS material it was accepted with

    def accept(self, stream_id: int) -> None:
        self._server.accept(stream_id)
        self.pump()

    def refuse(self, stream_id: int, status: int) -> None:
        self._server.refuse(stream_id, status)
        self.pump()

    @property
    def _server(self) -> HboneServer:
        assert isinstance(self.mux, HboneServer)
        return self.mux

    def _handshake_failed(self, reason: str, text: str) -> None:
        event(
            log,
            logging.WARNING,
            "tunnel handshake failed",
            listener=self.listener.name,
            client=self.peer_address,
            reason=reason,
            error=text,
        )

    def _gone(self) -> None:
        self.listener.tunnel_gone(self)

    def _on_event(self, event: ev.Event) -> None:
        if isinstance(event, ev.DialRequested):
            self._requested(event)
        elif isinstance(event, ev.StreamRefused):
            self._record_refused(Outcome.DENIED, f"{event.status} {event.reason}")

    def _requested(self, request: ev.DialRequested) -> None:
        listener = self.listener
        if len(listener.active) >= listener.limits.max_connections:
            self.mux.reset(request.stream_id, ErrorCodes.REFUSED_STREAM)  # the peer may retry elsewhere
            self._record_refused(Outcome.LIMIT, "max_connections")
            return
        conn = Connection(listener, listener.policy_for(request.port), self.loop)
        leg = conn.down
        assert isinstance(leg, StreamLeg)
        leg.attach(self, request.stream_id, incoming=True)
        self.legs[request.stream_id] = leg
        listener.active.add(conn)
        listener.metrics.opened()
        leg.begin()

    def _record_refused(self, outcome: Outcome, reason: str) -> None:
        listener = self.listener
        n = self.negotiated
        listener.metrics.ended(outcome)
        log_access(
            Record(
                listener.name,
                listener.direction,
                self.peer_address,
                outcome,
                reason=reason,
                peer_identity=n.peer.describe() if n is not None else None,
                tls_version=n.version if n is not None else None,
                cipher=n.cipher if n is not None else None,
                resumed=n.resumed if n is not None else False,
            )
        )


class HboneListener(BaseListener):
    """``hbone.listen``: each accepted TLS connection is a ``ServerTunnel``."""

    def __init__(self, spec: Hbone, store: TLSStore, limits: Limits, metrics: ListenerMetrics) -> None:
        super().__init__(spec.name, Direction.INBOUND, spec.listen, limits, metrics)
        self.store = store
        self.ports = {p.port: PortPolicy(spec.name, p.port, p.allow) for p in spec.ports}
        self.needs_spki = any(needs_spki(p.allow) for p in spec.ports)
        self.tunnels: set[ServerTunnel] = set()
        store.want_h2()
        store.subscribers.append(self._material_changed)

    def policy_for(self, port: int) -> PortPolicy:
        return self.ports.get(port) or PortPolicy(self.name, port, None)

    def tunnel_gone(self, tunnel: ServerTunnel) -> None:
        self.tunnels.discard(tunnel)

    def stop_accepting(self) -> None:
        super().stop_accepting()
        for tunnel in list(self.tunnels):
            tunnel.stop_streams()  # the drain: open streams finish, no new ones

    async def wait_closed(self) -> None:
        await super().wait_closed()
        for tunnel in list(self.tunnels):
            tunnel.close()

    def _accept(self) -> asyncio.Protocol:
        if len(self.tunnels) >= self.limits.max_connections:
            return Refuse(self)
        material = self.store.material
        assert material.h2 is not None, "the store builds h2 contexts for an hbone listener"
        engine = TLSEngine(material.h2.server, server_side=True, vet=material.vet)
        tunnel = ServerTunnel(self, engine, material.generation)
        self.tunnels.add(tunnel)
        return tunnel.leg

    def _material_changed(self, material: Material) -> None:
        """Tunnels accepted under older material take no new streams: the peer re-dials with the new."""
        for tunnel in list(self.tunnels):
            if tunnel.generation != material.generation:
                tunnel.stop_streams()
