"""Tests for sidecar.forwarding: what the app is told of its caller, made from a real TLS 1.3
handshake in memory (our server engine, a Python client), read back with independent parsers
(the ``proxy-protocol`` package for the header, llhttp for the rewritten requests)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ssl
from ipaddress import IPv4Address

import httptools
import pytest
from cryptography.hazmat.primitives import serialization
from proxyprotocol.v2 import ProxyProtocolV2
from support import TD, CertFactory, CertFiles, client_context

from sidecar.config import Address, Inbound, TLSFiles, TransparentPort
from sidecar.errors import HTTPRefusal, ProxyHeaderError
from sidecar.forwarding import Forwarding, describe, outcome_of
from sidecar.proxy_protocol import Mode
from sidecar.record import Outcome
from sidecar.tls import TLSStore
from sidecar.tlsio import TLSEngine

SOURCE, DESTINATION = ("10.1.2.3", 40000), ("10.9.8.7", 8443)
GET = b"GET / HTTP/1.1\r\nHost: orders\r\nx-forwarded-client-cert: By=spoof\r\n\r\n"


def new_store(ca: CertFactory) -> TLSStore:
    leaf = ca.leaf("orders")
    store = TLSStore(TLSFiles(cert=leaf.cert, key=leaf.key, ca=ca.ca_file))
    asyncio.run(store.load())
    return store


def handshake(store: TLSStore, client: CertFiles, ca: CertFactory, sni: str | None) -> TLSEngine:
    """Our server engine after a completed handshake with ``client`` (which sent ``sni``)."""
    engine = TLSEngine(store.material.server_ctx, server_side=True)
    c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = client_context(client, ca.ca_file).wrap_bio(c_in, c_out, server_side=False, server_hostname=sni)
    for _ in range(10):
        with contextlib.suppress(ssl.SSLWantReadError):
            obj.do_handshake()
        engine.feed(c_out.read())
        if engine.handshake():
            c_in.write(engine.output())
            return engine
        c_in.write(engine.output())
    raise AssertionError("the handshake did not complete")


def der_of(leaf: CertFiles) -> bytes:
    return leaf.issued.cert.public_bytes(serialization.Encoding.DER)


def test_tls_full_tells_what_the_handshake_settled(ca: CertFactory, client_leaf: CertFiles) -> None:
    store = new_store(ca)
    forwarding = Forwarding(Mode.TLS_FULL, None, store)
    engine = handshake(store, client_leaf, ca, "orders.mesh.local")
    intro = forwarding.introduce(SOURCE, DESTINATION, engine, engine.negotiated())
    assert intro.rewriter is None
    result = ProxyProtocolV2().unpack(intro.preamble)
    assert result.source == (IPv4Address(SOURCE[0]), SOURCE[1])
    assert result.dest == (IPv4Address(DESTINATION[0]), DESTINATION[1])
    assert result.tlv.authority == "orders.mesh.local"
    tls = result.tlv.ssl
    assert (tls.client, tls.verify, tls.version, tls.cn) == (0x07, 0, "TLSv1.3", "frontend")
    assert tls[0x28] == der_of(client_leaf)
    assert result.tlv[0xE0] == f"{TD}/frontend".encode()


def test_the_server_name_is_kept_only_where_a_listener_sends_it(ca: CertFactory, client_leaf: CertFiles) -> None:
    store = new_store(ca)
    assert handshake(store, client_leaf, ca, "orders.mesh.local").sni is None  # no callback: nothing kept
    Forwarding(Mode.CONN, "xfcc", store)
    assert store.material.server_ctx.sni_callback is None  # conn carries no TLS facts
    Forwarding(Mode.TLS, None, store)
    Forwarding(Mode.TLS_FULL, None, store)
    assert len(store.subscribers) == 1  # one callback for the store, however many listeners use it
    assert handshake(store, client_leaf, ca, "orders.mesh.local").sni == "orders.mesh.local"
    assert handshake(store, client_leaf, ca, None).sni is None
    asyncio.run(store.reload())  # new material, new contexts: the name is still kept
    assert handshake(store, client_leaf, ca, "again.mesh.local").sni == "again.mesh.local"


def test_xfcc_adds_ours_and_removes_the_callers(ca: CertFactory, client_leaf: CertFiles) -> None:
    store = new_store(ca)
    engine = handshake(store, client_leaf, ca, None)
    intro = Forwarding.of(
        Inbound("orders", Address("127.0.0.1", 0), Address("127.0.0.1", 1), (), client_cert_header="xfcc"), store
    ).introduce(SOURCE, DESTINATION, engine, engine.negotiated())  # type: ignore[union-attr]
    assert intro.preamble == b"" and intro.rewriter is not None
    digest = hashlib.sha256(der_of(client_leaf)).hexdigest()
    ours = f'By={TD}/orders;Hash={digest};Subject="CN=frontend";URI={TD}/frontend;DNS=localhost'
    assert headers_at_the_app(intro.rewriter.feed(GET)) == [ours.encode()]


def test_a_plain_caller_gets_the_conn_header_and_no_xfcc_at_all(ca: CertFactory) -> None:
    """Plain TCP let through (permissive transparent mode): nothing may claim TLS or an identity."""
    intro = Forwarding(Mode.TLS_FULL, "xfcc", new_store(ca)).introduce(SOURCE, DESTINATION)
    result = ProxyProtocolV2().unpack(intro.preamble)
    assert result.source == (IPv4Address(SOURCE[0]), SOURCE[1]) and not result.tlv
    assert intro.rewriter is not None
    assert headers_at_the_app(intro.rewriter.feed(GET)) == []


def test_no_settings_no_forwarding(ca: CertFactory) -> None:
    store = new_store(ca)
    assert Forwarding.of(Inbound("orders", Address("127.0.0.1", 0), Address("127.0.0.1", 1), ()), store) is None
    assert Forwarding.of(TransparentPort(8080, ()), store) is None
    port = Forwarding.of(TransparentPort(8080, (), proxy_protocol=Mode.CONN), store)  # a captured port: the same
    assert port is not None and port.proxy_protocol is Mode.CONN and not port.xfcc_header


@pytest.mark.parametrize(
    ("refusal", "outcome", "reason"),
    [
        (HTTPRefusal("ambiguous_length", "TE and CL"), Outcome.DENIED, "ambiguous_length (400): TE and CL"),
        (HTTPRefusal("head_too_large", "past 64 KiB", status=431), Outcome.LIMIT, "head_too_large (431): past 64 KiB"),
        (
            ProxyHeaderError("proxy_header_too_large", "70000 bytes"),
            Outcome.LIMIT,
            "proxy_header_too_large: 70000 bytes",
        ),
    ],
)
def test_refusals_outcomes_and_reasons(refusal: HTTPRefusal | ProxyHeaderError, outcome: Outcome, reason: str) -> None:
    assert (outcome_of(refusal), describe(refusal)) == (outcome, reason)


def headers_at_the_app(data: bytes) -> list[bytes]:
    """Every x-forwarded-client-cert value llhttp reads in ``data``, one request."""
    values: list[bytes] = []

    class Sink:
        def on_header(self, name: bytes, value: bytes) -> None:
            if name.lower() == b"x-forwarded-client-cert":
                values.append(value)

    httptools.HttpRequestParser(Sink()).feed_data(data)
    return values
