"""Tests for sidecar.spiffeid: each rule of the SPIFFE-ID standard (2.1 trust domain, 2.2 path,
2.3 length), each with an ID that breaks only that rule, and the reason given for it."""

from __future__ import annotations

import pytest

from sidecar import spiffeid


@pytest.mark.parametrize(
    "uri",
    [
        "spiffe://mesh.local/orders",
        "spiffe://mesh.local",  # the trust domain's own ID
        "spiffe://mesh.local/ns/prod/sa/billing-v2_x.y",
        "spiffe://10.0.0.1/x",  # dotted quads are trust domain names like any other (2.1)
        "spiffe://a_b-c.d/A.B-C_d/..x/x../...",  # dots are fine inside a segment, only '.' and '..' are not
        "spiffe://mesh.local/" + "a" * (spiffeid.MAX_LENGTH - len("spiffe://mesh.local/")),
        "spiffe://" + "t" * spiffeid.MAX_TRUST_DOMAIN_LENGTH + "/x",
    ],
)
def test_valid_ids(uri: str) -> None:
    assert spiffeid.problem(uri) is None
    assert spiffeid.is_valid(uri)


@pytest.mark.parametrize(
    ("uri", "why"),
    [
        ("https://mesh.local/orders", "must start with 'spiffe://'"),
        ("SPIFFE://mesh.local/orders", "lower case"),
        ("Spiffe://mesh.local/orders", "lower case"),
        ("spiffe:mesh.local/orders", "followed by '://'"),
        ("spiffe:///orders", "missing trust domain"),
        ("spiffe://", "missing trust domain"),
        ("spiffe://Mesh.local/orders", "trust domain must be lower case"),
        ("spiffe://mesh.local:8443/orders", "no port"),
        ("spiffe://user@mesh.local/orders", "no user info"),
        ("spiffe://mesh%2elocal/orders", "no percent-encoding"),
        ("spiffe://[::1]/orders", "trust domain may hold only"),
        ("spiffe://mesh.local?x=1", "no query"),
        ("spiffe://mesh.local/orders?x=1", "no query"),
        ("spiffe://mesh.local/jobs/x?y=1", "no query"),
        ("spiffe://mesh.local/jobs/x#f", "no fragment"),
        ("spiffe://mesh.local/jobs/..", "'.' or '..'"),
        ("spiffe://mesh.local/jobs/.", "'.' or '..'"),
        ("spiffe://mesh.local/jobs/../admin", "'.' or '..'"),
        ("spiffe://mesh.local/jobs/x/../../admin", "'.' or '..'"),
        ("spiffe://mesh.local/jobs/%2e%2e", "no percent-encoding"),
        ("spiffe://mesh.local/a%2Fb", "no percent-encoding"),
        ("spiffe://mesh.local/", "empty path segment"),
        ("spiffe://mesh.local/a//b", "empty path segment"),
        ("spiffe://mesh.local/a/", "empty path segment"),
        ("spiffe://mesh.local/sp ace", "not ' '"),
        ("spiffe://mesh.local/a\n", "not '\\n'"),
        ("spiffe://mesh.local\n", "not '\\n'"),
        ("spiffe://mesh.local/caf\u00e9", "path may hold only"),
        ("spiffe://m\u00e9sh/x", "trust domain may hold only"),
        ("spiffe://mesh.local/a*", "path may hold only"),
        ("spiffe://mesh.local/a:b", "path may hold only"),  # a colon in the path is no port
        ("spiffe://mesh.local/a@b", "path may hold only"),
        ("spiffe://mesh.local/" + "a" * (spiffeid.MAX_LENGTH - len("spiffe://mesh.local/") + 1), "longer than"),
        ("spiffe://" + "t" * (spiffeid.MAX_TRUST_DOMAIN_LENGTH + 1) + "/x", "trust domain longer"),
    ],
)
def test_invalid_ids_say_why(uri: str, why: str) -> None:
    problem = spiffeid.problem(uri)
    assert problem is not None and why in problem, problem
    assert not spiffeid.is_valid(uri)


def test_a_path_can_be_required() -> None:
    assert spiffeid.problem("spiffe://mesh.local") is None
    problem = spiffeid.problem("spiffe://mesh.local", require_path=True)
    assert problem is not None and "missing a path" in problem
    assert spiffeid.problem("spiffe://mesh.local/x", require_path=True) is None


@pytest.mark.parametrize(
    ("uri", "claims"),
    [
        ("spiffe://mesh.local/x", True),
        ("SPIFFE://mesh.local/x", True),
        ("spiffe:x", True),
        ("spiffe:", True),
        ("https://mesh.local/x", False),
        ("spiffex://mesh.local/x", False),
        ("urn:spiffe:x", False),
        ("spiffe", False),
    ],
)
def test_claims_spiffe_is_the_scheme_in_any_case(uri: str, claims: bool) -> None:
    assert spiffeid.claims_spiffe(uri) is claims
