"""Peer identities and the patterns that allow them (contract section 2, "Identity patterns").

An identity is what a *verified* certificate says: URI SANs (SPIFFE IDs), DNS SANs, subject CN and
OUs, and (only when a pin pattern asks for it) its public key's pin. A pattern list allows a peer
when any identity matches any pattern; an empty list allows no one (fail closed). A URI SAN of the
``spiffe`` scheme counts only when it is a valid SPIFFE ID, checked once when the identity is
built. Matching is case-sensitive except for DNS names. Nothing here does I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from . import pinning, spiffeid

_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S+")
_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


class Verdict(StrEnum):
    """What a pattern list says of a peer. A refusal's value is the access record's ``reason``."""

    ALLOWED = "allowed"
    NOT_ALLOWED = "not_allowed"  # no identity of the peer matches any pattern
    INVALID_SPIFFE_ID = "invalid_spiffe_id"  # as NOT_ALLOWED, and the peer presented an invalid SPIFFE ID


@dataclass(frozen=True)
class PeerIdentity:
    uris: tuple[str, ...] = ()
    dns_names: tuple[str, ...] = ()
    common_names: tuple[str, ...] = ()
    organizational_units: tuple[str, ...] = ()
    spki_sha256: str | None = None  # the pin (base64), computed only when a pattern list needs it
    # Derived once, here: the URI SANs patterns may match (every URI but invalid SPIFFE IDs) and
    # the invalid SPIFFE IDs, which match nothing and say why a peer was refused.
    matchable_uris: tuple[str, ...] = field(init=False, repr=False, compare=False)
    invalid_spiffe_ids: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        invalid = tuple(u for u in self.uris if spiffeid.claims_spiffe(u) and not spiffeid.is_valid(u))
        object.__setattr__(self, "invalid_spiffe_ids", invalid)
        object.__setattr__(self, "matchable_uris", tuple(u for u in self.uris if u not in invalid))

    @property
    def spiffe_ids(self) -> tuple[str, ...]:
        """The URI SANs claiming to be SPIFFE IDs, valid or not (what the certificate says)."""
        return tuple(u for u in self.uris if spiffeid.claims_spiffe(u))

    def describe(self) -> str:
        """The one name a log line shows: SPIFFE ID, else another URI, else DNS name, else CN."""
        for group, prefix in (
            (self.spiffe_ids, ""),
            (self.uris, ""),
            (self.dns_names, "dns:"),
            (self.common_names, "cn:"),
        ):
            if group:
                return prefix + group[0]
        return "(no identity)"


@dataclass(frozen=True)
class Pattern:
    """One entry of ``allow`` or ``server_identity``, parsed once at config load."""

    text: str
    kind: str  # uri | uri_one | uri_many | dns | dns_wildcard | cn | ou | spki | any
    value: str

    def matches(self, peer: PeerIdentity) -> bool:
        kind, value = self.kind, self.value
        if kind == "any":
            return True
        if kind == "uri":
            return value in peer.matchable_uris
        if kind in ("uri_one", "uri_many"):
            return any(_uri_tail_matches(u, value, many=kind == "uri_many") for u in peer.matchable_uris)
        if kind == "dns":
            return any(d.lower().rstrip(".") == value for d in peer.dns_names)
        if kind == "dns_wildcard":
            return any(_dns_wildcard_matches(d.lower().rstrip("."), value) for d in peer.dns_names)
        if kind == "cn":
            return value in peer.common_names
        if kind == "spki":
            return peer.spki_sha256 == value
        return value in peer.organizational_units  # ou


def parse_pattern(text: Any) -> Pattern:
    """Parse one pattern; ``ValueError`` says what is wrong with it."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"expected an identity pattern string, got {text!r}")
    t = text.strip()
    if t == "*":
        return Pattern(t, "any", "")
    if spiffeid.claims_spiffe(t):
        return _spiffe_pattern(t)
    if "://" in t:
        if not _URI.fullmatch(t):
            raise ValueError(f"{t!r} is not a valid URI")
        if "*" in t:
            raise ValueError(f"{t!r}: '*' wildcards are for spiffe:// patterns; other URIs match exactly")
        return Pattern(t, "uri", t)
    prefix, sep, rest = t.partition(":")
    if not sep or not rest:
        raise ValueError(
            f"{t!r} is not an identity pattern (expected spiffe://..., dns:NAME, cn:NAME, ou:NAME, "
            f"{pinning.PREFIX}PIN or *)"
        )
    if prefix == "dns":
        name = rest.lower().rstrip(".")
        labels = name.split(".")
        wildcard = labels[0] == "*"
        checked = labels[1:] if wildcard else labels
        if not checked or not all(_LABEL.fullmatch(label) for label in checked):
            raise ValueError(f"{t!r}: not a DNS name ('*' may only be the whole left-most label)")
        if wildcard:
            return Pattern(t, "dns_wildcard", name[2:])
        return Pattern(t, "dns", name)
    if prefix in ("cn", "ou"):
        return Pattern(t, prefix, rest)
    if prefix + ":" == pinning.PREFIX:
        return Pattern(t, "spki", pinning.parse_pin(rest))
    raise ValueError(
        f"{t!r}: unknown pattern kind {prefix!r} (expected spiffe://..., dns:, cn:, ou:, {pinning.PREFIX} or *)"
    )


def _spiffe_pattern(t: str) -> Pattern:
    """A ``spiffe://`` pattern: an exact SPIFFE ID, or a valid one followed by ``/*`` or ``/**``."""
    kind, prefix = "uri", t
    for suffix, wildcard in (("/**", "uri_many"), ("/*", "uri_one")):
        if t.endswith(suffix):
            kind, prefix = wildcard, t[: -len(suffix)]
            break
    why = spiffeid.problem(prefix)
    if why is not None:
        if "*" in prefix:
            why = "'*' may only stand as the whole last path segment ('/*' or '/**')"
        raise ValueError(f"{t!r} is not a valid SPIFFE ID pattern: {why}")
    return Pattern(t, kind, prefix)


def needs_spki(patterns: Iterable[Pattern]) -> bool:
    """Whether matching ``patterns`` needs the peer's pin: ask once per listener, and only then pass
    the peer certificate's DER to ``from_peercert``."""
    return any(p.kind == "spki" for p in patterns)


def decide(peer: PeerIdentity, patterns: Sequence[Pattern]) -> Verdict:
    """Whether ``patterns`` allow ``peer``, and if not, why (an empty list allows no one)."""
    if any(p.matches(peer) for p in patterns):
        return Verdict.ALLOWED
    return Verdict.INVALID_SPIFFE_ID if peer.invalid_spiffe_ids else Verdict.NOT_ALLOWED


def is_allowed(peer: PeerIdentity, patterns: Sequence[Pattern]) -> bool:
    """True when any pattern matches; an empty pattern list allows no one."""
    return decide(peer, patterns) is Verdict.ALLOWED


def from_peercert(cert: dict[str, Any] | None, der: bytes | None = None) -> PeerIdentity:
    """Identity from ``SSLObject.getpeercert()`` (the verified peer's decoded certificate).

    ``der``: ``getpeercert(binary_form=True)``, given only when ``needs_spki`` said so; its pin is
    then part of the identity (a certificate whose DER cannot be read has no pin: it matches no pin).
    """
    spki = _pin(der) if der is not None else None
    if not cert:
        return PeerIdentity(spki_sha256=spki)
    uris: list[str] = []
    dns: list[str] = []
    for kind, value in cert.get("subjectAltName", ()):
        if kind == "URI":
            uris.append(value)
        elif kind == "DNS":
            dns.append(value)
    cns: list[str] = []
    ous: list[str] = []
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                cns.append(value)
            elif key == "organizationalUnitName":
                ous.append(value)
    return PeerIdentity(tuple(uris), tuple(dns), tuple(cns), tuple(ous), spki)


def from_certificate(cert: x509.Certificate, *, spki: bool = False) -> PeerIdentity:
    """Identity of a parsed certificate (for ``sidecar check``, ``/certs`` and tests); with its pin
    when ``spki``."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = tuple(san.get_values_for_type(x509.UniformResourceIdentifier))
        dns = tuple(san.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        uris, dns = (), ()
    return PeerIdentity(
        uris=uris,
        dns_names=dns,
        common_names=_attrs(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)),
        organizational_units=_attrs(cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)),
        spki_sha256=_pin(cert.public_bytes(serialization.Encoding.DER)) if spki else None,
    )


def _pin(der: bytes) -> str | None:
    try:
        return pinning.pin_of_der(der)
    except ValueError:
        return None


def _attrs(attrs: Iterable[x509.NameAttribute[str | bytes]]) -> tuple[str, ...]:
    return tuple(a.value if isinstance(a.value, str) else a.value.decode() for a in attrs)


def _uri_tail_matches(uri: str, prefix: str, *, many: bool) -> bool:
    if not uri.startswith(prefix + "/"):
        return False
    segments = uri[len(prefix) + 1 :].split("/")
    if not all(segments):
        return False
    return many or len(segments) == 1


def _dns_wildcard_matches(name: str, suffix: str) -> bool:
    head, sep, tail = name.partition(".")
    return bool(sep) and tail == suffix and bool(head)
