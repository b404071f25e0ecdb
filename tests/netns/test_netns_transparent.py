"""Transparent mode end to end, in network namespaces: apps that call each other by their real
address, sidecars in capture mode, the nat rules of ``sidecar iptables install``, tcpdump on the wire.

Layout: ``frontend`` (client app, outbound capture), ``orders`` (server app on :8080, inbound
capture) and ``legacy`` (unmeshed: a plain app on :8080 and a plain client, no sidecar), each pair
joined by a veth pair. The apps run as uid 10002 and know nothing of TLS; each sidecar runs as
``transparent.uid`` 10001. The namespaces, rules and the two sidecars are made once for the module;
a test that needs another config restarts a sidecar with it and puts the default one back.
"""

from __future__ import annotations

import secrets
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from meshlab import APP_PORT, APP_UID, IN_PORT, OUT_PORT, TD, Node, Wire, node, tcpdump_missing
from namespaces import Lab, Link, lab, leftovers, unavailable
from wire import NotTLS, packets, streams, tls13_problems, tls_records

from sidecar import pki

pytestmark = pytest.mark.netns


@dataclass
class Mesh:
    frontend: Node
    orders: Node
    legacy: Node
    front_orders: Link  # frontend .1 -- orders .2
    legacy_orders: Link  # legacy .1 -- orders .2
    front_legacy: Link  # frontend .1 -- legacy .2
    ca: pki.Issued

    def client_config(self, *, unmatched: str = "passthrough", identity: str = "frontend") -> None:
        orders = [f"{TD}/orders"]
        routes = [
            {"to": f"{self.front_orders.b_v4}/32:{APP_PORT}", "server_identity": orders},
            {"to": f"[{self.front_orders.b_v6}]:{APP_PORT}", "server_identity": orders},
        ]
        outbound = {"listen": f"127.0.0.1:{OUT_PORT}", "routes": routes, "unmatched": unmatched}
        self.frontend.configure(self.ca, {"outbound": outbound}, identity)

    def server_config(self, *, mode: str = "strict") -> None:
        ports = [{"port": APP_PORT, "allow": [f"{TD}/frontend"]}]
        self.orders.configure(self.ca, {"inbound": {"listen": f"0.0.0.0:{IN_PORT}", "ports": ports, "mode": mode}})

    def restart(self, who: Node) -> None:
        who.stop_sidecar()
        who.start_sidecar()


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    why = unavailable() or tcpdump_missing()
    if why is not None:
        pytest.skip(f"network namespaces unavailable: {why}")
    with lab() as made:
        yield from _mesh(made)
    assert leftovers() == [], "a namespace outlived its test"


def _mesh(made: Lab) -> Iterator[Mesh]:
    frontend, orders, legacy = node(made, "frontend"), node(made, "orders"), node(made, "legacy")
    mesh = Mesh(
        frontend,
        orders,
        legacy,
        made.link(frontend.ns, orders.ns),
        made.link(legacy.ns, orders.ns),
        made.link(frontend.ns, legacy.ns),
        pki.new_ca("transparent mesh", trust_domain="mesh.local"),
    )
    before = {n.name: n.nat_tables() for n in (frontend, orders)}
    mesh.client_config()
    mesh.server_config()
    for n in (frontend, orders):
        n.iptables("install")
    orders.start_app()
    legacy.start_app()
    frontend.start_sidecar()
    orders.start_sidecar()
    yield mesh
    for n in (frontend, orders):
        n.stop_sidecar()
        n.iptables("remove")
        assert n.nat_tables() == before[n.name], f"{n.name}: remove left the nat tables changed"


def url(host: str, path: str = "/") -> str:
    return f"http://[{host}]:{APP_PORT}{path}" if ":" in host else f"http://{host}:{APP_PORT}{path}"


def dst(host: str, port: int = APP_PORT) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def new_records(n: Node, before: int, count: int = 1) -> list[dict[str, Any]]:
    return n.access(before + count)[before:]


# -- the meshed call -----------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_the_app_calls_its_peer_by_address_and_only_tls13_crosses_the_wire(
    mesh: Mesh, tmp_path: Path, family: str
) -> None:
    server = mesh.front_orders.b_v4 if family == "ipv4" else mesh.front_orders.b_v6
    marker = f"/h12-plaintext-marker-{secrets.token_hex(8)}"
    seen_front, seen_orders, served = (
        len(mesh.frontend.access()),
        len(mesh.orders.access()),
        len(mesh.orders.requests()),
    )
    pcap = mesh.frontend.dir / f"wire-{family}.pcap"
    with Wire(mesh.frontend.ns, mesh.front_orders.a_dev, pcap):
        answer = mesh.frontend.get(url(server, marker))
    assert answer.get("status") == 200, answer
    assert answer["json"] == {"service": "orders", "path": marker}  # the server app's own answer
    assert [r["path"] for r in mesh.orders.requests()[served:]] == [marker]
    assert mesh.orders.requests()[-1]["client"] == "127.0.0.1"  # forwarded by its sidecar

    # the wire: TCP to the server's real port, every byte of it TLS records, TLS 1.3, no plaintext
    flows = streams(pcap)
    assert flows, "nothing was captured on the wire"
    assert tls13_problems(flows, APP_PORT) == []
    for _, _, payload in packets(pcap):
        assert marker.encode() not in payload and b"orders" not in payload

    (out,) = new_records(mesh.frontend, seen_front)
    assert (out["listener"], out["direction"], out["outcome"]) == ("transparent-outbound", "outbound", "ok")
    assert out["original_dst"] == dst(server)
    assert (out["peer_identity"], out["tls_version"]) == (f"{TD}/orders", "TLSv1.3")
    (inb,) = new_records(mesh.orders, seen_orders)
    assert (inb["listener"], inb["direction"], inb["outcome"]) == ("transparent-inbound", "inbound", "ok")
    assert inb["original_dst"] == dst(server)
    assert inb["peer_identity"] == f"{TD}/frontend"


# -- who may reach the app -----------------------------------------------------------------------


def test_an_unmeshed_caller_is_refused_in_strict_mode_and_answered_in_permissive(mesh: Mesh) -> None:
    server = mesh.legacy_orders.b_v4
    seen, served = len(mesh.orders.access()), len(mesh.orders.requests())
    refused = mesh.legacy.get(url(server, "/plaintext"))
    assert "error" in refused, refused
    (rec,) = new_records(mesh.orders, seen)
    assert (rec["listener"], rec["outcome"], rec["original_dst"]) == ("transparent-inbound", "tls_error", dst(server))
    assert len(mesh.orders.requests()) == served  # the app never saw it

    mesh.server_config(mode="permissive")
    mesh.restart(mesh.orders)
    try:
        seen = len(mesh.orders.access())
        for host in (server, mesh.legacy_orders.b_v6):
            answer = mesh.legacy.get(url(host, "/plaintext"))
            assert answer.get("status") == 200 and answer["json"]["service"] == "orders", answer
        meshed = mesh.frontend.get(url(mesh.front_orders.b_v4, "/meshed"))
        assert meshed.get("status") == 200, meshed
        records = new_records(mesh.orders, seen, 3)
        assert [(r["outcome"], r["peer_identity"]) for r in records] == [
            ("passthrough", None),
            ("passthrough", None),
            ("ok", f"{TD}/frontend"),
        ]
        assert [r["original_dst"] for r in records] == [
            dst(server),
            dst(mesh.legacy_orders.b_v6),
            dst(mesh.front_orders.b_v4),
        ]
    finally:
        mesh.server_config()
        mesh.restart(mesh.orders)


def test_a_caller_whose_identity_is_not_allowed_never_reaches_the_app(mesh: Mesh) -> None:
    mesh.client_config(identity="stranger")
    mesh.restart(mesh.frontend)
    try:
        seen, served = len(mesh.orders.access()), len(mesh.orders.requests())
        answer = mesh.frontend.get(url(mesh.front_orders.b_v4, "/stranger"))
        assert "error" in answer, answer
        (rec,) = new_records(mesh.orders, seen)
        assert (rec["outcome"], rec["peer_identity"]) == ("denied", f"{TD}/stranger")
        assert len(mesh.orders.requests()) == served
    finally:
        mesh.client_config()
        mesh.restart(mesh.frontend)


def test_a_connection_straight_to_a_capture_port_is_refused(mesh: Mesh) -> None:
    seen_orders, seen_front = len(mesh.orders.access()), len(mesh.frontend.access())
    for host in (mesh.legacy_orders.b_v4, mesh.legacy_orders.b_v6):
        answer = mesh.legacy.get(f"http://{dst(host, IN_PORT)}/")
        assert "error" in answer, answer
    answer = mesh.frontend.get(f"http://127.0.0.1:{OUT_PORT}/")
    assert "error" in answer, answer
    inbound = new_records(mesh.orders, seen_orders, 2)
    assert {(r["outcome"], r["reason"], r["original_dst"]) for r in inbound} == {("denied", "not_redirected", None)}
    (outbound,) = new_records(mesh.frontend, seen_front)
    assert (outbound["outcome"], outbound["reason"]) == ("denied", "not_redirected")


# -- destinations without a route ----------------------------------------------------------------


def test_unmatched_destinations_pass_through_or_are_denied(mesh: Mesh) -> None:
    legacy = mesh.front_legacy.b_v4
    seen, served = len(mesh.frontend.access()), len(mesh.legacy.requests())
    marker = f"/h12-plaintext-marker-{secrets.token_hex(8)}"
    pcap = mesh.frontend.dir / "wire-passthrough.pcap"
    with Wire(mesh.frontend.ns, mesh.front_legacy.a_dev, pcap):
        answer = mesh.frontend.get(url(legacy, marker))  # unmatched: passthrough (the default)
    assert answer.get("status") == 200 and answer["json"]["service"] == "legacy", answer
    # the wire check's control: plain TCP let through is seen as such (the marker, and not TLS)
    assert any(marker.encode() in payload for _, _, payload in packets(pcap))
    for data in streams(pcap).values():
        with pytest.raises(NotTLS):
            tls_records(data)
    (rec,) = new_records(mesh.frontend, seen)
    assert (rec["listener"], rec["outcome"], rec["original_dst"]) == (
        "transparent-outbound",
        "passthrough",
        dst(legacy),
    )
    assert rec["peer_identity"] is None and rec["bytes_to_upstream"] > 0
    assert len(mesh.legacy.requests()) == served + 1

    mesh.client_config(unmatched="deny")
    mesh.restart(mesh.frontend)
    try:
        seen = len(mesh.frontend.access())
        for host in (legacy, mesh.front_legacy.b_v6):
            answer = mesh.frontend.get(url(host, "/denied"))
            assert "error" in answer, answer
        records = new_records(mesh.frontend, seen, 2)
        assert [(r["outcome"], r["reason"]) for r in records] == [("denied", "no_route")] * 2
        assert len(mesh.legacy.requests()) == served + 1  # nothing more reached it
        meshed = mesh.frontend.get(url(mesh.front_orders.b_v4, "/routed"))  # a route still works under deny
        assert meshed.get("status") == 200, meshed
    finally:
        mesh.client_config()
        mesh.restart(mesh.frontend)


def test_the_sidecar_refuses_to_run_as_another_uid(mesh: Mesh) -> None:
    assert mesh.frontend.config is not None
    for uid in (APP_UID, None):  # the app's uid, and root
        run = mesh.frontend.ns.run(
            sys.executable, "-m", "sidecar", "run", "-c", str(mesh.frontend.config), uid=uid, check=False, timeout=60
        )
        assert run.returncode == 2, run.stderr
        assert run.stderr.startswith("sidecar: transparent.uid: the sidecar runs as uid"), run.stderr
