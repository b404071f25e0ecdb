"""A transparent route with ``tunnel: hbone``, end to end in network namespaces: the client app calls
its peer by address, its sidecar captures the call and carries it as a CONNECT stream on one pooled
mTLS tunnel to port 15008 of that address, where the peer's ``hbone`` listener hands it to the app.

Layout: ``frontend`` (client app as uid 10002; sidecar as ``transparent.uid`` 10001 with
``transparent.outbound`` and the nat rules of ``sidecar iptables install``) joined by a veth pair
to ``orders`` (the app on :8080; a sidecar with only an ``hbone`` listener on :15008, no capture).
tcpdump on frontend's end of the veth shows what crosses it.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from meshlab import APP_PORT, OUT_PORT, TD, Node, Wire, node, tcpdump_missing
from namespaces import Link, lab, leftovers, unavailable
from wire import packets, streams, tls13_problems

from sidecar import pki

pytestmark = pytest.mark.netns

PREFIX = "h17-"
HBONE_PORT = 15008
UNLISTED_PORT = 8081  # routed through the tunnel, but not in the peer's hbone.ports


@dataclass
class Pair:
    frontend: Node
    orders: Node
    link: Link


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    why = unavailable() or tcpdump_missing()
    if why is not None:
        pytest.skip(f"network namespaces unavailable: {why}")
    with lab(PREFIX) as made:
        frontend, orders = node(made, "frontend"), node(made, "orders")
        link = made.link(frontend.ns, orders.ns)
        ca = pki.new_ca("hbone mesh", trust_domain="mesh.local")
        route = {"to": f"{link.b_v4}/32:*", "server_identity": [f"{TD}/orders"], "tunnel": {"protocol": "hbone"}}
        outbound = {"listen": f"127.0.0.1:{OUT_PORT}", "routes": [route], "unmatched": "deny"}
        frontend.configure(ca, {"outbound": outbound})
        hbone = {"listen": f"0.0.0.0:{HBONE_PORT}", "ports": [{"port": APP_PORT, "allow": [f"{TD}/frontend"]}]}
        orders.configure(ca, None, hbone=hbone)
        frontend.iptables("install")
        orders.start_app()
        frontend.start_sidecar()
        orders.start_sidecar()
        yield Pair(frontend, orders, link)
        frontend.stop_sidecar()
        orders.stop_sidecar()
        frontend.iptables("remove")
    assert leftovers(PREFIX) == [], "a namespace outlived its test"


def test_the_apps_calls_cross_the_wire_as_one_tls_connection_to_port_15008(pair: Pair) -> None:
    server = pair.link.b_v4
    markers = [f"/h17-plaintext-marker-{secrets.token_hex(8)}" for _ in range(3)]
    seen_front, seen_orders, served = (
        len(pair.frontend.access()),
        len(pair.orders.access()),
        len(pair.orders.requests()),
    )
    pcap = pair.frontend.dir / "wire-hbone.pcap"
    with Wire(pair.frontend.ns, pair.link.a_dev, pcap):
        answers = [pair.frontend.get(f"http://{server}:{APP_PORT}{m}") for m in markers]
        refused = pair.frontend.get(f"http://{server}:{UNLISTED_PORT}/")
    for marker, answer in zip(markers, answers, strict=True):
        assert answer.get("status") == 200, answer
        assert answer["json"] == {"service": "orders", "path": marker}  # the server app's own answer
    assert "error" in refused, refused
    requests = pair.orders.requests()[served:]
    assert [r["path"] for r in requests] == markers
    assert {r["client"] for r in requests} == {"127.0.0.1"}  # dialled by the hbone listener

    # the wire: one TCP connection, to port 15008, every byte of it TLS 1.3 records, no plaintext
    flows = streams(pcap)
    assert {(f.dst, f.dport) for f in flows if f.sport != HBONE_PORT} == {(server, HBONE_PORT)}, flows
    assert len(flows) == 2, flows  # one connection: its two directions
    assert tls13_problems(flows, HBONE_PORT) == []
    for _, _, payload in packets(pcap):
        assert not any(m.encode() in payload for m in markers)
        assert b"CONNECT" not in payload and b"orders" not in payload

    ours = pair.frontend.access(seen_front + 4)[seen_front:]
    assert [(r["listener"], r["outcome"], r["original_dst"]) for r in ours] == [
        ("transparent-outbound", "ok", f"{server}:{APP_PORT}"),
    ] * 3 + [("transparent-outbound", "upstream_error", f"{server}:{UNLISTED_PORT}")]
    assert {(r["peer_identity"], r["tls_version"]) for r in ours[:3]} == {(f"{TD}/orders", "TLSv1.3")}
    assert "403" in ours[3]["reason"]
    theirs = pair.orders.access(seen_orders + 4)[seen_orders:]
    assert [(r["listener"], r["outcome"], r["peer_identity"]) for r in theirs] == [
        ("hbone", "ok", f"{TD}/frontend"),
    ] * 3 + [("hbone", "denied", f"{TD}/frontend")]
