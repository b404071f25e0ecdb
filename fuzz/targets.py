"""The fuzz targets: functions of one input's bytes that raise when a property breaks.

- ``config``: any bytes as a config file give a ``Config`` or a one-line ``SidecarError``, never
  another exception; an accepted config has finite durations and parsed patterns.
- ``patterns``: an identity pattern and identities (NUL-separated) parse to a ``Pattern`` or a
  one-line ``ValueError``; matching never raises, agrees with ``decide``, matches what a pattern
  names and never matches an invalid SPIFFE ID (by the reference grammar).
- ``spiffe``: ``sidecar.spiffeid`` agrees with ``spiffe_reference`` on every string, and a
  ``PeerIdentity`` sorts the URI the same way.
- ``pin``: the DER reader of ``sidecar.pinning`` gives a pin or ``ValueError`` for any bytes, and
  for any certificate ``cryptography`` reads, the pin of the same public key.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from sidecar import config, pinning, spiffeid
from sidecar.errors import SidecarError
from sidecar.identity import PeerIdentity, Verdict, decide, parse_pattern

from . import spiffe_reference

BASE_DIR = Path("/nonexistent/sidecar-fuzz")  # nothing is read from it: loads() never touches the disk


def one_line(message: str) -> None:
    assert message and len(message.splitlines()) == 1, f"not one line: {message!r}"


def fuzz_config(data: bytes) -> None:
    try:
        cfg = config.loads(data, base_dir=BASE_DIR)
    except SidecarError as exc:
        one_line(str(exc))
        return
    limits = cfg.limits
    for seconds in (
        limits.handshake_timeout,
        limits.connect_timeout,
        limits.idle_timeout,
        limits.drain_timeout,
        cfg.tls.session_lifetime,
    ):
        assert 0 <= seconds < float("inf"), seconds
    for inbound in cfg.inbound:
        assert inbound.allow and all(p.text for p in inbound.allow)


def fuzz_patterns(data: bytes) -> None:
    text, *names = data.decode("utf-8", "replace").split("\x00")
    try:
        pattern = parse_pattern(text)
    except ValueError as exc:
        one_line(str(exc))
        return
    assert pattern.text == text.strip()
    peer = PeerIdentity(uris=tuple(names), dns_names=tuple(names), common_names=tuple(names))
    matched = pattern.matches(peer)
    assert (decide(peer, [pattern]) is Verdict.ALLOWED) == matched
    kind, value = pattern.kind, pattern.value
    if kind.startswith("uri") and spiffe_reference.claims_spiffe(value):
        assert spiffe_reference.is_valid(value), value  # a spiffe:// pattern is a valid ID (or prefix)
        for name in names:
            if not spiffe_reference.is_valid(name):
                assert not pattern.matches(PeerIdentity(uris=(name,))), (pattern, name)
    if kind == "uri":
        assert pattern.matches(PeerIdentity(uris=(value,)))
    if kind in ("uri_one", "uri_many"):
        assert pattern.matches(PeerIdentity(uris=(value + "/x",)))
        assert pattern.matches(PeerIdentity(uris=(value + "/x/y",))) == (kind == "uri_many")
        assert not pattern.matches(PeerIdentity(uris=(value,)))
    if kind == "dns":
        assert pattern.matches(PeerIdentity(dns_names=(value.upper(),)))
    if kind == "spki":
        assert len(base64.b64decode(value, validate=True)) == pinning.DIGEST_SIZE
        assert pattern.matches(PeerIdentity(spki_sha256=value))


def fuzz_spiffe(data: bytes) -> None:
    structured = data[:1] == b"s"  # most random strings never start with the scheme: make half of them
    rest = data[1:] if structured else data
    for text in (rest.decode("latin-1"), rest.decode("utf-8", "replace")):
        uri = spiffeid.PREFIX + text if structured else text
        for require_path in (False, True):
            want = spiffe_reference.is_valid(uri, require_path=require_path)
            problem = spiffeid.problem(uri, require_path=require_path)
            assert (problem is None) == want, (uri, require_path, problem)
            if problem is not None:
                one_line(problem)
        assert spiffeid.claims_spiffe(uri) == spiffe_reference.claims_spiffe(uri), uri
        invalid = spiffe_reference.claims_spiffe(uri) and not spiffe_reference.is_valid(uri)
        peer = PeerIdentity(uris=(uri,))
        assert peer.invalid_spiffe_ids == ((uri,) if invalid else ())
        assert peer.matchable_uris == (() if invalid else (uri,))


def fuzz_pin(data: bytes) -> None:
    try:
        pin = pinning.pin_of_der(data)
    except ValueError:
        pin = None
    else:
        assert len(base64.b64decode(pin, validate=True)) == pinning.DIGEST_SIZE
    try:
        cert = x509.load_der_x509_certificate(data)
        der = serialization.Encoding.DER
        spki = cert.public_key().public_bytes(der, serialization.PublicFormat.SubjectPublicKeyInfo)
    except Exception:  # any certificate or key cryptography cannot read is outside this property
        return
    assert pin == base64.b64encode(hashlib.sha256(spki).digest()).decode(), "pin differs from cryptography's SPKI"


TARGETS: dict[str, Callable[[bytes], None]] = {
    "config": fuzz_config,
    "patterns": fuzz_patterns,
    "spiffe": fuzz_spiffe,
    "pin": fuzz_pin,
}
