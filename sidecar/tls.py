"""The owner of this sidecar's TLS material: identity chain, key, CA bundle and CRL.

Material is read and validated off the event loop, built into ready SSL contexts, and published
with one attribute store, so a handshake uses all-old or all-new material, never a mix. Listeners
ask ``store.material`` once per accepted connection. A failed load keeps the old material.
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

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from .config import TLSFiles
from .errors import CertificateError
from .identity import from_certificate
from .logs import event
from .pinning import pin_of_der
from .tickets import listener_keys, set_ticket_keys

log = logging.getLogger("sidecar.tls")
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


@dataclass(frozen=True)
class Material:
    """One consistent generation of TLS material with contexts ready for handshakes."""

    server_ctx: ssl.SSLContext
    listener_server_ctxs: Mapping[str, ssl.SSLContext] = field(repr=False, compare=False)
    client_ctx_hostname: ssl.SSLContext  # verifies the upstream's DNS name
    client_ctx_identity: ssl.SSLContext  # leaves identity to ``server_identity`` patterns
    chain: tuple[x509.Certificate, ...]
    cas: tuple[x509.Certificate, ...]
    identity: CertInfo
    ca_infos: tuple[CertInfo, ...]
    loaded_at: float
    generation: int
    # The files' bytes as read, by path: how a supervisor hands the very same generation to its
    # workers. Holds the private key: never logged, never in a repr.
    file_bytes: Mapping[Path, bytes] = field(repr=False, compare=False, default_factory=dict)

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


class TLSStore:
    """Holds the current ``Material``; ``reload`` swaps it only when the new files are good."""

    def __init__(
        self,
        files: TLSFiles,
        *,
        on_reload: Callable[[bool, str | None], None] | None = None,
        before_publish: Callable[[Material], Awaitable[object]] | None = None,
    ) -> None:
        self.files = files
        self._before_publish = before_publish  # a supervisor hands new material to its workers first
        self._material: Material | None = None
        self._on_reload = on_reload
        self._lock = asyncio.Lock()
        self.reloads_ok = 0
        self.reloads_error = 0
        self.last_error: str | None = None
        self.subscribers: list[Callable[[Material], None]] = []

    @property
    def material(self) -> Material:
        if self._material is None:
            raise RuntimeError("TLS material not loaded yet")
        return self._material

    @property
    def loaded(self) -> bool:
        return self._material is not None

    async def load(self, file_bytes: Mapping[Path, bytes] | None = None, ticket_keys: bytes | None = None) -> Material:
        """First load: like ``reload`` but a failure is fatal to the caller."""
        material = await asyncio.to_thread(load_material, self.files, 1, file_bytes=file_bytes, ticket_keys=ticket_keys)
        self._publish(material)
        return material

    async def reload(
        self, file_bytes: Mapping[Path, bytes] | None = None, ticket_keys: bytes | None = None
    ) -> Material:
        """Re-read every file (or take their bytes from ``file_bytes``); publish on success, keep the
        old material and raise on failure."""
        async with self._lock:
            generation = self._material.generation + 1 if self._material else 1
            try:
                material = await asyncio.to_thread(
                    load_material, self.files, generation, file_bytes=file_bytes, ticket_keys=ticket_keys
                )
            except CertificateError as exc:
                self.reloads_error += 1
                self.last_error = str(exc)
                if self._on_reload:
                    self._on_reload(False, str(exc))
                raise
            if self._before_publish is not None:
                await self._before_publish(material)
            self.reloads_ok += 1
            self.last_error = None
            self._publish(material)
            if self._on_reload:
                self._on_reload(True, None)
            return material

    def _publish(self, material: Material) -> None:
        self._material = material
        for subscriber in self.subscribers:
            subscriber(material)


def load_material(
    files: TLSFiles,
    generation: int = 1,
    *,
    now: datetime | None = None,
    file_bytes: Mapping[Path, bytes] | None = None,
    ticket_keys: bytes | None = None,
    listeners: Sequence[str] = (),
) -> Material:
    """Read, validate (key matches, leaf valid now, chain leads to the bundle) and build contexts
    (blocking: run it in a thread).

    ``file_bytes``: the files' bytes already read (by the supervisor), instead of reading the disk.
    ``ticket_keys``: session-ticket keys shared by every worker of a supervisor (``tickets.py``).
    ``listeners``: inbound listener names, each given a server context of its own
    (``Material.server_ctx_for``).
    """
    read = _Reader(file_bytes)
    chain = _read_certs(read(files.cert, "certificate"), files.cert, "certificate")
    key = _read_key(read(files.key, "key"), files.key)
    leaf = chain[0]
    if _public_bytes(key) != _public_bytes(leaf):
        raise CertificateError(f"key file '{files.key}' does not match certificate '{files.cert}'")
    _check_validity(leaf, files.cert, now or datetime.now(UTC))
    cas = _read_certs(read(files.ca, "CA bundle"), files.ca, "CA bundle")
    crl_pem = _read_crls(read(files.crl, "CRL"), files.crl) if files.crl is not None else None
    problem = chain_problem(chain, cas)
    if problem:
        raise CertificateError(f"certificate '{files.cert}': {problem} '{files.ca}'")

    cert_pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    ca_pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in cas)
    with _private_file(cert_pem + key_pem) as pair_path, _private_file(crl_pem or b"") as crl_path:
        crl = crl_path if crl_pem else None
        server = _server_context(pair_path, ca_pem, crl, files, ticket_keys)
        by_listener = {
            name: _server_context(
                pair_path, ca_pem, crl, files, listener_keys(ticket_keys, name) if ticket_keys is not None else None
            )
            for name in listeners
        }
        client_h = _context(ssl.PROTOCOL_TLS_CLIENT, pair_path, ca_pem, crl, files)
        client_i = _context(ssl.PROTOCOL_TLS_CLIENT, pair_path, ca_pem, crl, files)
        client_i.check_hostname = False  # identity is checked against server_identity after the handshake
    return Material(
        server_ctx=server,
        listener_server_ctxs=by_listener,
        client_ctx_hostname=client_h,
        client_ctx_identity=client_i,
        chain=tuple(chain),
        cas=tuple(cas),
        identity=CertInfo.of(leaf),
        ca_infos=tuple(CertInfo.of(c) for c in cas),
        loaded_at=time.time(),
        generation=generation,
        file_bytes=read.seen,
    )


def _server_context(
    pair: str, ca_pem: bytes, crl: str | None, files: TLSFiles, ticket_keys: bytes | None
) -> ssl.SSLContext:
    server = _context(ssl.PROTOCOL_TLS_SERVER, pair, ca_pem, crl, files)
    server.verify_mode = ssl.CERT_REQUIRED
    # TLS 1.3 tickets are sealed with keys random to this context: a reload (new contexts)
    # makes every ticket issued before it useless, so a resumed peer always resumes trust
    # material that is still current.
    server.num_tickets = 1 if files.session_resumption else 0
    if ticket_keys is not None and files.session_resumption and not set_ticket_keys(server, ticket_keys):
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


def _context(protocol: ssl._SSLMethod, pair: str, ca_pem: bytes, crl: str | None, files: TLSFiles) -> ssl.SSLContext:
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
        raise CertificateError(f"loading '{files.cert}', '{files.key}', '{files.ca}' into TLS: {exc}") from None
    return ctx


class _Reader:
    """Reads each file once, from ``given`` bytes when handed over, and remembers what it read."""

    def __init__(self, given: Mapping[Path, bytes] | None) -> None:
        self.given = given
        self.seen: dict[Path, bytes] = {}

    def __call__(self, path: Path, what: str) -> bytes:
        if self.given is not None:
            if path not in self.given:
                raise CertificateError(f"{what} file '{path}': not among the files handed over")
            data = self.given[path]
        else:
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise CertificateError(f"reading {what} file '{path}': {exc.strerror or exc}") from None
        self.seen[path] = data
        return data


def _read_certs(data: bytes, path: Path, what: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise CertificateError(f"{what} file '{path}': not a valid PEM certificate ({exc})") from None
    if not certs:
        raise CertificateError(f"{what} file '{path}': holds no certificate")
    return certs


def _read_key(data: bytes, path: Path) -> PrivateKeyTypes:
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        # never echo the file's content: only what kind of problem it is
        reason = "encrypted keys are not supported" if isinstance(exc, TypeError) else "not a valid PEM private key"
        raise CertificateError(f"key file '{path}': {reason}") from None


def _read_crls(data: bytes, path: Path) -> bytes:
    blocks = [_CRL_BEGIN + part for part in data.split(_CRL_BEGIN)[1:]]
    if not blocks:
        raise CertificateError(f"CRL file '{path}': holds no PEM CRL")
    for block in blocks:
        try:
            x509.load_pem_x509_crl(block)
        except ValueError as exc:
            raise CertificateError(f"CRL file '{path}': not a valid PEM CRL ({exc})") from None
    return b"".join(blocks)


def _check_validity(cert: x509.Certificate, path: Path, now: datetime) -> None:
    if now < cert.not_valid_before_utc:
        raise CertificateError(f"certificate '{path}' is not valid before {cert.not_valid_before_utc.isoformat()}")
    if now > cert.not_valid_after_utc:
        raise CertificateError(f"certificate '{path}' expired at {cert.not_valid_after_utc.isoformat()}")


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
