"""An independent reading of the SPIFFE ID grammar (SPIFFE-ID standard, 2.1 to 2.3), for the fuzzer.

Written from the standard as regular expressions, deliberately unlike ``sidecar/spiffeid.py``
(which walks character sets by hand), so that one mistake must be made twice to go unnoticed:
scheme ``spiffe`` then ``://``; a trust domain of 1 to 255 characters of [a-z0-9._-] (so no
user info, port, upper case or percent-encoding); a path of zero or more ``/segment``, each of
[A-Za-z0-9._-]+ and neither ``.`` nor ``..`` (so no empty segment, no trailing ``/``, no query,
no fragment); at most 2048 bytes in all.
"""

from __future__ import annotations

import re

_ID = re.compile(
    r"spiffe://"
    r"(?P<trust_domain>[a-z0-9._\-]{1,255})"
    r"(?P<path>(?:/(?!\.{1,2}(?:/|\Z))[A-Za-z0-9._\-]+)*)"
)
_SCHEME = re.compile(r"spiffe:", re.IGNORECASE | re.ASCII)


def is_valid(uri: str, *, require_path: bool = False) -> bool:
    if len(uri.encode("utf-8", "surrogatepass")) > 2048:
        return False
    match = _ID.fullmatch(uri)
    return match is not None and (bool(match["path"]) or not require_path)


def claims_spiffe(uri: str) -> bool:
    """The URI's scheme is ``spiffe`` (ASCII letters, any case)."""
    return _SCHEME.match(uri) is not None
