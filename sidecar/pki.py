"""Development PKI: an EC P-256 CA, leaf certificates with SPIFFE IDs, CRLs, and atomic writes.

Rules of this module: everything is built in memory first (``new_ca``, ``issue``, ``make_crl``) so
tests need no disk; the ``*_dir``/``init_ca``/``load_ca`` functions are the disk layer behind
``sidecar pki``. Every file lands via ``write_atomic`` (a watching sidecar never sees half a file),
keys are never world-readable, and every failure leaving this module is a ``PKIError``.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import math
import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from . import pinning, spiffeid
from .errors import PKIError

CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca-key.pem"
CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"
DEFAULT_TRUST_DOMAIN = "mesh.local"

CLOCK_SKEW = timedelta(minutes=5)
"""Certificates start this long before "now", so a peer whose clock lags a little accepts them."""
CA_LIFETIME = timedelta(days=3650)
LEAF_EKUS = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)

# A workload name becomes a directory, a CN (at most 64 characters) and a SPIFFE path segment.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)$")


@dataclass(frozen=True)
class Issued:
    """A certificate, its private key, and the intermediates a peer needs to chain it to a root."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    chain: tuple[x509.Certificate, ...] = ()

    def cert_pem(self) -> bytes:
        """The certificate then its chain, PEM: what ``cert.pem`` holds."""
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (self.cert, *self.chain))

    def key_pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM: what ``key.pem`` holds."""
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


# --- in memory -----------------------------------------------------------------------------------


def new_ca(
    common_name: str = "sidecar dev CA",
    *,
    trust_domain: str | None = None,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    issuer: Issued | None = None,
) -> Issued:
    """A new EC P-256 CA: self-signed root, or an intermediate signed by ``issuer``.

    ``trust_domain`` is carried as the URI SAN ``spiffe://TD`` (as SPIFFE signing certificates do);
    an intermediate without one inherits its issuer's. The default validity is ten years from five
    minutes ago. An intermediate's ``chain`` is its issuer followed by the issuer's chain.
    """
    if trust_domain is None and issuer is not None:
        trust_domain = trust_domain_of(issuer)
    if trust_domain is not None:
        _check_trust_domain(trust_domain)
    start = _utc(not_before) if not_before is not None else _now() - CLOCK_SKEW
    end = _utc(not_after) if not_after is not None else start + CA_LIFETIME
    _check_validity(start, end)

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    signer_key = issuer.key if issuer is not None else key
    builder = _builder(
        subject, issuer.cert.subject if issuer is not None else subject, key, start, end, ca=True
    ).add_extension(
        _authority_key_id(issuer)
        if issuer is not None
        else x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()),
        critical=False,
    )
    if trust_domain is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]),
            critical=False,
        )
    cert = builder.sign(signer_key, hashes.SHA256())
    chain = (issuer.cert, *issuer.chain) if issuer is not None else ()
    return Issued(cert=cert, key=key, chain=chain)


def issue(
    ca: Issued,
    *,
    common_name: str | None = None,
    spiffe_ids: Sequence[str] = (),
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
    organizational_units: Sequence[str] = (),
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    hours: float = 24.0,
    key: ec.EllipticCurvePrivateKey | None = None,
    extended_key_usages: Sequence[x509.ObjectIdentifier] = LEAF_EKUS,
) -> Issued:
    """A new EC P-256 leaf signed by ``ca``, usable as both TLS server and TLS client.

    ``spiffe_ids`` become URI SANs as given (any URI, so tests can build odd identities; the CLI
    path validates first). Validity: ``not_before`` defaults to five minutes ago (clock skew),
    ``not_after`` to ``not_before + hours``. With no CN the SAN extension is marked critical (an
    empty subject requires it). The leaf's ``chain`` is every certificate of ``ca.cert, *ca.chain``
    that is not self-signed: empty under a root, the intermediates under an intermediate. ``key``:
    re-issue for an existing key (a new key is made by default). ``extended_key_usages``:
    serverAuth and clientAuth by default; tests give others (an EKU of anyExtendedKeyUsage alone).
    """
    start = _utc(not_before) if not_before is not None else _now() - CLOCK_SKEW
    if not_after is not None:
        end = _utc(not_after)
    else:
        if not math.isfinite(hours) or hours <= 0:
            raise PKIError(f"certificate lifetime must be a positive number of hours, not {hours}")
        try:
            end = start + timedelta(hours=hours)
        except OverflowError:
            raise PKIError(f"certificate lifetime of {hours} hours is too long") from None
    _check_validity(start, end)

    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in spiffe_ids]
    names += [x509.DNSName(d) for d in dns_names]
    for ip in ip_addresses:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError:
            raise PKIError(f"not an IP address: {ip!r}") from None

    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)] if common_name else []
    attributes += [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou) for ou in organizational_units]

    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = (
        _builder(x509.Name(attributes), ca.cert.subject, key, start, end, ca=False)
        .add_extension(
            x509.ExtendedKeyUsage(list(extended_key_usages)),
            critical=False,
        )
        .add_extension(_authority_key_id(ca), critical=False)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=not attributes)
    cert = builder.sign(ca.key, hashes.SHA256())
    chain = tuple(c for c in (ca.cert, *ca.chain) if not _is_self_signed(c))
    return Issued(cert=cert, key=key, chain=chain)


def _builder(
    subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey, start: datetime, end: datetime, *, ca: bool
) -> x509.CertificateBuilder:
    """What CA and leaf certificates share: names, key, a random serial, validity, basic
    constraints, key usage (a CA signs certificates and CRLs, a leaf signs handshakes) and the SKI."""
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not ca,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )


def make_crl(
    ca: Issued,
    revoked_serials: Sequence[int],
    *,
    next_update_hours: float = 24.0,
    number: int | None = None,
) -> bytes:
    """A PEM CRL signed by ``ca`` revoking ``revoked_serials``; valid from five minutes ago.

    ``number`` (the CRL number) defaults to the current time in milliseconds, so later CRLs from
    the same CA carry larger numbers.
    """
    now = _now()
    this_update = now - CLOCK_SKEW
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(this_update)
        .next_update(now + timedelta(hours=next_update_hours))
        .add_extension(
            x509.CRLNumber(number if number is not None else int(now.timestamp() * 1000)),
            critical=False,
        )
        .add_extension(_authority_key_id(ca), critical=False)
    )
    for serial in revoked_serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(this_update).build()
        )
    crl = builder.sign(ca.key, hashes.SHA256())
    return crl.public_bytes(serialization.Encoding.PEM)


def trust_domain_of(ca: Issued) -> str | None:
    """The trust domain a CA carries as its ``spiffe://TD`` URI SAN, or None."""
    try:
        san = ca.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith("spiffe://"):
            domain = uri.removeprefix("spiffe://")
            if domain and "/" not in domain:
                return domain
    return None


def validate_spiffe_id(uri: str, *, require_path: bool = True) -> str:
    """Return ``uri`` if it is a well-formed SPIFFE ID, else raise ``PKIError`` saying why.

    A workload's ID needs a path (``spiffe://TD`` alone names the trust domain itself), so
    ``require_path`` defaults to True.
    """
    why = spiffeid.problem(uri, require_path=require_path)
    if why is not None:
        raise PKIError(f"invalid SPIFFE ID {uri!r}: {why}")
    return uri


# --- on disk -------------------------------------------------------------------------------------


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` so that readers see the old file or the new one, never a mix.

    The temporary file is made in the same directory with ``mode`` from the start (O_EXCL, so
    never someone else's file, and never more permissive than ``mode`` even for an instant), then
    written, fsynced, renamed over ``path``, and the directory fsynced. On failure the temporary
    file is removed and ``PKIError`` names ``path``.
    """
    path = Path(path)
    tmp: Path | None = None
    fd = -1
    try:
        for _ in range(100):
            candidate = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
            try:
                fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
            except FileExistsError:
                continue
            tmp = candidate
            break
        else:
            raise FileExistsError(errno.EEXIST, "could not create a unique temporary file", str(path.parent))
        os.fchmod(fd, mode)  # the umask may have removed bits the caller asked for
        with os.fdopen(fd, "wb") as f:
            fd = -1  # the file object owns it now
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
    except OSError as exc:
        raise PKIError(f"writing '{path}': {_cause(exc)}") from exc
    finally:
        if fd >= 0:
            os.close(fd)
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def write_issued(issued: Issued, cert_path: Path, key_path: Path) -> None:
    """Write a key (0600) and then its certificate chain (0644), each atomically.

    Key first: a watcher that reacts to the certificate then finds the matching key already there.
    """
    write_atomic(key_path, issued.key_pem(), 0o600)
    write_atomic(cert_path, issued.cert_pem(), 0o644)


def init_ca(dir: Path, trust_domain: str = DEFAULT_TRUST_DOMAIN, *, force: bool = False) -> Issued:
    """Create a development root CA in ``dir`` as ``ca.pem`` and ``ca-key.pem`` (0600).

    Refuses, naming the file, when either file already exists unless ``force`` is set: replacing
    a CA silently would orphan every certificate it issued.
    """
    dir = Path(dir)
    _check_trust_domain(trust_domain)
    cert_path, key_path = dir / CA_CERT_FILE, dir / CA_KEY_FILE
    if not force:
        for existing in (cert_path, key_path):
            if existing.exists() or existing.is_symlink():
                raise PKIError(f"'{existing}' already exists; refusing to replace an existing CA")
    _make_dir(dir)
    ca = new_ca(trust_domain=trust_domain)
    write_issued(ca, cert_path, key_path)
    return ca


def load_ca(dir: Path) -> Issued:
    """Read the CA that ``init_ca`` wrote to ``dir`` (``ca.pem`` may hold its chain after it)."""
    dir = Path(dir)
    cert_path, key_path = dir / CA_CERT_FILE, dir / CA_KEY_FILE

    def fail(what: str, path: Path, cause: str) -> PKIError:
        return PKIError(f"reading CA {what} '{path}': {cause}")

    try:
        certs = x509.load_pem_x509_certificates(cert_path.read_bytes())
    except FileNotFoundError:
        raise fail("certificate", cert_path, f"no such file (run 'sidecar pki init --dir {dir}' first)") from None
    except (OSError, ValueError) as exc:
        raise fail("certificate", cert_path, _cause(exc)) from exc
    cert, chain = certs[0], tuple(certs[1:])
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise fail("certificate", cert_path, "not a CA certificate (basicConstraints CA:TRUE missing)")

    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except FileNotFoundError:
        raise fail("key", key_path, "no such file") from None
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise fail("key", key_path, _cause(exc)) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise fail("key", key_path, f"expected an EC private key, found {type(key).__name__}")
    if key.public_key() != cert.public_key():
        raise fail("key", key_path, f"does not match the certificate in '{cert_path}'")
    return Issued(cert=cert, key=key, chain=chain)


def issue_to_dir(
    ca_dir: Path,
    name: str,
    *,
    spiffe_id: str | None = None,
    dns_names: Sequence[str] = (),
    hours: float = 24.0,
    out: Path | None = None,
) -> Issued:
    """Issue a leaf for workload ``name`` from the CA in ``ca_dir`` into ``cert.pem``/``key.pem``.

    The SPIFFE ID defaults to ``spiffe://TD/NAME`` (TD from the CA, else ``mesh.local``), the CN is
    ``name``, and the files go to ``out`` (default ``ca_dir/NAME``), key first, each atomically, so
    re-issuing into a folder a sidecar watches is a rotation.
    """
    ca_dir = Path(ca_dir)
    if not _NAME.fullmatch(name):
        raise PKIError(
            f"invalid name {name!r}: use 1-64 letters, digits, '.', '-' or '_', starting with a letter or digit"
        )
    for dns in dns_names:
        _check_dns_name(dns)
    ca = load_ca(ca_dir)
    if spiffe_id is None:
        spiffe_id = f"spiffe://{trust_domain_of(ca) or DEFAULT_TRUST_DOMAIN}/{name}"
    validate_spiffe_id(spiffe_id)
    leaf = issue(ca, common_name=name, spiffe_ids=[spiffe_id], dns_names=dns_names, hours=hours)
    out_dir = Path(out) if out is not None else ca_dir / name
    _make_dir(out_dir)
    write_issued(leaf, out_dir / CERT_FILE, out_dir / KEY_FILE)
    return leaf


def pin_of_file(path: Path) -> str:
    """The pin (``spki-sha256:`` value) of the first certificate in the PEM file ``path``."""
    try:
        certs = x509.load_pem_x509_certificates(Path(path).read_bytes())
    except OSError as exc:
        raise PKIError(f"reading certificate '{path}': {_cause(exc)}") from None
    except ValueError:
        raise PKIError(f"certificate '{path}': holds no valid PEM certificate") from None
    return pinning.pin_of_der(certs[0].public_bytes(serialization.Encoding.DER))


# --- helpers -------------------------------------------------------------------------------------


def _now() -> datetime:
    # Whole seconds: certificates store no fractions, so "not_before + hours" stays exact.
    return datetime.now(UTC).replace(microsecond=0)


def _utc(moment: datetime) -> datetime:
    """Naive datetimes are taken as UTC (as ``cryptography`` does)."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _check_validity(start: datetime, end: datetime) -> None:
    if end <= start:
        raise PKIError(f"certificate would end ({end.isoformat()}) before it starts ({start.isoformat()})")


def _check_trust_domain(trust_domain: str) -> None:
    if "/" in trust_domain or not spiffeid.is_valid(spiffeid.PREFIX + trust_domain):
        raise PKIError(f"invalid trust domain {trust_domain!r}: use lower-case letters, digits, '.', '-' and '_'")


def _check_dns_name(name: str) -> None:
    labels = name.split(".")
    if labels and labels[0] == "*":
        labels = labels[1:]  # a wildcard is one whole left-most label
    if len(name) > 253 or not labels or not all(_DNS_LABEL.fullmatch(label) for label in labels):
        raise PKIError(f"invalid DNS name {name!r}")


def _authority_key_id(ca: Issued) -> x509.AuthorityKeyIdentifier:
    """The AKI for certificates ``ca`` signs: its own SKI when it has one."""
    try:
        ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key())
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _is_self_signed(cert: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _make_dir(path: Path) -> None:
    try:
        path.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as exc:
        raise PKIError(f"creating directory '{path}': {_cause(exc)}") from exc


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some filesystems cannot fsync a directory; the rename itself has still happened.
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _cause(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
