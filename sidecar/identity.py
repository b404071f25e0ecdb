"""Peer identities and the patterns that allow them (contract section 2, "Identity patterns").

An identity is what a *verified* certificate says: URI SANs (SPIFFE IDs), DNS SANs, subject CN and
OUs. A pattern list allows a peer when any identity matches any pattern; an empty list allows no
one (fail closed). Matching is case-sensitive except for DNS names. Nothing here does I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://\S+$")
_LABEL = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")


@dataclass(frozen=True)
class PeerIdentity:
    uris: tuple[str, ...] = ()
    dns_names: tuple[str, ...] = ()
    common_names: tuple[str, ...] = ()
    organizational_units: tuple[str, ...] = ()

    @property
    def spiffe_ids(self) -> tuple[str, ...]:
        return tuple(u for u in self.uris if u.startswith("spiffe://"))

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
    kind: str  # uri | uri_one | uri_many | dns | dns_wildcard | cn | ou | any
    value: str

    def matches(self, peer: PeerIdentity) -> bool:
        kind, value = self.kind, self.value
        if kind == "any":
            return True
        if kind == "uri":
            return value in peer.uris
        if kind in ("uri_one", "uri_many"):
            return any(_uri_tail_matches(u, value, many=kind == "uri_many") for u in peer.uris)
        if kind == "dns":
            return any(d.lower().rstrip(".") == value for d in peer.dns_names)
        if kind == "dns_wildcard":
            return any(_dns_wildcard_matches(d.lower().rstrip("."), value) for d in peer.dns_names)
        if kind == "cn":
            return value in peer.common_names
        return value in peer.organizational_units  # ou


def parse_pattern(text: Any) -> Pattern:
    """Parse one pattern; ``ValueError`` says what is wrong with it."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"expected an identity pattern string, got {text!r}")
    t = text.strip()
    if t == "*":
        return Pattern(t, "any", "")
    if "://" in t:
        if not _URI.match(t):
            raise ValueError(f"{t!r} is not a valid URI")
        for suffix, kind in (("/**", "uri_many"), ("/*", "uri_one")):
            if t.endswith(suffix):
                prefix = t[: -len(suffix)]
                if "*" in prefix:
                    raise ValueError(f"{t!r}: '*' may only stand as the whole last path segment")
                return Pattern(t, kind, prefix)
        if "*" in t:
            raise ValueError(f"{t!r}: '*' may only stand as the whole last path segment ('/*' or '/**')")
        return Pattern(t, "uri", t)
    prefix, sep, rest = t.partition(":")
    if not sep or not rest:
        raise ValueError(f"{t!r} is not an identity pattern (expected spiffe://..., dns:NAME, cn:NAME, ou:NAME or *)")
    if prefix == "dns":
        name = rest.lower().rstrip(".")
        labels = name.split(".")
        wildcard = labels[0] == "*"
        checked = labels[1:] if wildcard else labels
        if not checked or not all(_LABEL.match(label) for label in checked):
            raise ValueError(f"{t!r}: not a DNS name ('*' may only be the whole left-most label)")
        if wildcard:
            return Pattern(t, "dns_wildcard", name[2:])
        return Pattern(t, "dns", name)
    if prefix in ("cn", "ou"):
        return Pattern(t, prefix, rest)
    raise ValueError(f"{t!r}: unknown pattern kind {prefix!r} (expected spiffe://..., dns:, cn:, ou: or *)")


def is_allowed(peer: PeerIdentity, patterns: Sequence[Pattern]) -> bool:
    """True when any pattern matches; an empty pattern list allows no one."""
    return any(p.matches(peer) for p in patterns)


def from_peercert(cert: dict[str, Any] | None) -> PeerIdentity:
    """Identity from ``SSLObject.getpeercert()`` (the verified peer's decoded certificate)."""
    if not cert:
        return PeerIdentity()
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
    return PeerIdentity(tuple(uris), tuple(dns), tuple(cns), tuple(ous))


def from_certificate(cert: x509.Certificate) -> PeerIdentity:
    """Identity of a parsed certificate (for ``sidecar check``, ``/certs`` and tests)."""
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
    )


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
