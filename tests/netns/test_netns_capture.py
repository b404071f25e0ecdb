"""Capture proved on real packets: after ``sidecar iptables install`` in a namespace, a listener on
the capture ports reads each connection's original destination (``sidecar.origdst``), IPv4 and
IPv6, from plain sockets and from uvloop transports; the sidecar's uid, loopback, ``exclude`` and the
admin port are not captured; a connection made straight to a capture port has no original destination.

Layout: namespace ``app`` (rules installed, capture listeners) joined by a veth pair to ``peer``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from namespaces import Lab, Link, Namespace

pytestmark = pytest.mark.netns

SIDECAR_UID = 10001
APP_UID = 10002
OUT, IN = 15001, 15006


def write_config(path: Path, link: Link, *, inbound_listen: str = "0.0.0.0:15006") -> Path:
    cfg = {
        "tls": {"cert": "cert.pem", "key": "key.pem", "ca": "ca.pem"},  # not read by `sidecar iptables`
        "admin": {"listen": "127.0.0.1:9901"},
        "transparent": {
            "uid": SIDECAR_UID,
            "outbound": {
                "listen": f"127.0.0.1:{OUT}",
                "exclude": [f"{link.b_v4}/32:9999", f"[{link.b_v6}/128]:9999"],
            },
            "inbound": {"listen": inbound_listen, "ports": [{"port": 8080, "allow": ["*"]}]},
        },
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def setup(netlab: Lab, tmp_path: Path, **kw: Any) -> tuple[Namespace, Namespace, Link]:
    app, peer = netlab.namespace("app"), netlab.namespace("peer")
    link = netlab.link(app, peer)
    installed = app.sidecar("iptables", "install", "-c", str(write_config(tmp_path / "h12-sidecar.yaml", link, **kw)))
    assert installed.returncode == 0, installed.stderr
    # Something real listens on the peer's ports, so a connection that is not captured is answered there.
    peer.start(
        sys.executable,
        str(Path(__file__).with_name("probe.py")),
        "listen",
        "peer-8080=0.0.0.0:8080",
        "peer-8080=[::]:8080",
        "peer-9999=0.0.0.0:9999",
        "peer-9999=[::]:9999",
        "peer-9901=0.0.0.0:9901",
        ready="ready",
    )
    return app, peer, link


def start_capture(app: Namespace, *specs: str, uvloop: bool = False) -> None:
    probe = str(Path(__file__).with_name("probe.py"))
    app.start(sys.executable, probe, "listen", *specs, *(["--uvloop"] if uvloop else []), ready="ready")


def connect(ns: Namespace, host: str, port: int, uid: int | None = APP_UID) -> dict[str, Any]:
    done = ns.python("netns/probe.py", "connect", host, str(port), uid=uid, check=False)
    assert done.stdout.strip(), done.stderr
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer


CAPTURE = (f"out=127.0.0.1:{OUT}", f"out=[::1]:{OUT}", f"in=0.0.0.0:{IN}", f"in=[::]:{IN}")


@pytest.mark.parametrize("uvloop", [False, True], ids=["socket", "uvloop"])
def test_outbound_and_inbound_original_destinations(netlab: Lab, tmp_path: Path, uvloop: bool) -> None:
    app, peer, link = setup(netlab, tmp_path)
    start_capture(app, *CAPTURE, uvloop=uvloop)

    for host in (link.b_v4, link.b_v6):  # the app calls the peer by its real address
        got = connect(app, host, 8080)
        assert got["listener"] == "out", got
        assert got["original_dst"] == [host, 8080]

    got = connect(app, link.b_v4, 5432)  # any port: all outgoing TCP is captured
    assert got["listener"] == "out" and got["original_dst"] == [link.b_v4, 5432]

    for host in (link.a_v4, link.a_v6):  # the peer calls the app's port
        got = connect(peer, host, 8080)
        assert got["listener"] == "in", got
        assert got["original_dst"] == [host, 8080]
        assert got["peer"][0] in (link.b_v4, link.b_v6)


def test_a_connection_straight_to_a_capture_port_is_not_redirected(netlab: Lab, tmp_path: Path) -> None:
    app, peer, link = setup(netlab, tmp_path)
    start_capture(app, *CAPTURE)
    for ns, host, port in (
        (app, "127.0.0.1", OUT),
        (app, "::1", OUT),
        (peer, link.a_v4, IN),
        (peer, link.a_v6, IN),
    ):
        got = connect(ns, host, port)
        assert got["listener"] in ("out", "in") and got["original_dst"] is None, (host, port, got)


def test_what_is_never_captured(netlab: Lab, tmp_path: Path) -> None:
    app, peer, link = setup(netlab, tmp_path)
    start_capture(app, *CAPTURE, "local-8080=127.0.0.1:8080")

    for host in (link.b_v4, link.b_v6):
        own = connect(app, host, 8080, uid=SIDECAR_UID)  # the sidecar's own connections
        assert own["listener"] == "peer-8080", own
        captured = connect(app, host, 8080, uid=APP_UID)  # the same call from the app is captured
        assert captured["listener"] == "out", captured
        excluded = connect(app, host, 9999)  # transparent.outbound.exclude
        assert excluded["listener"] == "peer-9999", excluded
    admin = connect(app, link.b_v4, 9901)  # the admin port
    assert admin["listener"] == "peer-9901", admin
    local = connect(app, "127.0.0.1", 8080)  # loopback
    assert local["listener"] == "local-8080" and local["original_dst"] is None, local
    own_address = connect(app, link.a_v4, IN)  # this host's own address leaves through lo: not captured
    assert own_address["listener"] == "in" and own_address["original_dst"] is None, own_address
    inbound_other_port = connect(peer, link.a_v4, 9999)  # only the listed app ports are captured inbound
    assert "error" in inbound_other_port, inbound_other_port


def test_ipv4_on_a_dual_stack_inbound_listener(netlab: Lab, tmp_path: Path) -> None:
    app, peer, link = setup(netlab, tmp_path, inbound_listen=f"[::]:{IN}")
    start_capture(app, f"out=127.0.0.1:{OUT}", f"in=[::]:{IN},dual")
    got = connect(peer, link.a_v4, 8080)
    assert got["listener"] == "in", got
    assert got["original_dst"] == [link.a_v4, 8080]
    assert got["peer"][0] == f"::ffff:{link.b_v4}"
    got6 = connect(peer, link.a_v6, 8080)
    assert got6["original_dst"] == [link.a_v6, 8080]
