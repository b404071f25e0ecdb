"""``sidecar run`` with only ``workload_api`` in its ``tls`` section, end to end.

Real processes on real sockets: each sidecar is ``sidecar run``, its agent a
``workload_api_server.WorkloadAPIServer`` on a real unix socket (SPIRE itself cannot be installed
here), SVIDs and bundles from test CAs. What holds with files holds here: mTLS both ways, a
rotation pushed while connections stream (none dropped, new serial on the next handshake), a
bundle rotation refusing the removed CA's peers, an agent that goes away (material kept, ready
until the SVID expires, reconnected), an agent that never answers (exit 1 naming the socket),
malformed updates (old material kept, counted), and workers that all serve each pushed SVID. And
the attack that only federation opens: a federated CA vouching for our own trust domain.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from spiffe._proto import workload_pb2
from support import (
    TD,
    Backend,
    CertFactory,
    CertFiles,
    SidecarProcess,
    TLSConn,
    TLSServer,
    admin_request,
    children,
    client_context,
    kill,
    peer_serial,
    plain_connect,
    recv_exactly,
    scrape,
    start_sidecar,
    tls_client,
    tls_connect,
    tls_exchange,
    wait_for,
    write_config,
)
from workload_api_server import WorkloadAPIServer, empty_response, response, svid_message

from sidecar import pki

PARTNER = "spiffe://partner.org"
ROTATION_BOUND = 5.0  # generous liveness bound; the contract promises 2 s (measured: printed below)
Listener = dict[str, Any]


def wl_config(
    path: Path,
    agent: WorkloadAPIServer,
    *,
    inbound: list[Listener] | None = None,
    outbound: list[Listener] | None = None,
    workers: int = 1,
) -> Path:
    data: dict[str, Any] = {"tls": {"workload_api": f"unix://{agent.socket}"}}
    if inbound:
        data["inbound"] = inbound
    if outbound:
        data["outbound"] = outbound
    data.update(admin={"listen": "127.0.0.1:0"}, limits={"drain_timeout": "5s"}, workers=workers)
    return write_config(path, data)


def orders_inbound(backend: Backend, *allow: str) -> list[Listener]:
    allowed = list(allow or (f"{TD}/frontend",))
    return [{"name": "orders", "listen": "127.0.0.1:0", "forward": backend.address, "allow": allowed}]


def serial_hex(leaf: CertFiles | pki.Issued) -> str:
    cert = leaf.issued.cert if isinstance(leaf, CertFiles) else leaf.cert
    return format(cert.serial_number, "x")


def certs(sc: SidecarProcess) -> Any:
    answer = admin_request(sc, "GET", "/certs")
    assert answer.status == 200, answer
    return answer.json()


def log_count(sc: SidecarProcess, message: str) -> int:
    return sum(1 for r in sc.logs() if r.get("msg") == message)


def bundle_file(folder: Path, *cas: CertFactory) -> Path:
    path = folder / "trusted.pem"
    path.write_bytes(b"".join(ca.ca.cert_pem() for ca in cas))
    return path


# -- a mesh of two sidecars, both from their agents alone, with a federated trust domain --------


@dataclass
class Mesh:
    orders: SidecarProcess  # inbound "orders" -> backend; allows mesh.local/frontend and partner.org/billing
    frontend: SidecarProcess  # outbound "orders" -> orders; outbound "impostor" -> a partner-signed server
    backend: Backend
    impostor_upstream: TLSServer
    orders_svid: pki.Issued
    frontend_svid: pki.Issued


@pytest.fixture(scope="module")
def mesh(ca: CertFactory, partner: CertFactory, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    folder = tmp_path_factory.mktemp("mesh")
    backend = Backend()
    # A server whose certificate claims *our* trust domain, signed by the federated CA.
    impostor = TLSServer(partner.leaf("orders", spiffe=f"{TD}/orders"), ca.ca_file)
    agents: list[WorkloadAPIServer] = []
    started: list[SidecarProcess] = []
    try:
        svids = {}
        for name in ("orders", "frontend"):
            agent = WorkloadAPIServer(Path(tempfile.mkdtemp(prefix="sidecar-wlapi-")) / "agent.sock")
            agents.append(agent)
            svids[name] = pki.issue(ca.ca, common_name=name, spiffe_ids=[f"{TD}/{name}"], dns_names=["localhost"])
            agent.start().push(response(svids[name], [ca.ca.cert], {PARTNER: [partner.ca.cert]}))
        orders = start_sidecar(
            wl_config(
                folder / "orders.yaml",
                agents[0],
                inbound=orders_inbound(backend, f"{TD}/frontend", f"{PARTNER}/billing"),
            )
        )
        started.append(orders)
        to_orders = {"upstream": f"127.0.0.1:{orders.port('orders')}", "server_identity": [f"{TD}/orders"]}
        to_impostor = {"upstream": impostor.address, "server_identity": [f"{TD}/orders"]}
        outbound = [
            {"name": "orders", "listen": "127.0.0.1:0", **to_orders},
            {"name": "impostor", "listen": "127.0.0.1:0", **to_impostor},
        ]
        frontend = start_sidecar(wl_config(folder / "frontend.yaml", agents[1], outbound=outbound))
        started.append(frontend)
        yield Mesh(orders, frontend, backend, impostor, svids["orders"], svids["frontend"])
    finally:
        kill(*started)
        for agent in agents:
            agent.stop()
            shutil.rmtree(agent.socket.parent, ignore_errors=True)
        impostor.close()
        backend.close()


def test_mtls_both_ways_with_certificates_from_the_agents_alone(mesh: Mesh) -> None:
    payload = bytes(range(256)) * 400  # 100 KiB each way
    before = len(mesh.orders.access("orders"))
    with plain_connect(mesh.frontend.port("orders")) as app:
        app.sendall(payload)
        assert recv_exactly(app, len(payload)) == payload
    inbound = mesh.orders.wait_access(before + 1, "orders")[-1]
    assert (inbound["outcome"], inbound["peer_identity"]) == ("ok", f"{TD}/frontend")  # the client's SVID
    outbound = mesh.frontend.wait_access(1, "orders")[-1]
    assert (outbound["outcome"], outbound["peer_identity"]) == ("ok", f"{TD}/orders")  # the server's SVID
    for sc, svid in ((mesh.orders, mesh.orders_svid), (mesh.frontend, mesh.frontend_svid)):
        body = certs(sc)
        assert body["source"] == "workload_api" and body["socket"].startswith("unix:///")
        assert body["trust_domains"] == ["mesh.local", "partner.org"]
        assert body["identity"]["serial"] == serial_hex(svid)
        assert body["workload_api"]["connected"] is True and body["workload_api"]["updates"] == 1
        s = scrape(sc)
        assert s.value("sidecar_workload_api_connected") == 1
        assert s.value("sidecar_workload_api_updates_total", result="ok") == 1
        assert s.value("sidecar_workload_api_updates_total", result="refused") == 0


def test_a_client_from_the_federated_ca_claiming_our_trust_domain_is_refused(
    mesh: Mesh, ca: CertFactory, partner: CertFactory, tmp_path: Path
) -> None:
    impostor = partner.leaf("frontend", spiffe=f"{TD}/frontend")  # an identity that `allow` lists
    port, accepts = mesh.orders.port("orders"), mesh.backend.accepts
    before = len(mesh.orders.access("orders"))
    with tls_connect(port, client_context(impostor, ca.ca_file)) as s:  # TLS 1.3: completes client-side
        with contextlib.suppress(ssl.SSLError, OSError):
            s.sendall(b"GET /admin HTTP/1.1\r\n\r\n")
            assert s.recv(100) == b""
        session = s.session
    assert session is None or not session.has_ticket  # no ticket: it cannot come back by resumption
    record = mesh.orders.wait_access(before + 1, "orders")[-1]
    assert (record["outcome"], record["handshake_error"]) == ("tls_error", "untrusted")
    assert record["peer_identity"] == f"{TD}/frontend"  # what it claimed
    assert record["reason"] == f"{TD}/frontend: its chain does not lead to the bundle of its trust domain mesh.local"
    assert mesh.backend.accepts == accepts  # the app never saw it
    assert scrape(mesh.orders).value("sidecar_handshake_failures_total", listener="orders", reason="untrusted") >= 1

    # A peer of the federated trust domain under its own name is welcome, and resumes.
    billing = client_context(partner.leaf("billing", spiffe=f"{PARTNER}/billing"), bundle_file(tmp_path, ca))
    with tls_connect(port, billing) as s:
        s.sendall(b"ping")
        assert recv_exactly(s, 4) == b"ping"
        session = s.session
    assert session is not None and session.has_ticket
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    with billing.wrap_socket(raw, server_hostname="localhost", session=session) as s:
        s.sendall(b"ping")
        assert recv_exactly(s, 4) == b"ping"
        assert s.session_reused
    records = mesh.orders.wait_access(before + 3, "orders")[-2:]
    assert [(r["outcome"], r["peer_identity"], r["resumed"]) for r in records] == [
        ("ok", f"{PARTNER}/billing", False),
        ("ok", f"{PARTNER}/billing", True),
    ]


def test_an_upstream_from_the_federated_ca_claiming_our_trust_domain_gets_no_byte(mesh: Mesh) -> None:
    with plain_connect(mesh.frontend.port("impostor")) as app:
        app.sendall(b"the app's secret")
        app.settimeout(10)
        assert app.recv(100) == b""  # closed, nothing relayed
    record = mesh.frontend.wait_access(1, "impostor")[-1]
    assert (record["outcome"], record["handshake_error"]) == ("tls_error", "untrusted")
    assert record["reason"] == f"{TD}/orders: its chain does not lead to the bundle of its trust domain mesh.local"
    wait_for(lambda: mesh.impostor_upstream.accepts >= 1)
    assert mesh.impostor_upstream.plaintext() == b""  # the upstream handshook, and got not one byte


# -- one sidecar and its agent, changing under it ------------------------------------------------


@pytest.fixture
def orders(
    agent: WorkloadAPIServer, ca: CertFactory, backend: Backend, tmp_path: Path, sidecars: list[SidecarProcess]
) -> tuple[SidecarProcess, pki.Issued]:
    """A sidecar with an inbound listener (allowing mesh.local/frontend), up on its first SVID."""
    first = pki.issue(ca.ca, common_name="orders", spiffe_ids=[f"{TD}/orders"], dns_names=["localhost"])
    agent.start().push(response(first, [ca.ca.cert]))
    sc = start_sidecar(wl_config(tmp_path / "orders.yaml", agent, inbound=orders_inbound(backend)))
    sidecars.append(sc)
    return sc, first


def new_svid(ca: CertFactory | pki.Issued, **kw: Any) -> pki.Issued:
    issuer = ca.ca if isinstance(ca, CertFactory) else ca
    return pki.issue(issuer, common_name="orders", spiffe_ids=[f"{TD}/orders"], dns_names=["localhost"], **kw)


class Pump:
    """Echoes 16 KiB chunks over ``conn`` in a thread until ``finish`` (at most 30 s, 100 MiB), each
    checked as it comes back; ``finish`` says how many round trips were made, or raises what failed."""

    def __init__(self, conn: TLSConn) -> None:
        self.conn = conn
        self.trips = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        chunk = os.urandom(16 * 1024)
        deadline = time.monotonic() + 30
        try:
            while not self._stop.is_set() and time.monotonic() < deadline and self.trips < 6400:
                self.conn.sendall(chunk)
                got = b""
                while len(got) < len(chunk):
                    data = self.conn.recv(len(chunk) - len(got))
                    assert data, "the connection ended during the rotation"
                    got += data
                assert got == chunk
                self.trips += 1
        except BaseException as exc:  # reported by finish
            self.error = exc

    def finish(self) -> int:
        self._stop.set()
        self._thread.join(35)
        if self.error is not None:
            raise self.error
        self.conn.close_notify()
        assert self.conn.recv_all() == b"" and self.conn.clean_eof
        self.conn.close()
        return self.trips


def test_a_rotation_pushed_while_connections_stream_drops_none(
    orders: tuple[SidecarProcess, pki.Issued], agent: WorkloadAPIServer, ca: CertFactory, client_leaf: CertFiles
) -> None:
    sc, first = orders
    port = sc.port("orders")
    ctx = client_context(client_leaf, ca.ca_file)
    assert peer_serial(port, ctx) == first.cert.serial_number
    streams = [tls_client(port, client_leaf, ca.ca_file) for _ in range(5)]
    for i, conn in enumerate(streams):
        conn.sendall(b"before %d" % i)
        assert conn.recv(100) == b"before %d" % i
    pumping = Pump(tls_client(port, client_leaf, ca.ca_file))  # bytes flowing all through the rotation
    rotated = new_svid(ca)
    pushed = time.monotonic()
    agent.push(response(rotated, [ca.ca.cert]))
    wait_for(lambda: peer_serial(port, ctx) == rotated.cert.serial_number, ROTATION_BOUND, interval=0.02)
    print(f"new serial on the next handshake {time.monotonic() - pushed:.3f} s after the push")
    assert pumping.finish() > 0
    for i, conn in enumerate(streams):  # every connection made before the rotation still carries data
        conn.sendall(b"after %d" % i)
        assert conn.recv(100) == b"after %d" % i
        conn.close_notify()
        assert conn.recv_all() == b"" and conn.clean_eof
        conn.close()
    # the 6 connections that carried data; the serial probes (how many, the wait decides) carried none
    records = wait_for(
        lambda: d if len(d := [r for r in sc.access("orders") if r["bytes_to_upstream"] > 0]) >= 6 else None
    )
    assert len(records) == 6 and {r["outcome"] for r in records} == {"ok"}
    assert certs(sc)["identity"]["serial"] == serial_hex(rotated)
    assert agent.streams == 1  # pushed on the open stream
    assert scrape(sc).value("sidecar_workload_api_updates_total", result="ok") == 2


def test_a_bundle_rotation_refuses_the_removed_cas_peers(
    agent: WorkloadAPIServer, ca: CertFactory, backend: Backend, tmp_path: Path, sidecars: list[SidecarProcess]
) -> None:
    new_ca = CertFactory(tmp_path / "new", ca=pki.new_ca("new ca", trust_domain="mesh.local"), name="new")
    agent.start().push(response(new_svid(ca), [ca.ca.cert, new_ca.ca.cert]))  # the overlap
    sc = start_sidecar(wl_config(tmp_path / "orders.yaml", agent, inbound=orders_inbound(backend)))
    sidecars.append(sc)
    port, trusted = sc.port("orders"), bundle_file(tmp_path, ca, new_ca)
    old_peer, new_peer = client_context(ca.leaf("frontend"), trusted), client_context(new_ca.leaf("frontend"), trusted)
    assert tls_exchange(port, old_peer) == tls_exchange(port, new_peer) == b"ping"
    reissued = new_svid(new_ca.ca)
    agent.push(response(reissued, [new_ca.ca.cert]))  # the old CA is gone
    wait_for(lambda: certs(sc)["identity"]["serial"] == serial_hex(reissued), ROTATION_BOUND)
    accepts = backend.accepts
    with pytest.raises(ssl.SSLError):
        tls_exchange(port, old_peer)
    assert tls_exchange(port, new_peer) == b"ping"
    assert backend.accepts == accepts + 1
    refused = [r for r in sc.wait_access(4, "orders") if r["outcome"] != "ok"]
    assert [(r["outcome"], r["handshake_error"]) for r in refused] == [("tls_error", "untrusted")]
    assert [ca_cert["subject"] for ca_cert in certs(sc)["ca_certs"]] == ["CN=new ca"]


def test_an_agent_that_goes_away_leaves_the_material_in_use_and_is_rejoined(
    orders: tuple[SidecarProcess, pki.Issued], agent: WorkloadAPIServer, ca: CertFactory, client_leaf: CertFiles
) -> None:
    sc, first = orders
    port, ctx = sc.port("orders"), client_context(client_leaf, ca.ca_file)
    live = tls_client(port, client_leaf, ca.ca_file)
    agent.stop()
    wait_for(lambda: scrape(sc).value("sidecar_workload_api_connected") == 0)
    time.sleep(1.0)  # several reconnects fail meanwhile
    assert admin_request(sc, "GET", "/readyz").status == 200  # the SVID is still valid
    assert tls_exchange(port, ctx) == b"ping" and peer_serial(port, ctx) == first.cert.serial_number
    live.sendall(b"during the outage")
    assert live.recv(100) == b"during the outage"
    assert certs(sc)["workload_api"]["connected"] is False
    renewed = new_svid(ca)
    agent.start().push(response(renewed, [ca.ca.cert]))
    wait_for(lambda: certs(sc)["identity"]["serial"] == serial_hex(renewed), 15)  # backoff: at most 10 s apart
    assert scrape(sc).value("sidecar_workload_api_connected") == 1
    assert peer_serial(port, ctx) == renewed.cert.serial_number
    live.sendall(b"after")
    assert live.recv(100) == b"after"
    live.close()
    lost = "Workload API stream lost; keeping the current certificates and reconnecting"
    assert (log_count(sc, lost), log_count(sc, "Workload API stream restored")) == (1, 1)


def test_ready_through_an_outage_until_the_svid_expires(
    orders: tuple[SidecarProcess, pki.Issued], agent: WorkloadAPIServer, ca: CertFactory
) -> None:
    sc, _ = orders
    now = datetime.now(UTC)
    short = new_svid(ca, not_before=now - timedelta(minutes=1), not_after=now + timedelta(seconds=5))
    agent.push(response(short, [ca.ca.cert]))
    wait_for(lambda: certs(sc)["identity"]["serial"] == serial_hex(short), ROTATION_BOUND)
    agent.stop()
    wait_for(lambda: scrape(sc).value("sidecar_workload_api_connected") == 0)
    assert admin_request(sc, "GET", "/readyz").status == 200  # agent gone, SVID still valid
    answer = wait_for(lambda: a if (a := admin_request(sc, "GET", "/readyz")).status == 503 else None, 10)
    assert datetime.now(UTC) >= short.cert.not_valid_after_utc
    assert answer.json()["reasons"] == [f"identity certificate expired at {short.cert.not_valid_after_utc.isoformat()}"]


def test_an_agent_that_never_answers_stops_run_with_exit_1_naming_the_socket(
    agent: WorkloadAPIServer, ca: CertFactory, backend: Backend, tmp_path: Path
) -> None:
    agent.silent = True
    agent.start().push(response(new_svid(ca), [ca.ca.cert]))
    cfg = wl_config(tmp_path / "orders.yaml", agent, inbound=orders_inbound(backend))
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "sidecar", "run", "-c", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "SIDECAR_WORKLOAD_API_TIMEOUT": "1"},
    )
    took = time.monotonic() - started
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (
        f"sidecar: tls.workload_api: no usable X.509-SVID from unix://{agent.socket} within 1 s "
        "(the agent sent no X.509-SVID)"
    )
    assert "Traceback" not in proc.stderr and '"msg":"ready"' not in proc.stderr
    assert agent.streams >= 1 and agent.sent == 0
    assert took < 30  # the environment shortened the 30 s deadline


@pytest.mark.parametrize("kind", ["key_not_matching", "no_svid"])
def test_a_malformed_update_keeps_the_material_in_use(
    orders: tuple[SidecarProcess, pki.Issued],
    agent: WorkloadAPIServer,
    ca: CertFactory,
    client_leaf: CertFiles,
    kind: str,
) -> None:
    sc, first = orders
    port, ctx = sc.port("orders"), client_context(client_leaf, ca.ca_file)
    bad = new_svid(ca)
    if kind == "key_not_matching":
        stray = ec.generate_private_key(ec.SECP256R1())
        agent.push(workload_pb2.X509SVIDResponse(svids=[svid_message(bad, [ca.ca.cert], key=stray)]))
        wait_for(lambda: scrape(sc).value("sidecar_workload_api_updates_total", result="refused") == 1)
        body = certs(sc)
        assert body["reloads"]["error"] == 1 and "does not match" in body["reloads"]["last_error"]
        assert "does not match" in body["workload_api"]["last_error"]
    else:  # the client library refuses it and ends the stream; the sidecar reconnects
        agent.push(empty_response([ca.ca.cert]))
        wait_for(lambda: certs(sc)["workload_api"]["disconnects"] >= 1)
    assert certs(sc)["identity"]["serial"] == serial_hex(first)
    assert peer_serial(port, ctx) == first.cert.serial_number and tls_exchange(port, ctx) == b"ping"
    good = new_svid(ca)
    agent.push(response(good, [ca.ca.cert]))
    wait_for(lambda: peer_serial(port, ctx) == good.cert.serial_number, 15)
    assert certs(sc)["workload_api"]["last_error"] is None


def test_every_worker_serves_each_pushed_svid(
    agent: WorkloadAPIServer,
    ca: CertFactory,
    backend: Backend,
    client_leaf: CertFiles,
    tmp_path: Path,
    sidecars: list[SidecarProcess],
) -> None:
    agent.start().push(response(new_svid(ca), [ca.ca.cert]))
    cfg = wl_config(tmp_path / "orders.yaml", agent, inbound=orders_inbound(backend), workers=2)
    sc = start_sidecar(cfg, env={"SIDECAR_WORKER_PUSH_TIMEOUT": "1"})
    sidecars.append(sc)
    port, ctx = sc.port("orders"), client_context(client_leaf, ca.ca_file)
    rotated = new_svid(ca)
    agent.push(response(rotated, [ca.ca.cert]))
    # The supervisor publishes (and /certs shows) an update only once every worker serves it.
    wait_for(lambda: certs(sc)["identity"]["serial"] == serial_hex(rotated), ROTATION_BOUND)
    connections = 40  # spread by the kernel's hash: the chance that one worker gets none is 2**-39
    assert {peer_serial(port, ctx) for _ in range(connections)} == {rotated.cert.serial_number}
    records = sc.wait_access(connections, "orders")
    assert {r["worker"] for r in records} == {0, 1}
    assert admin_request(sc, "POST", "/reload").status == 200  # rebuilt from the newest SVID, in every worker

    # A worker that does not confirm an update is named and restarted with it; the stream goes on.
    stuck = children(sc.proc.pid)[0]
    os.kill(stuck, signal.SIGSTOP)  # alive, but answers nothing
    try:
        third = new_svid(ca)
        agent.push(response(third, [ca.ca.cert]))
        wait_for(lambda: scrape(sc).value("sidecar_workload_api_updates_total", result="worker_error") == 1, 10)
    finally:
        with contextlib.suppress(ProcessLookupError):  # killed and reaped by then, as it should be
            os.kill(stuck, signal.SIGCONT)
    wait_for(lambda: stuck not in children(sc.proc.pid) and len(children(sc.proc.pid)) == 2, 10)
    wait_for(lambda: admin_request(sc, "GET", "/readyz").status == 200, 10)
    assert {peer_serial(port, ctx) for _ in range(connections)} == {third.cert.serial_number}
    s = scrape(sc)
    assert s.value("sidecar_workload_api_updates_total", result="ok") == 2
    assert s.value("sidecar_workload_api_connected") == 1
    assert s.value("sidecar_cert_reloads_total", result="ok") == 2  # the update and the POST
    assert agent.streams == 1  # only the supervisor holds the stream, and it never broke
