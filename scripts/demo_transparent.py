"""``make demo-transparent`` (root): ``sidecar demo``'s story in transparent mode, in network
namespaces, with a capture of the wire as proof.

Four namespaces joined by veth pairs: ``frontend`` and ``stranger`` (each an app with a sidecar
capturing its outgoing TCP), ``orders`` (an app on :8080 with a sidecar capturing incoming TCP) and
``legacy`` (an app with no sidecar at all). The apps are plain HTTP (``tests/httpapp.py``) and call
each other by address, ``http://<orders>:8080/``; nothing in them names a sidecar. It reuses the
namespace lab of the test suite (``tests/namespaces.py``, ``tests/meshlab.py``, ``tests/wire.py``),
exits 0 only when every step behaved, and removes every namespace, process and file it made.
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests")]

from meshlab import APP_PORT, IN_PORT, OUT_PORT, TD, Node, Wire, node, tcpdump_missing  # noqa: E402
from namespaces import lab, unavailable  # noqa: E402
from wire import RECORD_TYPES, TLS13, NotTLS, packets, server_hello_version, streams, tls_records  # noqa: E402

from sidecar import pki  # noqa: E402


class Failure(Exception):
    """A step did not behave; the message says what was expected."""


def head(text: str) -> None:
    print(f"\n{text}", flush=True)


def ok(text: str) -> None:
    print(f"   ok    {text}", flush=True)


def url(host: str, path: str = "/") -> str:
    return f"http://[{host}]:{APP_PORT}{path}" if ":" in host else f"http://{host}:{APP_PORT}{path}"


def expect(cond: bool, why: str) -> None:
    if not cond:
        raise Failure(why)


def last(n: Node, count: int) -> dict[str, Any]:
    return n.access(count)[-1]


def story() -> None:
    with lab() as made:
        head("1. Four network namespaces, each app unmodified: it calls its peers by their real address")
        frontend, orders, stranger, legacy = (node(made, name) for name in ("frontend", "orders", "stranger", "legacy"))
        to_orders = {n.name: made.link(n.ns, orders.ns) for n in (frontend, stranger, legacy)}
        addr = {name: (link.b_v4, link.b_v6) for name, link in to_orders.items()}
        for name, (v4, v6) in addr.items():
            ok(f"{name:9} -- veth -- orders at {v4} and [{v6}]")

        head("2. One identity per workload, and a sidecar per meshed namespace (sidecar pki, transparent:)")
        ca = pki.new_ca("demo mesh", trust_domain="mesh.local")
        for caller in (frontend, stranger):
            v4, v6 = addr[caller.name]
            routes = [
                {"to": f"{v4}/32:{APP_PORT}", "server_identity": [f"{TD}/orders"]},
                {"to": f"[{v6}]:{APP_PORT}", "server_identity": [f"{TD}/orders"]},
            ]
            caller.configure(ca, {"outbound": {"listen": f"127.0.0.1:{OUT_PORT}", "routes": routes}})
        ports = [{"port": APP_PORT, "allow": [f"{TD}/frontend"]}]
        orders.configure(ca, {"inbound": {"listen": f"0.0.0.0:{IN_PORT}", "ports": ports, "mode": "strict"}})
        before = {}
        for n in (frontend, stranger, orders):
            before[n.name] = n.nat_tables()
            said = n.iptables("install").strip().splitlines()
            ok(f"{n.name:9} sidecar iptables install: {said[0] if said else 'done'}")
        orders.start_app()
        legacy.start_app()
        for n in (orders, frontend, stranger):
            n.start_sidecar()
        ok("orders    app on 0.0.0.0:8080 <- capture :15006, strict, allow spiffe://mesh.local/frontend")
        ok("frontend  app -> capture :15001 -> mTLS to orders:8080, which must be spiffe://mesh.local/orders")
        ok("stranger  app -> capture :15001 -> the same route, with its own identity")
        ok("legacy    app, no sidecar, no rules")

        head("3. frontend's app calls http://<orders>:8080/ while tcpdump watches the wire")
        for family, host in zip(("IPv4", "IPv6"), addr["frontend"], strict=True):
            marker = f"/marker-{secrets.token_hex(6)}"
            pcap = frontend.dir / f"wire-{family}.pcap"
            with Wire(frontend.ns, to_orders["frontend"].a_dev, pcap):
                answer = frontend.get(url(host, marker))
            expect(answer.get("status") == 200, f"frontend's call over {family} failed: {answer}")
            body = answer["json"]
            ok(f"{family}: HTTP 200 from the {body['service']!r} app, which saw a plain request for {body['path']}")
            prove_wire(pcap, marker)
            out_rec, in_rec = last(frontend, 1 if family == "IPv4" else 2), last(orders, 1 if family == "IPv4" else 2)
            ok(
                f"frontend's sidecar: {out_rec['listener']} original_dst {out_rec['original_dst']}, "
                f"verified {out_rec['peer_identity']} ({out_rec['tls_version']})"
            )
            ok(
                f"orders' sidecar:   {in_rec['listener']} original_dst {in_rec['original_dst']}, "
                f"allowed {in_rec['peer_identity']}"
            )

        head("4. stranger's app makes the same call: a valid certificate, not on orders' allow list")
        served = len(orders.requests())
        answer = stranger.get(url(addr["stranger"][0]))
        expect("error" in answer, f"stranger reached orders: {answer}")
        denied = last(orders, 3)
        expect(denied["outcome"] == "denied", f"orders' sidecar did not deny stranger: {denied}")
        expect(len(orders.requests()) == served, "the orders app saw stranger's request")
        ok(f"stranger's app got no answer ({answer['error'].split(':')[0]}); orders' sidecar: outcome denied")
        ok(f"  reason: {denied['reason'][:90]}")
        ok("the orders app never saw it (its request log did not grow)")

        head("5. legacy, outside the mesh, calls http://<orders>:8080/ in plaintext")
        answer = legacy.get(url(addr["legacy"][0]))
        expect("error" in answer, f"a plaintext caller reached orders in strict mode: {answer}")
        refused = last(orders, 4)
        expect(refused["outcome"] == "tls_error", f"orders' sidecar did not refuse plaintext: {refused}")
        expect(len(orders.requests()) == served, "the orders app saw legacy's plaintext request")
        ok(
            f"refused by orders' sidecar (outcome {refused['outcome']}, {refused['handshake_error']}); "
            "the app saw nothing"
        )

        head("6. sidecar iptables remove")
        for n in (frontend, stranger, orders):
            n.stop_sidecar()
            n.iptables("remove")
            expect(n.nat_tables() == before[n.name], f"{n.name}: the nat tables differ from before install")
        ok("every nat table is as it was before install")


def prove_wire(pcap: Path, marker: str) -> None:
    flows = streams(pcap)
    expect(bool(flows), "tcpdump saw nothing on the wire")
    count = len(packets(pcap))
    kinds: set[str] = set()
    version = None
    for flow, data in flows.items():
        try:
            records = tls_records(data)
        except NotTLS as exc:
            raise Failure(f"{flow}: plaintext on the wire: {exc}") from None
        kinds |= {RECORD_TYPES[k] for k, _ in records}
        version = server_hello_version(records) or version
    expect(version == TLS13, f"the ServerHello did not select TLS 1.3: {version}")
    leaks = sum(marker.encode() in payload for _, _, payload in packets(pcap))
    expect(leaks == 0, f"the request path {marker} crossed the wire in plaintext")
    ok(f"wire: {count} TCP segments with data, every byte a TLS record ({', '.join(sorted(kinds))})")
    ok(f"wire: the ServerHello selected TLS 1.3; {marker} appears 0 times")


def main() -> int:
    why = (
        ("needs root (network namespaces, iptables)" if os.geteuid() != 0 else None)
        or unavailable()
        or tcpdump_missing()
    )
    if why is not None:
        print(f"demo-transparent: {why}", file=sys.stderr)
        return 2
    try:
        story()
    except (Failure, RuntimeError, TimeoutError) as exc:
        print(f"   FAIL  {exc}", flush=True)
        print("\ndemo FAILED: see the step marked FAIL above")
        return 1
    print("\ndemo passed: unmodified apps, captured calls over mTLS (TLS 1.3 on the wire), refusals, rules removed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
