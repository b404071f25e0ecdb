"""Tests for sidecar.identity: every pattern kind of contract section 2, matching and not matching.

Identities are built directly, or read from certificates made in memory with ``sidecar.pki``;
no sockets.
"""

from __future__ import annotations

from typing import Any

import pytest

from sidecar import pki
from sidecar.identity import (
    PeerIdentity,
    Verdict,
    decide,
    from_certificate,
    from_peercert,
    is_allowed,
    parse_pattern,
)
from tests.support import SPIFFE_TRICKS

TD = "spiffe://mesh.local"


def uri(*uris: str) -> PeerIdentity:
    return PeerIdentity(uris=uris)


def dns(*names: str) -> PeerIdentity:
    return PeerIdentity(dns_names=names)


def matches(pattern: str, peer: PeerIdentity) -> bool:
    return parse_pattern(pattern).matches(peer)


# -- URI SANs --------------------------------------------------------------------------------------


def test_exact_uri() -> None:
    p = f"{TD}/billing"
    assert matches(p, uri(f"{TD}/billing"))
    assert matches(p, uri(f"{TD}/other", f"{TD}/billing"))  # any of the peer's identities
    assert not matches(p, uri(f"{TD}/billing/extra"))
    assert not matches(p, uri(f"{TD}/bill"))
    assert not matches(p, uri(f"{TD}/billing/"))
    assert not matches(p, uri("spiffe://other.domain/billing"))


def test_uri_is_case_sensitive() -> None:
    assert not matches(f"{TD}/billing", uri(f"{TD}/Billing"))
    assert not matches(f"{TD}/billing", uri("SPIFFE://mesh.local/billing"))
    assert not matches(f"{TD}/jobs/*", uri(f"{TD}/Jobs/nightly"))


def test_any_scheme_is_a_uri_pattern() -> None:
    assert matches("https://idp.example/users/7", uri("https://idp.example/users/7"))
    assert not matches("https://idp.example/users/7", uri("https://idp.example/users/70"))


def test_other_schemes_match_exactly_and_are_not_validated() -> None:
    odd = "https://idp.example/users/../7?x=1#f"
    assert matches(odd, uri(odd))
    assert not matches(odd, uri("https://idp.example/users/7"))
    assert decide(uri("https://idp.example/a"), [parse_pattern("https://idp.example/b")]) is Verdict.NOT_ALLOWED


# -- SPIFFE ID tricks: an invalid SPIFFE ID matches no pattern, exact or wildcard ------------------


@pytest.mark.parametrize("trick", [*SPIFFE_TRICKS, f"{TD}/jobs/x\n"])
@pytest.mark.parametrize("pattern", [f"{TD}/jobs/*", f"{TD}/jobs/**", f"{TD}/*", f"{TD}/**"])
def test_invalid_spiffe_id_matches_no_wildcard(trick: str, pattern: str) -> None:
    peer = uri(trick)
    assert peer.invalid_spiffe_ids == (trick,)
    assert not matches(pattern, peer)
    assert decide(peer, [parse_pattern(pattern)]) is Verdict.INVALID_SPIFFE_ID


def test_invalid_spiffe_id_matches_no_exact_pattern_even_its_own_text() -> None:
    # the pattern itself cannot be written (it is refused at load), so build the match by hand
    from sidecar.identity import Pattern

    trick = f"{TD}/jobs/.."
    assert not Pattern(trick, "uri", trick).matches(uri(trick))


def test_other_identities_of_a_peer_with_an_invalid_spiffe_id_still_count() -> None:
    # contract section 2: a peer is allowed when any identity matches; the invalid one matches nothing
    peer = PeerIdentity(uris=(f"{TD}/jobs/..",), dns_names=("jobs.mesh.local",))
    assert decide(peer, [parse_pattern("dns:jobs.mesh.local")]) is Verdict.ALLOWED
    assert decide(peer, [parse_pattern(f"{TD}/jobs/*")]) is Verdict.INVALID_SPIFFE_ID
    # "*" is any peer that passed verification, whatever its SANs say
    assert decide(peer, [parse_pattern("*")]) is Verdict.ALLOWED


def test_a_valid_and_an_invalid_spiffe_id_on_one_certificate() -> None:
    peer = uri(f"{TD}/jobs/..", f"{TD}/jobs/nightly")
    assert peer.matchable_uris == (f"{TD}/jobs/nightly",)
    assert decide(peer, [parse_pattern(f"{TD}/jobs/*")]) is Verdict.ALLOWED
    assert decide(peer, [parse_pattern(f"{TD}/admin")]) is Verdict.INVALID_SPIFFE_ID


def test_verdicts_are_the_access_record_reasons() -> None:
    assert [v.value for v in Verdict] == ["allowed", "not_allowed", "invalid_spiffe_id"]
    assert decide(uri(f"{TD}/stranger"), [parse_pattern(f"{TD}/frontend")]) is Verdict.NOT_ALLOWED
    assert decide(uri(f"{TD}/frontend"), []) is Verdict.NOT_ALLOWED


def test_single_star_is_exactly_one_more_segment() -> None:
    p = f"{TD}/jobs/*"
    assert matches(p, uri(f"{TD}/jobs/nightly"))
    assert not matches(p, uri(f"{TD}/jobs/nightly/extra"))  # one segment, not two
    assert not matches(p, uri(f"{TD}/jobs"))  # not zero
    assert not matches(p, uri(f"{TD}/jobs/"))  # an empty segment is no segment
    assert not matches(p, uri(f"{TD}/jobsx/nightly"))  # a whole segment, not a string prefix
    assert not matches(p, uri(f"{TD}/jobs//nightly"))


def test_double_star_is_one_or_more_segments() -> None:
    p = f"{TD}/jobs/**"
    assert matches(p, uri(f"{TD}/jobs/nightly"))
    assert matches(p, uri(f"{TD}/jobs/nightly/extra"))
    assert matches(p, uri(f"{TD}/jobs/a/b/c/d"))
    assert not matches(p, uri(f"{TD}/jobs"))  # one or more, not zero
    assert not matches(p, uri(f"{TD}/jobs/"))
    assert not matches(p, uri(f"{TD}/jobsx/nightly"))
    assert not matches(p, uri(f"{TD}/jobs/a//b"))


def test_star_at_trust_domain_level() -> None:
    assert matches(f"{TD}/*", uri(f"{TD}/frontend"))
    assert not matches(f"{TD}/*", uri(f"{TD}/ns/frontend"))
    assert not matches(f"{TD}/*", uri("spiffe://mesh.localx/frontend"))


def test_uri_patterns_ignore_other_identity_kinds() -> None:
    peer = PeerIdentity(dns_names=("billing",), common_names=(f"{TD}/billing",))
    assert not matches(f"{TD}/billing", peer)
    assert not matches(f"{TD}/*", peer)


# -- DNS SANs --------------------------------------------------------------------------------------


def test_exact_dns() -> None:
    p = "dns:api.mesh.local"
    assert matches(p, dns("api.mesh.local"))
    assert not matches(p, dns("v2.api.mesh.local"))
    assert not matches(p, dns("api.mesh.local.evil"))
    assert not matches(p, dns("mesh.local"))
    assert not matches(p, uri("dns:api.mesh.local"))


def test_dns_is_case_insensitive_both_ways() -> None:
    assert matches("dns:api.mesh.local", dns("API.Mesh.LOCAL"))
    assert matches("dns:API.MESH.local", dns("api.mesh.local"))
    assert matches("dns:*.Mesh.Local", dns("Api.mesh.local"))


def test_dns_trailing_dot_is_the_same_name() -> None:
    assert matches("dns:api.mesh.local", dns("api.mesh.local."))
    assert matches("dns:api.mesh.local.", dns("api.mesh.local"))


def test_dns_wildcard_is_one_whole_leftmost_label() -> None:
    p = "dns:*.mesh.local"
    assert matches(p, dns("api.mesh.local"))
    assert matches(p, dns("other.mesh.local"))
    assert not matches(p, dns("mesh.local"))  # not the bare domain
    assert not matches(p, dns("a.b.mesh.local"))  # one label only
    assert not matches(p, dns("apimesh.local"))
    assert not matches(p, dns("api.mesh.local.evil"))
    assert not matches(p, dns(".mesh.local"))  # an empty label is no label


# -- subject fields --------------------------------------------------------------------------------


def test_common_name_exactly() -> None:
    assert matches("cn:billing", PeerIdentity(common_names=("billing",)))
    assert not matches("cn:billing", PeerIdentity(common_names=("Billing",)))
    assert not matches("cn:billing", PeerIdentity(common_names=("billing2",)))
    assert not matches("cn:billing", PeerIdentity(common_names=("bill",)))
    assert not matches("cn:billing", dns("billing"))
    assert not matches("cn:billing", PeerIdentity(organizational_units=("billing",)))


def test_organizational_unit_exactly() -> None:
    peer = PeerIdentity(organizational_units=("platform", "payments"))
    assert matches("ou:payments", peer)
    assert matches("ou:platform", peer)
    assert not matches("ou:Payments", peer)
    assert not matches("ou:pay", peer)
    assert not matches("ou:payments", PeerIdentity(common_names=("payments",)))


# -- any -------------------------------------------------------------------------------------------


def test_star_alone_matches_any_verified_peer() -> None:
    assert matches("*", uri(f"{TD}/anyone"))
    assert matches("*", PeerIdentity(common_names=("x",)))
    assert matches("*", PeerIdentity())  # verification is the TLS layer's job; "*" adds no condition


def test_is_allowed_is_any_of_and_fails_closed() -> None:
    patterns = [parse_pattern(f"{TD}/frontend"), parse_pattern("dns:*.mesh.local")]
    assert is_allowed(uri(f"{TD}/frontend"), patterns)
    assert is_allowed(dns("jobs.mesh.local"), patterns)
    assert not is_allowed(uri(f"{TD}/stranger"), patterns)
    assert not is_allowed(uri(f"{TD}/frontend"), [])  # an empty list allows no one


# -- invalid patterns ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        None,
        42,
        ["*"],
        "spiffe://",  # no authority or path
        "spiffe://mesh.local/fr*nt",  # '*' inside a segment
        "spiffe://mesh.local/*/frontend",  # '*' not last
        "spiffe://mesh.local/jobs/*x",
        "spiffe://mesh.local/jobs/***",
        "spiffe://mesh.local/a b",
        "dns:",
        "dns:*",  # nothing under the wildcard
        "dns:a.*.mesh.local",  # '*' not left-most
        "dns:*api.mesh.local",  # '*' not a whole label
        "dns:**.mesh.local",
        "dns:foo..bar",
        "dns:-bad.mesh.local",
        "cn:",
        "ou:",
        "ip:10.0.0.1",  # unknown kind
        "CN:billing",  # kinds are lower-case
        "frontend",  # no kind at all
        "**",
        # SPIFFE patterns must be valid SPIFFE IDs (or valid prefixes before /* and /**)
        "spiffe://mesh.local/jobs/..",
        "spiffe://mesh.local/jobs/../*",
        "spiffe://mesh.local/jobs/./**",
        "spiffe://mesh.local/jobs?x=1",
        "spiffe://mesh.local/jobs#f",
        "spiffe://mesh.local/jobs/%2e",
        "spiffe://mesh.local//jobs/*",
        "spiffe://mesh.local/jobs/",
        "spiffe://Mesh.Local/jobs",
        "SPIFFE://mesh.local/jobs",
        "spiffe:mesh.local/jobs",
        "spiffe://mesh.local:8443/jobs",
        "spiffe://user@mesh.local/jobs/*",
        "spiffe:///*",
        "spiffe://mesh.local/a\nb",
        # other URI schemes match exactly: no wildcards
        "https://idp.example/users/*",
        "https://idp.example/*/7",
        # pins
        "spki-sha256:",
        "spki-sha256:not base64!",
        "spki-sha256:AAAA",  # 3 bytes, not 32
        "spki-sha256:" + "A" * 42 + "B=",  # 32 bytes, but its unused trailing bits are set: not canonical
        "spki-sha256:" + "A" * 43,  # padding missing
        "spki-sha256:" + "_" * 43 + "=",  # URL-safe alphabet
        "SPKI-SHA256:" + "A" * 43 + "=",
        "spki-sha1:" + "A" * 28,
    ],
)
def test_invalid_pattern_raises_value_error(text: Any) -> None:
    with pytest.raises(ValueError):
        parse_pattern(text)


def test_pattern_keeps_its_text() -> None:
    assert parse_pattern(f" {TD}/jobs/* ").text == f"{TD}/jobs/*"


# -- identities from certificates ------------------------------------------------------------------


def test_identity_from_a_certificate() -> None:
    ca = pki.new_ca("unit ca", trust_domain="mesh.local")
    leaf = pki.issue(
        ca,
        common_name="billing",
        spiffe_ids=[f"{TD}/billing"],
        dns_names=["billing.mesh.local"],
        organizational_units=["payments"],
    )
    ident = from_certificate(leaf.cert)
    assert ident.uris == (f"{TD}/billing",)
    assert ident.spiffe_ids == (f"{TD}/billing",)
    assert ident.dns_names == ("billing.mesh.local",)
    assert ident.common_names == ("billing",)
    assert ident.organizational_units == ("payments",)
    assert ident.describe() == f"{TD}/billing"
    for pattern in (f"{TD}/billing", f"{TD}/*", "dns:*.mesh.local", "cn:billing", "ou:payments", "*"):
        assert matches(pattern, ident), pattern
    for pattern in (f"{TD}/orders", f"{TD}/billing/*", "dns:mesh.local", "cn:orders", "ou:platform"):
        assert not matches(pattern, ident), pattern


def test_certificate_without_sans() -> None:
    ca = pki.new_ca("unit ca")
    ident = from_certificate(pki.issue(ca, common_name="legacy").cert)
    assert ident == PeerIdentity(common_names=("legacy",))
    assert ident.describe() == "cn:legacy"
    assert not matches(f"{TD}/*", ident)


def test_identity_from_getpeercert_shape() -> None:
    peercert = {
        "subject": ((("organizationalUnitName", "payments"),), (("commonName", "billing"),)),
        "subjectAltName": (("URI", f"{TD}/billing"), ("DNS", "billing.mesh.local"), ("IP Address", "10.0.0.7")),
    }
    ident = from_peercert(peercert)
    assert ident == PeerIdentity(
        uris=(f"{TD}/billing",),
        dns_names=("billing.mesh.local",),
        common_names=("billing",),
        organizational_units=("payments",),
    )
    assert from_peercert(None) == PeerIdentity()
    assert from_peercert({}) == PeerIdentity()


def test_describe_prefers_spiffe_then_uri_then_dns_then_cn() -> None:
    assert PeerIdentity(uris=("https://x/y", f"{TD}/a"), dns_names=("d",)).describe() == f"{TD}/a"
    assert PeerIdentity(uris=("https://x/y",), dns_names=("d",)).describe() == "https://x/y"
    assert PeerIdentity(dns_names=("d.mesh",), common_names=("c",)).describe() == "dns:d.mesh"
    assert PeerIdentity().describe() == "(no identity)"
