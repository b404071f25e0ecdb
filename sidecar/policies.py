"""What each kind of listener does with a connection: the policies the relay asks.

Inbound: we terminate TLS on the connecting side (client certificate required), check ``allow``,
then dial ``forward``, telling the app who is calling if asked (``forwarding``). Outbound: we dial
``upstream`` first, originate TLS (offering the newest session from that upstream), check
``server_identity`` (or, without it, OpenSSL checks the host name), then let the app's bytes
through. Both hand their TLS engine the material's trust-domain check (``Material.vet``: Workload
API material only), which the relay enforces before ``authorize``. A policy only decides; the
driver does the I/O.
"""

from __future__ import annotations

from collections.abc import Sequence

from .config import Address, Inbound, Outbound, is_ip
from .forwarding import Forwarding
from .identity import Pattern, PeerIdentity, Verdict, decide, needs_spki
from .record import Direction
from .relay import Side
from .sessions import SessionCache
from .tls import TLSStore
from .tlsio import TLSEngine


def refusal(peer: PeerIdentity, patterns: Sequence[Pattern], where: str) -> str | None:
    """Why ``patterns`` (the listener's ``where`` list) refuse ``peer``: the verdict first
    (``not_allowed`` or ``invalid_spiffe_id``), then the peer and the list it is not in."""
    verdict = decide(peer, patterns)
    if verdict is Verdict.ALLOWED:
        return None
    listed = ", ".join(p.text for p in patterns)
    if verdict is Verdict.INVALID_SPIFFE_ID:
        return f"{verdict}: {', '.join(peer.invalid_spiffe_ids)} is not a valid SPIFFE ID; {where} [{listed}]"
    return f"{verdict}: identity {peer.describe()} is not in {where} [{listed}]"


def server_hostname(spec: Outbound) -> str | None:
    """The SNI an outbound listener sends (and verifies without ``server_identity``): ``sni``, or
    the upstream's host unless it is an IP address."""
    return spec.sni or (None if is_ip(spec.upstream.host) else spec.upstream.host)


class InboundPolicy:
    """mTLS in from a peer, plaintext out to ``forward``."""

    direction = Direction.INBOUND
    tls_side = Side.DOWN
    stream_side = None
    streams = None
    sessions = None  # we are the server: tickets are issued by OpenSSL

    def __init__(self, spec: Inbound, store: TLSStore) -> None:
        self.spec = spec
        self.name = spec.name
        self.store = store
        self.needs_spki = needs_spki(spec.allow)
        self.forwarding = Forwarding.of(spec, store)  # proxy_protocol, client_cert_header

    def tls_engine(self) -> TLSEngine:
        # this listener's own context: its sessions are never resumed on another listener
        material = self.store.material
        return TLSEngine(material.server_ctx_for(self.name), server_side=True, vet=material.vet)

    def target(self) -> Address:
        return self.spec.forward

    def authorize(self, peer: PeerIdentity) -> str | None:
        return refusal(peer, self.spec.allow, "allow")


class OutboundPolicy:
    """Plaintext in from the local app, mTLS out to ``upstream``."""

    direction = Direction.OUTBOUND
    tls_side = Side.UP
    forwarding = None
    stream_side = None
    streams = None

    def __init__(self, spec: Outbound, store: TLSStore) -> None:
        self.spec = spec
        self.name = spec.name
        self.store = store
        self.sessions = SessionCache(store.tls.session_lifetime if store.tls.session_resumption else 0.0)
        self.needs_spki = needs_spki(spec.server_identity or ())
        self._server_hostname = server_hostname(spec)

    def tls_engine(self) -> TLSEngine:
        material = self.store.material
        ctx = material.client_ctx(verify_hostname=self.spec.server_identity is None)
        session = self.sessions.get(ctx)
        return TLSEngine(
            ctx, server_side=False, server_hostname=self._server_hostname, session=session, vet=material.vet
        )

    def target(self) -> Address:
        return self.spec.upstream

    def authorize(self, peer: PeerIdentity) -> str | None:
        patterns = self.spec.server_identity
        if patterns is None:
            return None  # OpenSSL verified the host name during the handshake
        return refusal(peer, patterns, "server_identity")
