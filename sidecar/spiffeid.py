"""SPIFFE ID syntax: whether a URI is a valid SPIFFE ID, and if not, why (SPIFFE-ID standard, 2.1-2.3).

Used for peer certificates (an invalid ID matches no pattern), for ``spiffe://`` patterns in the
config, and for ``sidecar pki issue``. Pure string work over fixed character sets, no I/O, no
regular expressions (the fuzzer checks this code against a grammar written apart from it).
"""

from __future__ import annotations

import string

PREFIX = "spiffe://"
MAX_LENGTH = 2048  # bytes of the whole ID; the standard's interoperability limit (2.3)
MAX_TRUST_DOMAIN_LENGTH = 255  # RFC 3986's limit on a host (2.3)

_TRUST_DOMAIN_CHARS = frozenset(string.ascii_lowercase + string.digits + ".-_")
_SEGMENT_CHARS = frozenset(string.ascii_letters + string.digits + ".-_")
_WHY_CHAR = {"?": "no query", "#": "no fragment", "%": "no percent-encoding"}
_WHY_AUTHORITY_CHAR = {"@": "no user info", ":": "no port"}


def claims_spiffe(uri: str) -> bool:
    """Whether ``uri``'s scheme is ``spiffe`` in any case: such a URI must be a valid SPIFFE ID to count."""
    scheme, sep, _ = uri.partition(":")
    return bool(sep) and scheme.lower() == "spiffe"


def problem(uri: str, *, require_path: bool = False) -> str | None:
    """Why ``uri`` is not a valid SPIFFE ID, or None when it is.

    ``spiffe://trust.domain`` alone (the trust domain's own ID) is valid unless ``require_path``.
    """
    if not uri.startswith(PREFIX):
        if claims_spiffe(uri):
            return "the scheme must be 'spiffe' in lower case, followed by '://'"
        return "must start with 'spiffe://'"
    if len(uri) > MAX_LENGTH:  # every valid character is one byte, so counting characters suffices
        return f"longer than {MAX_LENGTH} bytes"
    domain, slash, path = uri[len(PREFIX) :].partition("/")
    if not domain:
        return "missing trust domain"
    if len(domain) > MAX_TRUST_DOMAIN_LENGTH:
        return f"trust domain longer than {MAX_TRUST_DOMAIN_LENGTH} bytes"
    for ch in domain:
        if ch not in _TRUST_DOMAIN_CHARS:
            return _char_problem(ch, "trust domain", "lower-case letters, digits, '.', '-' and '_'")
    if not slash:
        return "missing a path after the trust domain (e.g. 'spiffe://mesh.local/orders')" if require_path else None
    for segment in path.split("/"):
        if not segment:
            return "empty path segment (a doubled or trailing '/')"
        if segment in (".", ".."):
            return "path segments must not be '.' or '..'"
        for ch in segment:
            if ch not in _SEGMENT_CHARS:
                return _char_problem(ch, "path", "letters, digits, '.', '-' and '_'")
    return None


def is_valid(uri: str, *, require_path: bool = False) -> bool:
    return problem(uri, require_path=require_path) is None


def _char_problem(ch: str, where: str, allowed: str) -> str:
    why = _WHY_CHAR.get(ch) or (_WHY_AUTHORITY_CHAR.get(ch) if where == "trust domain" else None)
    if why is not None:
        return f"{why} allowed ({ch!r} in the {where})"
    if where == "trust domain" and ch in string.ascii_uppercase:
        return "the trust domain must be lower case"
    return f"the {where} may hold only {allowed}, not {ch!r}"
