"""Telling the app who is calling (contract section 9): from a listener's ``proxy_protocol`` and
``client_cert_header``, what each of its connections writes to the app before the caller's bytes
(a PROXY protocol v2 header) and the rewriter those bytes pass (``x-forwarded-client-cert``).

Both are made once per connection by ``Forwarding.introduce``, after the peer is authorized and
before the app is dialled, from what the handshake settled. A header that cannot be built raises
``ProxyHeaderError``: the connection is refused and the app is never dialled. Nothing here does
I/O; the driver writes the preamble and makes the app's leg a ``RewritingLeg`` when there is a
rewriter, so connections without either setting keep the plain per-chunk path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from . import xfcc
from .errors import HTTPRefusal, Refusal
from .http1 import XfccRewriter
from .identity import from_certificate
from .proxy_protocol import Facts, Mode, build_header
from .record import Outcome
from .tls import Material, TLSStore
from .tlsio import Negotiated, TLSEngine, keep_sni


@dataclass(frozen=True, slots=True)
class Introduction:
    """What one connection's app is told about its caller."""

    preamble: bytes  # written to the app before any byte of the caller's (b"": nothing)
    rewriter: XfccRewriter | None  # what the caller's bytes pass on their way (None: they pass as they are)


class Keys(Protocol):
    """Where the two settings are written: an ``Inbound`` listener or a ``TransparentPort``."""

    @property
    def proxy_protocol(self) -> Mode | None: ...

    @property
    def client_cert_header(self) -> str | None: ...


class Forwarding:
    """One listener's (or one transparent inbound port's) two settings."""

    __slots__ = ("_own", "proxy_protocol", "store", "xfcc_header")

    def __init__(self, proxy_protocol: Mode | None, client_cert_header: str | None, store: TLSStore) -> None:
        self.proxy_protocol = proxy_protocol
        self.xfcc_header = client_cert_header == "xfcc"
        self.store = store
        self._own: tuple[Material | None, str | None] = (None, None)
        if proxy_protocol in (Mode.TLS, Mode.TLS_FULL):
            _keep_sni(store)  # PP2_TYPE_AUTHORITY: only then does a handshake keep the server name

    @classmethod
    def of(cls, spec: Keys, store: TLSStore) -> Forwarding | None:
        """The forwarding ``spec`` asks for; None when it asks for none."""
        if spec.proxy_protocol is None and spec.client_cert_header is None:
            return None
        return cls(spec.proxy_protocol, spec.client_cert_header, store)

    def introduce(
        self,
        source: tuple[str, int],
        destination: tuple[str, int],
        tls: TLSEngine | None = None,
        negotiated: Negotiated | None = None,
    ) -> Introduction:
        """What the app is told of a caller at ``source`` that connected to ``destination``, with
        the completed handshake ``tls`` settled as ``negotiated`` (both None for plain TCP: then
        a ``conn`` header, and no x-forwarded-client-cert at all). Raises ``ProxyHeaderError``."""
        der = tls.peer_certificate() if tls is not None and negotiated is not None else None
        preamble = b""
        if self.proxy_protocol is not None:
            if tls is None or negotiated is None or der is None or negotiated.version is None:
                facts = Facts(source, destination)
            else:
                facts = Facts.of_peer(
                    source,
                    destination,
                    tls_version=negotiated.version,
                    sni=tls.sni,
                    peer_cert_der=der,
                    identity=negotiated.peer,
                )
            preamble = build_header(self.proxy_protocol, facts)
        rewriter = None
        if self.xfcc_header:
            rewriter = XfccRewriter(xfcc.header_line(self._own_uri(), der) if der is not None else None)
        return Introduction(preamble, rewriter)

    def _own_uri(self) -> str | None:
        """``By``: the first URI SAN of this sidecar's certificate, read once per material."""
        material = self.store.material
        if self._own[0] is not material:
            uris = from_certificate(material.chain[0]).uris
            self._own = (material, uris[0] if uris else None)
        return self._own[1]


def outcome_of(refusal: Refusal) -> Outcome:
    """A refusal's outcome: ``limit`` for a size (a 431, a PROXY header too large), else ``denied``."""
    if isinstance(refusal, HTTPRefusal):
        return Outcome.LIMIT if refusal.status == 431 else Outcome.DENIED
    return Outcome.LIMIT  # ProxyHeaderError: a field past the protocol's 16-bit lengths


def describe(refusal: Refusal) -> str:
    """The access record's ``reason`` for a refusal: its label first, then what was wrong."""
    status = f" ({refusal.status})" if isinstance(refusal, HTTPRefusal) else ""
    return f"{refusal.reason}{status}: {refusal.detail}"


def _keep_sni(store: TLSStore) -> None:
    if _sni_kept not in store.subscribers:
        store.subscribers.append(_sni_kept)  # each new material's server context, from now on
        if store.loaded:
            _sni_kept(store.material)


def _sni_kept(material: Material) -> None:
    # every server context of the material: the listener's own (``server_ctx_for``) is among them
    for ctx in (material.server_ctx, *material.listener_server_ctxs.values()):
        keep_sni(ctx)
