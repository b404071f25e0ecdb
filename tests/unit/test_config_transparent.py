"""Tests for the ``transparent`` section of sidecar.config (contract section 8).

Pure parsing: every bad value is refused with a message that starts with its YAML path.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest

from sidecar.config import (
    Address,
    Destination,
    InboundMode,
    Transparent,
    Unmatched,
    parse,
    parse_destination,
)
from sidecar.errors import ConfigError
from sidecar.proxy_protocol import Mode as ProxyProtocolMode

BASE = Path("/etc/sidecar")
TLS = {"cert": "cert.pem", "key": "key.pem", "ca": "ca.pem"}


def section(**overrides: Any) -> dict[str, Any]:
    t: dict[str, Any] = {
        "uid": 10001,
        "outbound": {
            "listen": "127.0.0.1:15001",
            "routes": [{"to": "10.0.0.0/8:8080", "server_identity": ["spiffe://mesh.local/orders"]}],
        },
        "inbound": {"listen": "0.0.0.0:15006", "ports": [{"port": 8080, "allow": ["spiffe://mesh.local/frontend"]}]},
    }
    t.update(overrides)
    return t


def load_transparent(t: Any, **top: Any) -> Transparent:
    cfg = parse({"tls": TLS, "transparent": t, **top}, base_dir=BASE)
    assert cfg.transparent is not None
    return cfg.transparent


def error(t: Any, **top: Any) -> str:
    with pytest.raises(ConfigError) as info:
        parse({"tls": TLS, "transparent": t, **top}, base_dir=BASE)
    return str(info.value)


def test_the_contract_example_parses_with_its_defaults() -> None:
    t = load_transparent(
        {
            "uid": 10001,
            "outbound": {
                "listen": "127.0.0.1:15001",
                "routes": [
                    {
                        "to": "10.0.0.0/8:8080",
                        "server_identity": ["spiffe://mesh.local/orders"],
                        "sni": "orders.mesh.local",
                    }
                ],
                "unmatched": "passthrough",
                "exclude": ["169.254.169.254/32"],
            },
            "inbound": {
                "listen": "0.0.0.0:15006",
                "ports": [{"port": 8080, "allow": ["spiffe://mesh.local/frontend"]}],
                "mode": "strict",
            },
        }
    )
    assert t.uid == 10001
    assert t.outbound is not None and t.inbound is not None
    assert t.outbound.listen == Address("127.0.0.1", 15001)
    [route] = t.outbound.routes
    assert route.to == Destination(ipaddress.ip_network("10.0.0.0/8"), None, 8080)
    assert [p.text for p in route.server_identity or ()] == ["spiffe://mesh.local/orders"]
    assert route.sni == route.server_name == "orders.mesh.local"
    assert t.outbound.unmatched is Unmatched.PASSTHROUGH
    assert t.outbound.exclude == (Destination(ipaddress.ip_network("169.254.169.254/32"), None, None),)
    assert t.inbound.listen == Address("0.0.0.0", 15006)
    assert t.inbound.mode is InboundMode.STRICT
    assert t.inbound.port(8080) is not None and t.inbound.port(8081) is None
    assert [p.text for p in t.inbound.ports[0].allow] == ["spiffe://mesh.local/frontend"]


def test_defaults_are_passthrough_strict_and_no_exclusions() -> None:
    t = load_transparent(section(outbound={"listen": "127.0.0.1:15001"}))
    assert t.outbound is not None and t.inbound is not None
    assert t.outbound.routes == () and t.outbound.exclude == ()
    assert t.outbound.unmatched is Unmatched.PASSTHROUGH
    assert t.inbound.mode is InboundMode.STRICT


def test_with_transparent_the_listener_lists_may_be_empty() -> None:
    cfg = parse({"tls": TLS, "transparent": section(), "inbound": [], "outbound": []}, base_dir=BASE)
    assert cfg.inbound == () and cfg.outbound == () and cfg.transparent is not None


def test_without_transparent_a_listener_is_still_required() -> None:
    with pytest.raises(ConfigError, match="at least one listener"):
        parse({"tls": TLS}, base_dir=BASE)


def test_either_direction_alone_is_enough_but_not_neither() -> None:
    assert load_transparent({"uid": 7, "inbound": section()["inbound"]}).outbound is None
    assert load_transparent({"uid": 7, "outbound": section()["outbound"]}).inbound is None
    assert error({"uid": 7}) == "transparent: give inbound, outbound or both"


@pytest.mark.parametrize(
    ("value", "where"),
    [
        ({**section(), "tunnel": 1}, "transparent.tunnel"),
        (section(outbound={"listen": "127.0.0.1:15001", "route": []}), "transparent.outbound.route"),
        (section(outbound={"listen": "127.0.0.1:15001", "routes": [{"to": "1.2.3.4:1", "sn": "x"}]}),
         "transparent.outbound.routes[0].sn"),
        (section(inbound={"listen": "0.0.0.0:15006", "ports": [{"port": 1, "allow": ["*"], "forward": "x"}]}),
         "transparent.inbound.ports[0].forward"),
    ],
)  # fmt: skip
def test_unknown_keys_are_named(value: Any, where: str) -> None:
    assert error(value).startswith(f"{where}: unknown key")


@pytest.mark.parametrize(
    ("uid", "needle"),
    [(0, "non-root"), (-1, "non-root"), ("10001", "non-root"), (True, "non-root"), (2**32 - 1, "non-root")],
)
def test_uid_must_be_a_non_root_uid(uid: Any, needle: str) -> None:
    message = error(section(uid=uid))
    assert message.startswith("transparent.uid: ") and needle in message


def test_uid_is_required() -> None:
    t = section()
    del t["uid"]
    assert error(t) == "transparent.uid: required"


@pytest.mark.parametrize(
    ("listen", "needle"),
    [
        ("127.0.0.1:0", "must be fixed"),
        ("10.1.2.3:15001", "127.0.0.1:15001"),
        ("localhost:15001", "REDIRECT delivers"),
        ("15001", "host:port"),
    ],
)
def test_outbound_capture_listen_is_loopback_or_wildcard_with_a_fixed_port(listen: str, needle: str) -> None:
    message = error(section(outbound={"listen": listen}))
    assert message.startswith("transparent.outbound.listen: ") and needle in message


@pytest.mark.parametrize("listen", ["127.0.0.1:15001", "0.0.0.0:15001", "[::1]:15001", "[::]:15001"])
def test_outbound_capture_listen_forms(listen: str) -> None:
    t = load_transparent(section(outbound={"listen": listen}))
    assert t.outbound is not None and t.outbound.listen.port == 15001


@pytest.mark.parametrize(("listen", "ok"), [("0.0.0.0:15006", True), ("[::]:15006", True), ("127.0.0.1:15006", False)])
def test_inbound_capture_listen_must_be_a_wildcard(listen: str, ok: bool) -> None:
    t = section(inbound={"listen": listen, "ports": [{"port": 8080, "allow": ["*"]}]})
    if ok:
        load_transparent(t)
    else:
        assert error(t).startswith("transparent.inbound.listen: REDIRECT delivers")


# -- route destinations ---------------------------------------------------------------------------


def net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.0/8:8080", Destination(net("10.0.0.0/8"), None, 8080)),
        ("10.1.2.3:443", Destination(net("10.1.2.3/32"), None, 443)),
        ("10.1.2.3:*", Destination(net("10.1.2.3/32"), None, None)),
        ("0.0.0.0/0:*", Destination(net("0.0.0.0/0"), None, None)),
        ("[fd00::2]:8080", Destination(net("fd00::2/128"), None, 8080)),
        ("[fd00::/64]:*", Destination(net("fd00::/64"), None, None)),
        ("[::1]:1", Destination(net("::1/128"), None, 1)),
        ("orders.mesh.local:8080", Destination(None, "orders.mesh.local", 8080)),
        ("Orders.Mesh.Local.:*", Destination(None, "orders.mesh.local", None)),
        ("localhost:80", Destination(None, "localhost", 80)),
        (" db_1.internal:5432 ", Destination(None, "db_1.internal", 5432)),
    ],
)
def test_route_to_forms(text: str, expected: Destination) -> None:
    assert parse_destination(text, "r.to", names=True, port_required=True) == expected


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("10.0.0.0/8", "add the port"),
        ("orders.mesh.local", "add the port"),
        ("fd00::2:8080", "brackets"),
        ("[fd00::2]", "add the port"),
        ("[10.0.0.1]:80", "IPv6 only"),
        ("[fd00::2]8080", "expected"),
        ("10.0.0.1/8:80", "host bits set; did you mean 10.0.0.0/8?"),
        ("10.0.0.0/33:80", "not an IP address or CIDR"),
        ("10.0.0:80", "not an IP address or CIDR"),
        ("10.0.0.1:0", "port from 1 to 65535"),
        ("10.0.0.1:65536", "port from 1 to 65535"),
        ("10.0.0.1:http", "port from 1 to 65535"),
        ("-bad-.mesh:80", "neither"),
        ("a..b:80", "neither"),
        ("", "expected"),
        (8080, "expected"),
    ],
)
def test_bad_route_to_is_named(text: Any, needle: str) -> None:
    t = section(outbound={"listen": "127.0.0.1:15001", "routes": [{"to": "10.9.9.9:1", "sni": "x"}, {"to": text}]})
    message = error(t)
    assert message.startswith("transparent.outbound.routes[1].to: ") and needle in message, message


def test_a_route_to_an_ip_needs_server_identity_or_sni_and_a_named_one_does_not() -> None:
    bare = {"listen": "127.0.0.1:15001", "routes": [{"to": "10.0.0.0/8:8080"}]}
    assert error(section(outbound=bare)).startswith("transparent.outbound.routes[0].server_identity: required")
    named = load_transparent(section(outbound={"listen": "127.0.0.1:15001", "routes": [{"to": "orders.mesh:8080"}]}))
    assert named.outbound is not None
    [route] = named.outbound.routes
    assert route.server_identity is None and route.server_name == "orders.mesh"
    with_sni = {"listen": "127.0.0.1:15001", "routes": [{"to": "10.0.0.0/8:8080", "sni": "orders.mesh"}]}
    sni_route = load_transparent(section(outbound=with_sni)).outbound
    assert sni_route is not None and sni_route.routes[0].server_name == "orders.mesh"


def test_empty_route_server_identity_and_bad_patterns_are_named() -> None:
    empty = {"listen": "127.0.0.1:15001", "routes": [{"to": "a.b:1", "server_identity": []}]}
    assert error(section(outbound=empty)).startswith("transparent.outbound.routes[0].server_identity: must not be")
    bad = {"listen": "127.0.0.1:15001", "routes": [{"to": "a.b:1", "server_identity": ["*", "spiffe://x/a*b"]}]}
    assert error(section(outbound=bad)).startswith("transparent.outbound.routes[0].server_identity[1]: ")


def test_unmatched_choices() -> None:
    deny = load_transparent(section(outbound={"listen": "127.0.0.1:15001", "unmatched": "deny"})).outbound
    assert deny is not None and deny.unmatched is Unmatched.DENY
    message = error(section(outbound={"listen": "127.0.0.1:15001", "unmatched": "allow"}))
    assert message == "transparent.outbound.unmatched: expected one of passthrough|deny, got 'allow'"


# -- exclude ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("169.254.169.254/32", Destination(net("169.254.169.254/32"), None, None)),
        ("169.254.169.254", Destination(net("169.254.169.254/32"), None, None)),
        ("10.0.0.0/8:5432", Destination(net("10.0.0.0/8"), None, 5432)),
        ("10.0.0.0/8:*", Destination(net("10.0.0.0/8"), None, None)),
        ("fd00::/64", Destination(net("fd00::/64"), None, None)),
        ("[fd00::/64]", Destination(net("fd00::/64"), None, None)),
        ("[fd00::/64]:443", Destination(net("fd00::/64"), None, 443)),
    ],
)
def test_exclude_forms(text: str, expected: Destination) -> None:
    t = load_transparent(section(outbound={"listen": "127.0.0.1:15001", "exclude": [text]}))
    assert t.outbound is not None and t.outbound.exclude == (expected,)


@pytest.mark.parametrize(
    ("text", "needle"), [("metadata.internal", "host names are not allowed"), ("10.0.0.1/8", "host bits")]
)
def test_bad_exclude_is_named(text: str, needle: str) -> None:
    message = error(section(outbound={"listen": "127.0.0.1:15001", "exclude": ["10.1.0.0/16", text]}))
    assert message.startswith("transparent.outbound.exclude[1]: ") and needle in message


def test_destination_prints_as_written() -> None:
    for text in ("10.0.0.0/8:8080", "[fd00::/64]:*", "orders.mesh:443"):
        assert str(parse_destination(text, "x", names=True, port_required=True)) == text


# -- inbound ports ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ports", "where", "needle"),
    [
        ([], "transparent.inbound.ports", "at least one"),
        ([{"port": 8080}], "transparent.inbound.ports[0].allow", "required"),
        ([{"port": 8080, "allow": []}], "transparent.inbound.ports[0].allow", "at least one identity"),
        ([{"port": 8080, "allow": ["dns:"]}], "transparent.inbound.ports[0].allow[0]", ""),
        ([{"port": 0, "allow": ["*"]}], "transparent.inbound.ports[0].port", "1 to 65535"),
        ([{"port": "8080x", "allow": ["*"]}], "transparent.inbound.ports[0].port", "1 to 65535"),
        ([{"port": 80, "allow": ["*"]}, {"port": 80, "allow": ["*"]}], "transparent.inbound.ports[1].port", "twice"),
        ([{"port": 15001, "allow": ["*"]}], "transparent.inbound.ports[0].port", "transparent.outbound.listen"),
        ([{"port": 15006, "allow": ["*"]}], "transparent.inbound.ports[0].port", "transparent.inbound.listen"),
        ([{"port": 9901, "allow": ["*"]}], "transparent.inbound.ports[0].port", "admin.listen"),
    ],
)
def test_bad_inbound_ports_are_named(ports: Any, where: str, needle: str) -> None:
    message = error(section(inbound={"listen": "0.0.0.0:15006", "ports": ports}), admin={"listen": "0.0.0.0:9901"})
    assert message.startswith(f"{where}: ") and needle in message, message


def test_a_port_tells_its_app_who_is_calling_as_an_inbound_listener_does() -> None:
    ports = [
        {"port": 8080, "allow": ["*"], "proxy_protocol": "tls-full", "client_cert_header": "xfcc"},
        {"port": 8081, "allow": ["*"]},
    ]
    t = load_transparent(section(inbound={"listen": "0.0.0.0:15006", "ports": ports}))
    assert t.inbound is not None
    first, second = t.inbound.ports
    assert (first.proxy_protocol, first.client_cert_header) == (ProxyProtocolMode.TLS_FULL, "xfcc")
    assert (second.proxy_protocol, second.client_cert_header) == (None, None)
    bad = [{"port": 8080, "allow": ["*"], "proxy_protocol": "v2"}]
    message = error(section(inbound={"listen": "0.0.0.0:15006", "ports": bad}))
    assert message.startswith("transparent.inbound.ports[0].proxy_protocol: expected one of conn|tls|tls-full")


def test_the_capture_ports_differ_from_each_other_and_from_admin() -> None:
    same = section(inbound={"listen": "0.0.0.0:15001", "ports": [{"port": 8080, "allow": ["*"]}]})
    assert error(same).startswith("transparent.inbound.listen: port 15001 is already transparent.outbound.listen")
    assert error(section(), admin={"listen": "127.0.0.1:15001"}).startswith("transparent.outbound.listen: port 15001")


def test_permissive_mode_and_bad_mode() -> None:
    inbound = {"listen": "0.0.0.0:15006", "ports": [{"port": 8080, "allow": ["*"]}], "mode": "permissive"}
    t = load_transparent(section(inbound=inbound))
    assert t.inbound is not None and t.inbound.mode is InboundMode.PERMISSIVE
    assert error(section(inbound={**inbound, "mode": "open"})).startswith("transparent.inbound.mode: expected one of")
