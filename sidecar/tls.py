"""The owner of this sidecar's TLS material: identity chain, key, trust bundles and CRL.

Whatever the source (files on disk, the SPIFFE Workload API), material arrives as a ``PemBundle``
of bytes; it is validated off the event loop, built into ready SSL contexts, and published with
one attribute store, so a handshake uses all-old or all-new material, never a mix. Listeners ask
``store.material`` once per accepted connection. A failed load keeps the old material.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import NoReturn

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from .config import TLSFiles, TLSSettings
from .errors import CertificateError, SidecarError, WorkerError
from .identity import PeerIdentity, from_certificate
from .logs import event
from .pinning import pin_of_der
from .tickets import listener_keys, set_ticket_keys
from .tlsio import Vet

log = logging.getLogger("sidecar.tls")
H2_TICKETS = "\0hbone"  # the name the HBONE tunnels' ticket keys derive from (no listener name has a NUL)
_CRL_BEGIN = b"-----BEGIN X509 CRL-----"


@dataclass(frozen=True)
class CertInfo:
    """What ``/certs``, ``sidecar check`` and the logs say about one certificate."""

    subject: str
    spiffe_ids: tuple[str, ...]
    dns_names: tuple[str, ...]
    serial: str
    not_before: datetime
    not_after: datetime
    sha256: str
    spki_sha256: str  # the public key's pin: ``spki-sha256:`` + this matches this certificate's key

    @classmethod
    def of(cls, cert: x509.Certificate) -> CertInfo:
        ident = from_certificate(cert)
        return cls(
            subject=cert.subject.rfc4514_string(),
            spiffe_ids=ident.spiffe_ids,
            dns_names=ident.dns_names,
            serial=format(cert.serial_number, "x"),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            sha256=cert.fingerprint(hashes.SHA256()).hex(),
            spki_sha256=pin_of_der(cert.public_bytes(serialization.Encoding.DER)),
        )

    def summary(self) -> str:
        who = self.spiffe_ids[0] if self.spiffe_ids else (self.dns_names[0] if self.dns_names else self.subject)
        return f"{who} (serial {self.serial}, valid until {self.not_after.isoformat()})"


# The pieces of a bundle, as error messages name them.
CERT, KEY, CA, CRL = "certificate", "key", "CA bundle", "CRL"
_SPIFFE_PIECES = {CERT: "X.509-SVID", KEY: "X.509-SVID key", CA: "trust bundle", CRL: "CRL"}


@dataclass(frozen=True)
class Origin:
    """Where a bundle came from, and how its error messages name each piece.

    ``label(piece)`` opens a message about that piece ("key file 'k.pem'"), ``ref(piece)`` names it
    inside one ("'k.pem'"), so messages about files read as they always have."""

    source: str  # "files" or "workload_api": what ``/certs`` says
    labels: Mapping[str, str]
    refs: Mapping[str, str]
    address: str | None = None  # the Workload API socket, ``unix:///...``
    paths: Mapping[str, Path] = field(default_factory=dict)  # files: each piece's file

    @classmethod
    def files(cls, files: TLSFiles) -> Origin:
        paths = {w: p for w, p in ((CERT, files.cert), (KEY, files.key), (CA, files.ca), (CRL, files.crl)) if p}
        return cls(
            source="files",
            labels={what: f"{what} file '{path}'" for what, path in paths.items()},
            refs={what: f"'{path}'" for what, path in paths.items()},
            paths=paths,
        )

    @classmethod
    def workload_api(cls, address: str, spiffe_id: str, trust_domains: Sequence[str]) -> Origin:
        svid = f"'{spiffe_id}' from {address}"
        return cls(
            source="workload_api",
            labels={what: f"{name} {svid}" for what, name in _SPIFFE_PIECES.items()},
            refs={CERT: svid, KEY: svid, CA: f"of {', '.join(trust_domains)} from {address}", CRL: address},
            address=address,
        )

    def label(self, piece: str) -> str:
        return self.labels[piece]

    def ref(self, piece: str) -> str:
        return self.refs[piece]


@dataclass(frozen=True)
class TrustBundle:
    """The CA certificates (PEM) trusted for one trust domain; ``None`` for a CA file's bundle."""

    trust_domain: str | None
    pem: bytes


@dataclass(frozen=True)
class PemBundle:
    """One generation of TLS material as bytes, whatever its source: what ``load_material``
    builds from, and how a supervisor hands the very same generation to its workers.

    ``chain``: PEM, leaf first. ``key``: PEM (never logged, never in a repr). ``trust``: the CA
    bundles; a peer is verified against their union. ``crl``: PEM CRLs, or None."""

    chain: bytes
    key: bytes = field(repr=False)
    trust: tuple[TrustBundle, ...]
    origin: Origin
    crl: bytes | None = None

    @property
    def trust_domains(self) -> tuple[str, ...]:
        return tuple(b.trust_domain for b in self.trust if b.trust_domain is not None)


def read_files(files: TLSFiles) -> PemBundle:
    """The files' bytes as a bundle (blocking: reads the disk)."""
    read = _Reader()
    return PemBundle(
        chain=read(files.cert, CERT),
        key=read(files.key, KEY),
        trust=(TrustBundle(None, read(files.ca, CA)),),
        crl=read(files.crl, CRL) if files.crl is not None else None,
        origin=Origin.files(files),
    )


@dataclass(frozen=True)
class Contexts:
    """A server and the two client contexts of one material. ``Material.h2``'s offer and accept
    ALPN ``h2`` and serve HBONE tunnels alone, so that no plain TLS listener or upstream ever
    negotiates HTTP/2 on the app's behalf."""

    server: ssl.SSLContext
    client_hostname: ssl.SSLContext
    client_identity: ssl.SSLContext

    def client(self, *, verify_hostname: bool) -> ssl.SSLContext:
        return self.client_hostname if verify_hostname else self.client_identity


@dataclass(frozen=True)
class Material:
    """One consistent generation of TLS material with contexts ready for handshakes."""

    server_ctx: ssl.SSLContext
    listener_server_ctxs: Mapping[str, ssl.SSLContext] = field(repr=False, compare=False)
    client_ctx_hostname: ssl.SSLContext  # verifies the upstream's DNS name
    client_ctx_identity: ssl.SSLContext  # leaves identity to ``server_identity`` patterns
    chain: tuple[x509.Certificate, ...]
    cas: tuple[x509.Certificate, ...]  # every trust bundle's CAs: peers are verified against the union
    identity: CertInfo
    ca_infos: tuple[CertInfo, ...]
    loaded_at: float
    generation: int
    # The bytes it was built from: how a supervisor hands the very same generation to its
    # workers. Holds the private key: never logged, never in a repr.
    bundle: PemBundle = field(repr=False, compare=False)
    # Which CAs vouch for which trust domain (Workload API only; None for files).
    trust: TrustDomains | None = field(default=None, repr=False, compare=False)
    # The ALPN-h2 contexts of HBONE tunnels, built when the store was asked to (``want_h2``).
    h2: Contexts | None = field(repr=False, compare=False, default=None)

    def server_ctx_for(self, listener: str) -> ssl.SSLContext:
        """The server context of inbound ``listener`` (named when the material was loaded).

        Each has session-ticket keys of its own (derived from the workers' shared keys and the
        listener's name, or random to the context), so a session made on one listener is never
        resumed on another: a peer there makes a full handshake, and its certificate is checked
        anew. The relay still re-checks ``allow`` on a resumed session (belt and braces).
        """
        return self.listener_server_ctxs[listener]

    def client_ctx(self, *, verify_hostname: bool) -> ssl.SSLContext:
        return self.client_ctx_hostname if verify_hostname else self.client_ctx_identity

    @property
    def source(self) -> str:
        return self.bundle.origin.source

    @property
    def trust_domains(self) -> tuple[str, ...]:
        return self.bundle.trust_domains

    @property
    def vet(self) -> Vet | None:
        """What a TLS engine asks after each handshake (None: nothing to ask, material from files)."""
        return self.trust.problem if self.trust is not None else None

    def peer_trust_problem(
        self, peer: PeerIdentity, verified_chain: Sequence[bytes] | None, *, resumed: bool = False
    ) -> str | None:
        """Why a peer that passed OpenSSL's verification against the union of bundles must still be
        refused (``TrustDomains.problem``); None when it is fine, and always for material from files."""
        return self.trust.problem(peer, verified_chain, resumed=resumed) if self.trust is not None else None


class TrustDomains:
    """The CAs of each trust domain, for the check made after every handshake: a bundle vouches
    only for its own trust domain, so a federated CA cannot vouch for a peer claiming ours,
    whereas OpenSSL, which verifies against the union of the bundles, would.

    A peer must carry exactly one SPIFFE ID, its trust domain must have a bundle, and the chain
    OpenSSL verified must hold a CA of that bundle. A resumed session has no chain (OpenSSL
    verifies nothing then): it was made under this very material (a reload voids every ticket
    and cached session), and tickets go to, and sessions are kept for, checked peers only; its
    identity is checked again. A full handshake whose chain cannot be read is refused when
    there are several trust domains (with one, the union is that bundle).
    """

    __slots__ = ("_cas",)

    def __init__(self, authorities: Mapping[str, Sequence[x509.Certificate]]) -> None:
        self._cas = {
            td: frozenset(c.public_bytes(serialization.Encoding.DER) for c in certs)
            for td, certs in authorities.items()
        }

    def problem(self, peer: PeerIdentity, verified_chain: Sequence[bytes] | None, resumed: bool = False) -> str | None:
        ids = peer.spiffe_ids
        if len(ids) != 1:
            return f"the peer's certificate carries {len(ids)} SPIFFE IDs, not exactly one"
        spiffe_id = ids[0]
        trust_domain = spiffe_id.removeprefix("spiffe://").split("/", 1)[0]
        cas = self._cas.get(trust_domain)
        if cas is None:
            return f"{spiffe_id}: no trust bundle for its trust domain {trust_domain}"
        if resumed or len(self._cas) == 1:
            return None
        if verified_chain is None:
            return f"{spiffe_id}: the verified chain cannot be read, so its trust domain cannot be checked"
        if cas.isdisjoint(verified_chain):
            return f"{spiffe_id}: its chain does not lead to the bundle of its trust domain {trust_domain}"
        return None


class TLSStore:
    """Holds the current ``Material``; ``reload`` swaps it only when the new bundle is good.

    Files are re-read on every ``reload()``; a pushed source (the Workload API) hands each new
    bundle to ``accept``, and a bare ``reload()`` rebuilds from the newest bundle it took."""

    def __init__(
        self,
        tls: TLSSettings,
        *,
        on_reload: Callable[[bool, str | None], None] | None = None,
        before_publish: Callable[[Material], Awaitable[list[str]]] | None = None,
        listeners: Sequence[str] = (),
    ) -> None:
        self.tls = tls
        self.listeners = tuple(listeners)  # listeners that terminate TLS: each gets its own server context
        self._before_publish = before_publish  # a supervisor hands new material to its workers: problems
        self._material: Material | None = None
        self._on_reload = on_reload
        self._lock = asyncio.Lock()
        self.reloads_ok = 0
        self.reloads_error = 0
        self.last_error: str | None = None
        self.subscribers: list[Callable[[Material], None]] = []
        self.h2 = False  # also build ``Material.h2`` (``want_h2``)

    def want_h2(self) -> None:
        """Build ALPN-h2 contexts with every material from now on (before the first load)."""
        self.h2 = True

    @property
    def material(self) -> Material:
        if self._material is None:
            raise RuntimeError("TLS material not loaded yet")
        return self._material

    @property
    def loaded(self) -> bool:
        return self._material is not None

    async def load(self, bundle: PemBundle | None = None, ticket_keys: bytes | None = None) -> Material:
        """First load: like ``reload`` but a failure is fatal to the caller."""
        material = await asyncio.to_thread(self._build, bundle, 1, ticket_keys)
        self._publish(material)
        return material

    async def reload(self, bundle: PemBundle | None = None, ticket_keys: bytes | None = None) -> Material:
        """Build from ``bundle`` (None: re-read the files, or rebuild from the newest pushed bundle);
        publish on success, keep the old material and raise ``CertificateError`` on failure. With
        workers, ``WorkerError`` when the new material is published but not every worker serves it yet."""
        async with self._lock:
            generation = self._material.generation + 1 if self._material else 1
            try:
                material = await asyncio.to_thread(self._build, bundle, generation, ticket_keys)
            except CertificateError as exc:
                self._failed(exc)
            problems = await self._before_publish(material) if self._before_publish is not None else []
            self._publish(material)  # what the workers serve, or will once restarted
            if problems:
                self._failed(WorkerError("; ".join(problems)))
            self.reloads_ok += 1
            self.last_error = None
            if self._on_reload:
                self._on_reload(True, None)
            return material

    def _failed(self, exc: SidecarError) -> NoReturn:
        self.reloads_error += 1
        self.last_error = str(exc)
        if self._on_reload:
            self._on_reload(False, str(exc))
        raise exc

    async def accept(self, bundle: PemBundle) -> Material:
        """Take a bundle a source pushed: the first one loads, every later one reloads."""
        return await (self.reload(bundle) if self.loaded else self.load(bundle))

    def _build(self, given: PemBundle | None, generation: int, ticket_keys: bytes | None) -> Material:
        if isinstance(given, PemBundle):
            bundle = given
        elif isinstance(self.tls, TLSFiles):
            bundle = read_files(self.tls)
        elif self._material is not None:
            bundle = self._material.bundle
        else:
            raise CertificateError(f"tls.workload_api: no X.509-SVID received from {self.tls.address} yet")
        return load_material(
            bundle,
            session_resumption=self.tls.session_resumption,
            generation=generation,
            ticket_keys=ticket_keys,
            listeners=self.listeners,
            h2=self.h2,
        )

    def _publish(self, material: Material) -> None:
        self._material = material
        for subscriber in self.subscribers:
            subscriber(material)


def load_material(
    bundle: PemBundle,
    *,
    session_resumption: bool = True,
    generation: int = 1,
    now: datetime | None = None,
    ticket_keys: bytes | None = None,
    listeners: Sequence[str] = (),
    h2: bool = False,
) -> Material:
    """Validate (key matches, leaf valid now, chain leads to a trust bundle) and build contexts
    (blocking: run it in a thread).

    ``ticket_keys``: session-ticket keys shared by every worker of a supervisor (``tickets.py``).
    ``listeners``: inbound listener names, each given a server context of its own
    (``Material.server_ctx_for``). ``h2``: also build the ALPN-h2 contexts of HBONE tunnels
    (``Material.h2``), whose server has ticket keys of its own too.
    """
    o = bundle.origin
    chain = _read_certs(bundle.chain, o.label(CERT))
    key = _read_key(bundle.key, o.label(KEY))
    leaf = chain[0]
    if _public_bytes(key) != _public_bytes(leaf):
        raise CertificateError(f"{o.label(KEY)} does not match certificate {o.ref(CERT)}")
    _check_validity(leaf, o.ref(CERT), now or datetime.now(UTC))
    if not bundle.trust:
        raise CertificateError(f"{o.label(CA)}: holds no certificate")
    authorities = {b.trust_domain: tuple(_read_certs(b.pem, o.label(CA))) for b in bundle.trust}
    cas = [ca for certs in authorities.values() for ca in certs]
    crl_pem = _read_crls(bundle.crl, o.label(CRL)) if bundle.crl is not None else None
    problem = chain_problem(chain, cas)
    if problem:
        raise CertificateError(f"certificate {o.ref(CERT)}: {problem} {o.ref(CA)}")

    cert_pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    ca_pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in cas)
    loading = f"loading {o.ref(CERT)}, {o.ref(KEY)}, {o.ref(CA)} into TLS"
    with _private_file(cert_pem + key_pem) as pair_path, _private_file(crl_pem or b"") as crl_path:
        crl = crl_path if crl_pem else None

        def contexts(alpn: list[str] | None, keys: bytes | None) -> Contexts:
            server = _server_context(pair_path, ca_pem, crl, loading, session_resumption, keys)
            client_h = _context(ssl.PROTOCOL_TLS_CLIENT, pair_path, ca_pem, crl, loading)
            client_i = _context(ssl.PROTOCOL_TLS_CLIENT, pair_path, ca_pem, crl, loading)
            client_i.check_hostname = False  # identity is checked against server_identity after the handshake
            if alpn is not None:
                for ctx in (server, client_h, client_i):
                    ctx.set_alpn_protocols(alpn)
            return Contexts(server, client_h, client_i)

        def own_keys(name: str) -> bytes | None:
            return listener_keys(ticket_keys, name) if ticket_keys is not None else None

        plain = contexts(None, ticket_keys)
        with_h2 = contexts(["h2"], own_keys(H2_TICKETS)) if h2 else None
        by_listener = {
            name: _server_context(pair_path, ca_pem, crl, loading, session_resumption, own_keys(name))
            for name in listeners
        }
    return Material(
        server_ctx=plain.server,
        listener_server_ctxs=by_listener,
        client_ctx_hostname=plain.client_hostname,
        client_ctx_identity=plain.client_identity,
        chain=tuple(chain),
        cas=tuple(cas),
        identity=CertInfo.of(leaf),
        ca_infos=tuple(CertInfo.of(c) for c in cas),
        loaded_at=time.time(),
        generation=generation,
        bundle=bundle,
        trust=TrustDomains({td: cas for td, cas in authorities.items() if td is not None})
        if bundle.trust_domains
        else None,
        h2=with_h2,
    )


def _server_context(
    pair: str, ca_pem: bytes, crl: str | None, loading: str, session_resumption: bool, ticket_keys: bytes | None
) -> ssl.SSLContext:
    server = _context(ssl.PROTOCOL_TLS_SERVER, pair, ca_pem, crl, loading)
    server.verify_mode = ssl.CERT_REQUIRED
    # TLS 1.3 tickets are sealed with keys random to this context: a reload (new contexts)
    # makes every ticket issued before it useless, so a resumed peer always resumes trust
    # material that is still current.
    server.num_tickets = 1 if session_resumption else 0
    if ticket_keys is not None and session_resumption and not set_ticket_keys(server, ticket_keys):
        event(log, logging.WARNING, "cannot share session-ticket keys between workers; tickets stay per worker")
    return server


def chain_problem(chain: Sequence[x509.Certificate], cas: Sequence[x509.Certificate]) -> str | None:
    """Why ``chain`` (leaf first) does not lead to a CA of ``cas``, or None when it does."""
    current, intermediates = chain[0], list(chain[1:])
    for _ in range(len(intermediates) + 1):
        for ca in cas:
            if _issued_by(current, ca):
                return None
        nxt = next((c for c in intermediates if _issued_by(current, c)), None)
        if nxt is None:
            break
        intermediates.remove(nxt)
        current = nxt
    return f"certificate '{current.subject.rfc4514_string()}' is not issued by any CA in the bundle"


def _context(protocol: ssl._SSLMethod, pair: str, ca_pem: bytes, crl: str | None, loading: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    try:
        ctx.load_cert_chain(pair)
        ctx.load_verify_locations(cadata=ca_pem.decode("ascii"))
        if crl is not None:
            ctx.load_verify_locations(cafile=crl)
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    except (ssl.SSLError, ValueError) as exc:
        raise CertificateError(f"{loading}: {exc}") from None
    return ctx


class _Reader:
    """Reads each file once (a combined cert+key file too)."""

    def __init__(self) -> None:
        self.seen: dict[Path, bytes] = {}

    def __call__(self, path: Path, what: str) -> bytes:
        if path not in self.seen:
            try:
                self.seen[path] = path.read_bytes()
            except OSError as exc:
                raise CertificateError(f"reading {what} file '{path}': {exc.strerror or exc}") from None
        return self.seen[path]


def _read_certs(data: bytes, label: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise CertificateError(f"{label}: not a valid PEM certificate ({exc})") from None
    if not certs:
        raise CertificateError(f"{label}: holds no certificate")
    return certs


def _read_key(data: bytes, label: str) -> PrivateKeyTypes:
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        # never echo the file's content: only what kind of problem it is
        reason = "encrypted keys are not supported" if isinstance(exc, TypeError) else "not a valid PEM private key"
        raise CertificateError(f"{label}: {reason}") from None


def _read_crls(data: bytes, label: str) -> bytes:
    blocks = [_CRL_BEGIN + part for part in data.split(_CRL_BEGIN)[1:]]
    if not blocks:
        raise CertificateError(f"{label}: holds no PEM CRL")
    for block in blocks:
        try:
            x509.load_pem_x509_crl(block)
        except ValueError as exc:
            raise CertificateError(f"{label}: not a valid PEM CRL ({exc})") from None
    return b"".join(blocks)


def _check_validity(cert: x509.Certificate, ref: str, now: datetime) -> None:
    if now < cert.not_valid_before_utc:
        raise CertificateError(f"certificate {ref} is not valid before {cert.not_valid_before_utc.isoformat()}")
    if now > cert.not_valid_after_utc:
        raise CertificateError(f"certificate {ref} expired at {cert.not_valid_after_utc.isoformat()}")


def _public_bytes(obj: PrivateKeyTypes | x509.Certificate) -> bytes:
    public = obj.public_key()
    return public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


@contextlib.contextmanager
def _private_file(data: bytes) -> Iterator[str]:
    """A path OpenSSL can read ``data`` from, never visible to other users (memfd on Linux)."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("sidecar-tls", os.MFD_CLOEXEC)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="sidecar-tls-") as tmp:
        path = os.path.join(tmp, "material.pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        yield path
