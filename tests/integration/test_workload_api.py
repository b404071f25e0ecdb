"""Certificates from the SPIFFE Workload API, against a real gRPC server on a real unix socket.

The agent is ``workload_api_server.WorkloadAPIServer`` (SPIRE itself cannot be installed here):
the real protocol, SVIDs from test CAs. The sidecar side is ``WorkloadAPISource`` feeding a
``TLSStore``, as the runtime wires them; handshakes over ``MemoryLink`` prove what is presented
and whom the built contexts trust.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from spiffe._proto import workload_pb2
from support import CertFactory, CertFiles, MemoryLink, client_context, server_context, write_config
from workload_api_server import HEADER, WorkloadAPIServer, empty_response, response, svid_message

from sidecar import pki
from sidecar.config import TLSWorkloadAPI
from sidecar.errors import WorkloadAPIUnavailable
from sidecar.identity import PeerIdentity, from_certificate
from sidecar.tls import TLSStore
from sidecar.workload_api import Backoff, Link, WorkloadAPISource

PARTNER = "spiffe://partner.org"


def settings_for(socket: Path) -> TLSWorkloadAPI:
    return TLSWorkloadAPI(address=f"unix://{socket}", socket=socket)


@contextlib.asynccontextmanager
async def source_and_store(socket: Path, wait: float = 10.0) -> AsyncIterator[tuple[WorkloadAPISource, TLSStore]]:
    settings = settings_for(socket)
    store = TLSStore(settings)
    source = WorkloadAPISource(settings, store.accept, backoff=Backoff(initial=0.05, cap=0.5))
    try:
        await source.start(wait)
        yield source, store
    finally:
        await source.stop()


async def eventually(predicate: Callable[[], Any], within: float = 5.0) -> Any:
    deadline = time.monotonic() + within
    while not (result := predicate()):
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)
    return result


def verified(peer: CertFiles, issuer: CertFactory) -> tuple[PeerIdentity, tuple[bytes, ...]]:
    """``peer``'s identity and the chain OpenSSL verifies for it (leaf, then its CA), DER."""
    chain = (peer.issued.cert, issuer.ca.cert)
    return from_certificate(peer.issued.cert), tuple(c.public_bytes(serialization.Encoding.DER) for c in chain)


def serial(leaf: CertFiles | pki.Issued) -> str:
    cert = leaf.issued.cert if isinstance(leaf, CertFiles) else leaf.cert
    return format(cert.serial_number, "x")


def presented_serial(store: TLSStore, peer: CertFiles, peer_ca: Path) -> str:
    """A real handshake with the store's server context: the serial the sidecar presents."""
    link = MemoryLink(client_context(peer, peer_ca), store.material.server_ctx)
    link.handshake()
    der_cert = link.client.getpeercert(binary_form=True)
    assert der_cert is not None
    return format(x509.load_der_x509_certificate(der_cert).serial_number, "x")


def admits(store: TLSStore, peer: CertFiles, peer_ca: Path) -> bool:
    """Whether the store's server context lets ``peer`` finish a handshake."""
    link = MemoryLink(client_context(peer, peer_ca), store.material.server_ctx)
    try:
        link.handshake()
    except ssl.SSLError:
        return False
    return True


# -- the first fetch -------------------------------------------------------------------------------


async def test_first_svid_is_published_and_presented(agent: WorkloadAPIServer, ca: CertFactory) -> None:
    orders, frontend = ca.leaf("orders"), ca.leaf("frontend")
    agent.start().push(response(orders.issued, [ca.ca.cert]))
    async with source_and_store(agent.socket) as (source, store):
        material = store.material
        assert material.identity.spiffe_ids == ("spiffe://mesh.local/orders",)
        assert material.identity.serial == serial(orders)
        assert (material.source, material.trust_domains) == ("workload_api", ("mesh.local",))
        assert material.bundle.origin.address == f"unix://{agent.socket}"
        assert source.status().link is Link.UP and source.status().updates == 1
        assert presented_serial(store, frontend, ca.ca_file) == serial(orders)
    assert agent.streams == 1


async def test_the_deadline_expires_with_an_error_naming_the_socket(agent_socket: Path) -> None:
    started = time.monotonic()
    with pytest.raises(WorkloadAPIUnavailable) as caught:
        async with source_and_store(agent_socket, wait=0.5):
            pass
    assert time.monotonic() - started < 5
    message = str(caught.value)
    assert message.startswith("tls.workload_api:") and f"unix://{agent_socket}" in message
    assert f"no socket at {agent_socket}" in message and "within 0.5 s" in message


async def test_an_agent_that_never_answers_hits_the_deadline(agent: WorkloadAPIServer, ca: CertFactory) -> None:
    agent.silent = True
    agent.start().push(response(ca.leaf("orders").issued, [ca.ca.cert]))
    with pytest.raises(WorkloadAPIUnavailable, match=r"the agent sent no X\.509-SVID"):
        async with source_and_store(agent.socket, wait=1.0):
            pass
    assert agent.streams >= 1 and agent.sent == 0


async def test_a_socket_that_appears_late_is_waited_for(agent: WorkloadAPIServer, ca: CertFactory) -> None:
    orders = ca.leaf("orders")
    asyncio.get_running_loop().call_later(1.0, lambda: agent.start().push(response(orders.issued, [ca.ca.cert])))
    started = time.monotonic()
    async with source_and_store(agent.socket, wait=10.0) as (_source, store):
        assert store.material.identity.serial == serial(orders)
    assert time.monotonic() - started >= 1.0


async def test_a_refused_first_svid_is_named_when_the_deadline_expires(
    agent: WorkloadAPIServer, ca: CertFactory
) -> None:
    orders = ca.leaf("orders")
    stray_key = ec.generate_private_key(ec.SECP256R1())
    agent.start().push(workload_pb2.X509SVIDResponse(svids=[svid_message(orders.issued, [ca.ca.cert], key=stray_key)]))
    with pytest.raises(
        WorkloadAPIUnavailable, match=re.escape("does not match certificate 'spiffe://mesh.local/orders'")
    ):
        async with source_and_store(agent.socket, wait=1.0):
            pass


def test_the_test_agent_refuses_calls_without_the_security_header(agent: WorkloadAPIServer, ca: CertFactory) -> None:
    """The stand-in enforces the spec's header, so every other test proves the sidecar sends it."""
    agent.start().push(response(ca.leaf("orders").issued, [ca.ca.cert]))
    with grpc.insecure_channel(f"unix:{agent.socket}") as channel:
        fetch = channel.unary_stream(
            "/SpiffeWorkloadAPI/FetchX509SVID",
            request_serializer=workload_pb2.X509SVIDRequest.SerializeToString,
            response_deserializer=workload_pb2.X509SVIDResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as refused:
            next(iter(fetch(workload_pb2.X509SVIDRequest(), timeout=5)))
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        first = next(iter(fetch(workload_pb2.X509SVIDRequest(), metadata=[HEADER], timeout=5)))
        assert first.svids[0].spiffe_id == "spiffe://mesh.local/orders"
    assert agent.refused == 1


# -- updates ---------------------------------------------------------------------------------------


async def test_a_rotation_pushed_mid_stream_is_presented_within_2s(agent: WorkloadAPIServer, ca: CertFactory) -> None:
    orders, frontend = ca.leaf("orders"), ca.leaf("frontend")
    agent.start().push(response(orders.issued, [ca.ca.cert]))
    async with source_and_store(agent.socket) as (source, store):
        live = MemoryLink(client_context(frontend, ca.ca_file), store.material.server_ctx)
        live.handshake()
        rotated = ca.leaf("orders")
        agent.push(response(rotated.issued, [ca.ca.cert]))
        await eventually(lambda: store.material.identity.serial == serial(rotated), within=2.0)
        assert store.material.generation == 2 and source.status().updates == 2
        assert presented_serial(store, frontend, ca.ca_file) == serial(rotated)
        live.client.write(b"still here")  # the connection made before the rotation still carries data
        live.s_in.write(live.c_out.read())
        assert live.server.read(10) == b"still here"
    assert agent.streams == 1  # pushed on the open stream, no reconnect


@pytest.mark.parametrize("kind", ["key_not_matching", "no_svid", "not_der"])
async def test_a_malformed_update_keeps_the_current_material(
    agent: WorkloadAPIServer, ca: CertFactory, kind: str
) -> None:
    orders = ca.leaf("orders")
    agent.start().push(response(orders.issued, [ca.ca.cert]))
    async with source_and_store(agent.socket) as (source, store):
        before = source.status()
        bad = ca.leaf("orders")
        if kind == "key_not_matching":
            stray = ec.generate_private_key(ec.SECP256R1())
            agent.push(workload_pb2.X509SVIDResponse(svids=[svid_message(bad.issued, [ca.ca.cert], key=stray)]))
            await eventually(lambda: source.status().refused == 1)
            assert "does not match" in (source.status().last_error or "")
        elif kind == "no_svid":
            agent.push(empty_response([ca.ca.cert]))
            await eventually(lambda: source.status().disconnects > before.disconnects)
        else:
            broken = svid_message(bad.issued, [ca.ca.cert])
            broken.x509_svid = b"\x30\x03not DER"
            agent.push(workload_pb2.X509SVIDResponse(svids=[broken]))
            await eventually(lambda: source.status().disconnects > before.disconnects)
        assert store.material.identity.serial == serial(orders) and store.material.generation == 1
        good = ca.leaf("orders")
        agent.push(response(good.issued, [ca.ca.cert]))
        await eventually(lambda: store.material.identity.serial == serial(good))
        assert source.status().link is Link.UP and source.status().last_error is None


async def test_a_bundle_rotation_refuses_peers_of_the_removed_ca(
    agent: WorkloadAPIServer, ca: CertFactory, tmp_path: Path
) -> None:
    new_ca = CertFactory(tmp_path / "new", ca=pki.new_ca("new ca", trust_domain="mesh.local"), name="new")
    old_peer, new_peer = ca.leaf("frontend"), new_ca.leaf("frontend")
    agent.start().push(response(ca.leaf("orders").issued, [ca.ca.cert, new_ca.ca.cert]))  # overlap
    async with source_and_store(agent.socket) as (_source, store):
        assert admits(store, old_peer, ca.ca_file) and admits(store, new_peer, ca.ca_file)
        reissued = new_ca.leaf("orders")
        agent.push(response(reissued.issued, [new_ca.ca.cert]))  # the old CA is gone
        await eventually(lambda: store.material.identity.serial == serial(reissued))
        assert not admits(store, old_peer, new_ca.ca_file)
        assert admits(store, new_peer, new_ca.ca_file)


async def test_an_agent_restart_is_survived_and_logged_once_each_way(
    agent: WorkloadAPIServer, ca: CertFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sidecar.workload_api")
    orders = ca.leaf("orders")
    agent.start().push(response(orders.issued, [ca.ca.cert]))
    async with source_and_store(agent.socket) as (source, store):
        agent.stop()
        await eventually(lambda: source.status().link is Link.DOWN)
        await asyncio.sleep(1.5)  # several reconnects fail meanwhile
        down = source.status()
        assert store.material.identity.serial == serial(orders)  # kept while the agent is away
        assert 3 <= down.disconnects <= 40, down  # retried, with backoff rather than a hot loop
        renewed = ca.leaf("orders")
        agent.start().push(response(renewed.issued, [ca.ca.cert]))
        await eventually(lambda: store.material.identity.serial == serial(renewed))
        assert source.status().link is Link.UP
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert messages.count("Workload API stream lost; keeping the current certificates and reconnecting") == 1
    assert messages.count("Workload API stream restored") == 1
    assert messages.count("Workload API connected") == 1


async def test_a_stream_that_dies_of_a_bug_is_logged_at_once(
    agent: WorkloadAPIServer, ca: CertFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Only ``stop`` should end the stream's task; if anything else does, no certificate will come
    any more, and the log must say so when it happens, not at shutdown."""
    agent.start().push(response(ca.leaf("orders").issued, [ca.ca.cert]))
    seen: list[bool] = []

    class Watching:
        def updated(self, result: str) -> None:
            pass

        def connected(self, up: bool) -> None:
            seen.append(up)

    async def broken(bundle: object) -> None:
        raise RuntimeError("a bug in publishing")

    source = WorkloadAPISource(settings_for(agent.socket), broken, observer=Watching())
    with pytest.raises(WorkloadAPIUnavailable, match=r"stream stopped: RuntimeError\('a bug in publishing'\)"):
        await source.start(5.0)  # at once, not after the deadline
    records = [r for r in caplog.records if "stopped for good" in r.getMessage()]
    assert len(records) == 1 and records[0].exc_info is not None
    assert source.status().link is Link.DOWN and seen == [True, False]
    await source.stop()


# -- trust: own and federated bundles --------------------------------------------------------------


async def test_peers_of_own_and_federated_trust_domains_are_verified(
    agent: WorkloadAPIServer, ca: CertFactory, partner: CertFactory, rogue_ca: CertFactory
) -> None:
    mesh_peer = ca.leaf("frontend")
    partner_peer = partner.leaf("billing", spiffe=f"{PARTNER}/billing")
    agent.start().push(response(ca.leaf("orders").issued, [ca.ca.cert], {PARTNER: [partner.ca.cert]}))
    async with source_and_store(agent.socket) as (_source, store):
        material = store.material
        assert material.trust_domains == ("mesh.local", "partner.org")
        assert admits(store, mesh_peer, ca.ca_file) and admits(store, partner_peer, ca.ca_file)
        assert not admits(store, rogue_ca.leaf("frontend"), ca.ca_file)
        # outbound too: the sidecar's client context trusts a partner server
        link = MemoryLink(material.client_ctx(verify_hostname=False), server_context(partner_peer, ca.ca_file))
        link.handshake()
        assert material.peer_trust_problem(*verified(mesh_peer, ca)) is None
        assert material.peer_trust_problem(*verified(partner_peer, partner)) is None

        agent.push(response(ca.leaf("orders").issued, [ca.ca.cert]))  # the federation ends (spec 4.4)
        await eventually(lambda: store.material.trust_domains == ("mesh.local",))
        assert not admits(store, partner_peer, ca.ca_file)


async def test_a_federated_ca_cannot_vouch_for_our_trust_domain(
    agent: WorkloadAPIServer, ca: CertFactory, partner: CertFactory
) -> None:
    """The union of bundles lets OpenSSL accept a partner-signed cert claiming *our* trust domain;
    ``peer_trust_problem`` is the check that must refuse it after the handshake (the TLS engines ask
    it: tests/unit/test_trust_domains.py; a whole sidecar: test_workload_api_run.py)."""
    impostor = partner.leaf("admin", spiffe="spiffe://mesh.local/admin")
    unknown_td = ca.leaf("elsewhere", spiffe="spiffe://elsewhere.org/x")
    agent.start().push(response(ca.leaf("orders").issued, [ca.ca.cert], {PARTNER: [partner.ca.cert]}))
    async with source_and_store(agent.socket) as (_source, store):
        assert admits(store, impostor, ca.ca_file)  # the TLS layer alone cannot tell
        problem = store.material.peer_trust_problem(*verified(impostor, partner))
        assert (
            problem == "spiffe://mesh.local/admin: its chain does not lead to the bundle of its trust domain mesh.local"
        )
        assert store.material.peer_trust_problem(*verified(unknown_td, ca)) == (
            "spiffe://elsewhere.org/x: no trust bundle for its trust domain elsewhere.org"
        )


# -- sidecar check -----------------------------------------------------------------------------


def _check(config: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-m", "sidecar", "check", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **(env or {})},
    )


def _wl_config(folder: Path, socket: Path) -> Path:
    return write_config(
        folder / "sidecar.yaml",
        {
            "tls": {"workload_api": f"unix://{socket}"},
            "inbound": [{"name": "in", "listen": "127.0.0.1:0", "forward": "127.0.0.1:1", "allow": ["*"]}],
        },
    )


async def test_check_prints_the_svid_it_got(
    agent: WorkloadAPIServer, ca: CertFactory, partner: CertFactory, tmp_path: Path
) -> None:
    orders = ca.leaf("orders")
    agent.start().push(response(orders.issued, [ca.ca.cert], {PARTNER: [partner.ca.cert]}))
    result = await asyncio.to_thread(_check, _wl_config(tmp_path, agent.socket))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "spiffe://mesh.local/orders" in out and f"serial {serial(orders)}" in out
    assert f"valid until {orders.issued.cert.not_valid_after_utc.isoformat()}" in out
    assert f"from unix://{agent.socket}" in out and "trust domains mesh.local, partner.org" in out


def test_check_exits_1_naming_the_socket_when_no_svid_comes(agent_socket: Path, tmp_path: Path) -> None:
    started = time.monotonic()
    result = _check(_wl_config(tmp_path, agent_socket), {"SIDECAR_WORKLOAD_API_TIMEOUT": "1"})
    assert result.returncode == 1, result.stderr
    assert f"unix://{agent_socket}" in result.stderr and "within 1 s" in result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 30  # the environment shortened the 30 s deadline


@pytest.mark.parametrize("value", ["soon", "0", "-3", "inf"])
def test_a_bad_timeout_in_the_environment_is_a_usage_error(agent_socket: Path, tmp_path: Path, value: str) -> None:
    result = _check(_wl_config(tmp_path, agent_socket), {"SIDECAR_WORKLOAD_API_TIMEOUT": value})
    assert result.returncode == 2 and "SIDECAR_WORKLOAD_API_TIMEOUT" in result.stderr
