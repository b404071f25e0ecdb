"""Outbound with ``tunnel: {protocol: hbone}``: each app connection is one CONNECT stream on a
pooled tunnel to a peer's hbone listener: an outbound listener's ``upstream``, or port 15008 of a
transparent route's original destination.

``TunnelPool`` is the pooled tunnels to one upstream, all verified one way: a stream slot from
the pool (``pool.Pool`` through ``checkout.Checkout``; one tunnel per upstream per worker, another
only past the peer's stream limit; concurrent first streams share one handshake), ``CONNECT
<authority>``, and the peer's answer: 200 connects the leg, any other status fails the open (the
app connection is closed). A tunnel's handshake checks ``server_identity`` once (or, without it,
OpenSSL checks the host name), exactly as a direct outbound connection does, and resumes a session
the same way. A reload retires every pooled tunnel: new streams go to tunnels made with the new
material; open streams finish; a retired tunnel closes with its last stream.

``TunnelPolicy`` is the relay policy of one target: its ``UP`` leg is a ``StreamLeg`` that it
opens (``open``) on its pool, with its authority, instead of a TCP dial. An outbound listener has
one (``upstream``, ``<upstream host>:<target_port>``); transparent mode makes one per captured
connection (its original destination, as authority too) on the pool of that destination's address.
"""

from __future__ import annotations

import asyncio
import time

from h2.errors import ErrorCodes
from prometheus_client import Gauge

from ..config import Address, Limits, Outbound
from ..identity import PeerIdentity, needs_spki
from ..legs import Leg, LegOwner, TLSLeg
from ..listeners import Listener
from ..metrics import ListenerMetrics
from ..policies import refusal, server_hostname
from ..record import Direction
from ..relay import Side
from ..sessions import SessionCache
from ..tls import Material, TLSStore
from ..tlsio import Negotiated, TLSEngine
from . import events as ev
from .authority import format_authority
from .checkout import Checkout
from .client import HboneClient, TunnelUnavailable
from .pool import Entry, Pool, PoolKey, PoolSettings
from .streamleg import StreamLeg
from .tunnel import Tunnel

OPEN_ATTEMPTS = 3  # a tunnel can go away between checkout and CONNECT: try another this often


class TunnelError(ConnectionError):
    """A pooled tunnel could not be made or used; the message says why."""


class ClientTunnel(Tunnel):
    """One pooled TLS connection to a peer's hbone listener."""

    def __init__(self, owner: TunnelPool, engine: TLSEngine) -> None:
        loop = asyncio.get_running_loop()
        super().__init__(
            HboneClient(now=loop.time()),
            engine,
            client=True,
            limits=owner.limits,
            metrics=owner.metrics,
            loop=loop,
            pin=needs_spki(owner.spec.server_identity or ()),
        )
        self.owner = owner
        self.entry: Entry[ClientTunnel] | None = None  # its place in the pool, once pooled
        self.ready: asyncio.Future[None] = loop.create_future()  # the handshake passed (or why not)

    def open_stream(self, leg: StreamLeg, authority: str, forwarded_for: str) -> None:
        """CONNECT ``authority`` as ``leg``; the answer arrives at the leg. Raises
        ``TunnelUnavailable`` when no new stream fits."""
        if not self.usable:
            raise TunnelUnavailable("the tunnel takes no new streams")
        assert isinstance(self.mux, HboneClient)
        stream_id = self.mux.open_stream(authority, forwarded_for=forwarded_for if forwarded_for != "-" else None)
        self.legs[stream_id] = leg
        leg.attach(self, stream_id, incoming=False)
        self.pump()

    def _check(self, negotiated: Negotiated) -> tuple[str, str] | None:
        problem = super()._check(negotiated)
        if problem is not None:
            return problem
        patterns = self.owner.spec.server_identity
        if patterns is None:
            return None  # OpenSSL verified the host name during the handshake
        why = refusal(negotiated.peer, patterns, "server_identity")
        return ("denied", why) if why is not None else None

    def _opened(self) -> None:
        if not self.ready.done():
            self.ready.set_result(None)
        if self.owner.sessions.lifetime > 0:
            self.leg.after_read = self._keep_session

    def _handshake_failed(self, reason: str, text: str) -> None:
        if not self.ready.done():
            self.ready.set_exception(TunnelError(f"tunnel handshake failed ({reason}): {text}"))

    def _gone(self) -> None:
        if not self.ready.done():
            self.ready.set_exception(TunnelError("the tunnel closed during its handshake"))
        self.owner.tunnel_gone(self)

    def _on_event(self, event: ev.Event) -> None:
        if self.entry is None:
            return
        if isinstance(event, ev.PeerSettingsChanged):
            self.owner.pool.peer_settings(self.entry, event.max_concurrent_streams)
        elif isinstance(event, ev.ConnectionTerminated) and not event.local:
            self.owner.retire(self)  # the peer's GOAWAY: no new streams here

    def _stream_closed(self, stream_id: int) -> None:
        self.owner.release(self)

    def _keep_session(self, leg: TLSLeg) -> None:
        if self.owner.sessions.keep(leg.tls):
            leg.after_read = None


class TunnelPool:
    """The pooled tunnels to ``spec.upstream``, each verified with ``spec``'s ``server_identity``
    and SNI when it is made; ``spec.tunnel`` tunes the pool. It counts its tunnels on ``gauge``
    (which pools of one listener share) and its handshakes on ``metrics``."""

    def __init__(self, spec: Outbound, store: TLSStore, limits: Limits, metrics: ListenerMetrics, gauge: Gauge) -> None:
        tunnel = spec.tunnel
        assert tunnel is not None
        self.spec = spec
        self.store = store
        self.limits = limits
        self.metrics = metrics
        self._gauge = gauge
        self._counted = 0  # what this pool added to the gauge
        self.sessions = SessionCache(store.tls.session_lifetime if store.tls.session_resumption else 0.0)
        self.pool: Pool[ClientTunnel] = Pool(
            PoolSettings(max_streams=tunnel.max_streams, idle_timeout=tunnel.idle_timeout), clock=time.monotonic
        )
        self.checkout = Checkout(self.pool, close=lambda t: t.close())
        self._server_hostname = server_hostname(spec)
        patterns = spec.server_identity
        self.key = PoolKey(str(spec.upstream), spec.sni, tuple(p.text for p in patterns) if patterns else None)
        self._expiry: asyncio.TimerHandle | None = None
        self._retired = False
        self.closed = False
        store.want_h2()
        store.subscribers.append(self._material_changed)

    async def open(self, leg: StreamLeg, authority: str, client: str) -> None:
        """``CONNECT authority`` as ``leg`` for ``client`` (the app's ``ip:port``) on a pooled
        tunnel; returns once the peer answered 200. Raises ``TunnelError``, ``PoolRefused`` or
        ``StreamRefusedError`` (all ``ConnectionError``s) naming why not."""
        for _ in range(OPEN_ATTEMPTS):
            entry = await self.checkout.acquire(self.key, self._dial)
            tunnel = entry.conn
            if tunnel.entry is None:  # newly pooled
                tunnel.entry = entry
                self._changed()
            try:
                tunnel.open_stream(leg, authority, client)
            except TunnelUnavailable:
                self.release(tunnel)
                self.retire(tunnel)
                continue
            try:
                await leg.answer()
            except asyncio.CancelledError:
                if leg.stream_id is not None and not leg.lost:
                    tunnel.reset(leg.stream_id, ErrorCodes.CANCEL)  # the app connection went first
                raise
            return
        raise TunnelError(f"no tunnel to {self.spec.upstream} took the stream")

    # -- the pool ---------------------------------------------------------------------------------

    def release(self, tunnel: ClientTunnel) -> None:
        """A stream of ``tunnel`` ended."""
        if tunnel.entry is not None and self.pool.release(tunnel.entry):
            tunnel.close()  # retired, and that was its last stream
        self._changed()

    def retire(self, tunnel: ClientTunnel) -> None:
        if tunnel.entry is not None and self.pool.retire(tunnel.entry):
            tunnel.close()
        self._changed()

    def tunnel_gone(self, tunnel: ClientTunnel) -> None:
        if tunnel.entry is not None:
            self.pool.lost(tunnel.entry)
        self._changed()

    def retire_all(self) -> None:
        """This pool will be asked for no more streams (transparent mode let it go): idle tunnels
        close now, the others with their last stream, and the pool closes once it is empty."""
        self._retired = True
        for entry in self.pool.retire_all():
            entry.conn.close()
        self._changed()

    def close(self) -> None:
        """Shutting down: close every pooled tunnel (their streams are gone by now)."""
        self.closed = True
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        for entry in self.pool.clear():
            entry.conn.close()
        self._count(0)
        if self._material_changed in self.store.subscribers:
            self.store.subscribers.remove(self._material_changed)

    async def _dial(self) -> tuple[ClientTunnel, int]:
        """A new tunnel: TCP within ``connect_timeout``, then TLS with ALPN h2 and the identity
        check within ``handshake_timeout``."""
        material = self.store.material
        assert material.h2 is not None, "the store builds h2 contexts for a tunnel"
        ctx = material.h2.client(verify_hostname=self.spec.server_identity is None)
        engine = TLSEngine(
            ctx,
            server_side=False,
            server_hostname=self._server_hostname,
            session=self.sessions.get(ctx),
            vet=material.vet,
        )
        tunnel = ClientTunnel(self, engine)
        upstream = self.spec.upstream
        loop = asyncio.get_running_loop()
        try:
            try:
                async with asyncio.timeout(self.limits.connect_timeout):
                    await loop.create_connection(lambda: tunnel.leg, upstream.host, upstream.port)
            except TimeoutError:
                raise TunnelError(f"connect to {upstream} timed out") from None
            except OSError as exc:
                raise TunnelError(f"connect to {upstream}: {exc.strerror or exc}") from None
            await tunnel.ready
        except BaseException:
            tunnel.abort()  # given up (failed, timed out, or the app connection went): nothing left behind
            if not tunnel.ready.done():
                tunnel.ready.cancel()
            raise
        assert isinstance(tunnel.mux, HboneClient)
        return tunnel, tunnel.mux.peer_max_streams

    def _material_changed(self, material: Material) -> None:
        for entry in self.pool.material_changed(material.generation):
            entry.conn.close()
        self._changed()

    def _changed(self) -> None:
        """Refresh the pool gauge; make sure an idle tunnel will be looked at when it may expire;
        close a retired pool that has nothing left."""
        if self.closed:
            return
        if self._retired and self.pool.empty():
            self.close()
            return
        self._count(self.pool.connections())
        if self._expiry is None:
            at = self.pool.next_expiry()
            if at is not None:
                delay = max(0.0, at - time.monotonic()) + 0.05
                self._expiry = asyncio.get_running_loop().call_later(delay, self._expire)

    def _count(self, connections: int) -> None:
        self._gauge.inc(connections - self._counted)
        self._counted = connections

    def _expire(self) -> None:
        self._expiry = None
        for entry in self.pool.expire():
            entry.conn.close()
        self._changed()


class TunnelPolicy:
    """Plaintext in from the local app, one CONNECT stream per connection out on ``tunnels``."""

    direction = Direction.OUTBOUND
    tls_side = None  # the TLS is the tunnel's
    stream_side = Side.UP
    forwarding = None
    sessions = None  # the tunnels keep theirs
    needs_spki = False  # the peer's identity is its tunnel's, pinned there when server_identity pins

    def __init__(self, name: str, tunnels: TunnelPool, target: Address, authority: str) -> None:
        self.name = name
        self.tunnels = tunnels
        self.streams = self
        self.authority = authority  # what CONNECT asks for
        self._target = target

    # -- the relay's policy -----------------------------------------------------------------------

    def target(self) -> Address:
        return self._target

    def authorize(self, peer: PeerIdentity) -> str | None:
        return None  # never asked: the tunnel checked server_identity when it was made

    def tls_engine(self) -> TLSEngine:
        raise NotImplementedError("a stream's TLS is its tunnel's")

    # -- StreamSource -----------------------------------------------------------------------------

    def leg(self, owner: LegOwner, side: Side) -> Leg:
        return StreamLeg(owner, side)

    async def open(self, leg: Leg, target: Address, client: str) -> None:
        assert isinstance(leg, StreamLeg)
        await self.tunnels.open(leg, self.authority, client)


class TunnelListener(Listener):
    """An outbound listener whose connections go through pooled tunnels; it closes them at the end."""

    policy: TunnelPolicy

    async def wait_closed(self) -> None:
        await super().wait_closed()
        self.policy.tunnels.close()


def tunnel_listener(
    spec: Outbound, store: TLSStore, limits: Limits, metrics: ListenerMetrics, gauge: Gauge
) -> TunnelListener:
    """``outbound[]`` with ``tunnel``: every connection CONNECTs ``<upstream host>:<target_port>``."""
    assert spec.tunnel is not None and spec.tunnel.target_port is not None
    authority = format_authority(spec.upstream.host, spec.tunnel.target_port)
    policy = TunnelPolicy(spec.name, TunnelPool(spec, store, limits, metrics, gauge), spec.upstream, authority)
    return TunnelListener(policy, spec.listen, limits, metrics)
