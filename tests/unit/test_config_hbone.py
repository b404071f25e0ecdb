"""The ``hbone`` section and ``outbound[].tunnel`` (contract section 11): defaults, and each bad
value refused with its YAML path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sidecar.config import Address, HbonePort, Tunnel, parse
from sidecar.errors import ConfigError
from sidecar.identity import parse_pattern

TLS = {"cert": "cert.pem", "key": "key.pem", "ca": "ca.pem"}
HBONE = {"listen": "0.0.0.0:15008", "ports": [{"port": 8080, "allow": ["spiffe://mesh.local/frontend"]}]}
OUTBOUND = {
    "name": "orders",
    "listen": "127.0.0.1:9001",
    "upstream": "orders.mesh.local:15008",
    "tunnel": {"protocol": "hbone", "target_port": 8080},
    "server_identity": ["spiffe://mesh.local/orders"],
}


def error(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        parse(data, base_dir=Path("/etc/sidecar"))
    return str(info.value)


def test_the_contract_example_parses_with_defaults() -> None:
    cfg = parse({"tls": TLS, "hbone": HBONE, "outbound": [OUTBOUND]}, base_dir=Path("."))
    assert cfg.hbone is not None
    assert cfg.hbone.name == "hbone" and cfg.hbone.listen == Address("0.0.0.0", 15008)
    assert cfg.hbone.ports == (HbonePort(8080, (parse_pattern("spiffe://mesh.local/frontend"),)),)
    assert cfg.outbound[0].tunnel == Tunnel("hbone", 8080, max_streams=100, idle_timeout=300.0)


def test_hbone_alone_is_a_listener_and_outbound_without_tunnel_is_unchanged() -> None:
    plain = {k: v for k, v in OUTBOUND.items() if k != "tunnel"}
    assert parse({"tls": TLS, "hbone": HBONE}, base_dir=Path(".")).hbone is not None
    assert parse({"tls": TLS, "outbound": [plain]}, base_dir=Path(".")).outbound[0].tunnel is None


def test_pool_keys_are_optional_and_checked() -> None:
    tunnel = {"protocol": "hbone", "target_port": 8080, "max_streams": 10, "idle_timeout": "30s"}
    cfg = parse({"tls": TLS, "outbound": [{**OUTBOUND, "tunnel": tunnel}]}, base_dir=Path("."))
    assert cfg.outbound[0].tunnel == Tunnel("hbone", 8080, max_streams=10, idle_timeout=30.0)


@pytest.mark.parametrize(
    ("tunnel", "message"),
    [
        ("hbone", "outbound[0].tunnel: expected a mapping like {protocol: hbone, target_port: 8080}"),
        ({"target_port": 8080}, "outbound[0].tunnel.protocol: required"),
        ({"protocol": "h2c", "target_port": 8080}, "outbound[0].tunnel.protocol: expected one of hbone"),
        ({"protocol": "hbone"}, "outbound[0].tunnel.target_port: required"),
        ({"protocol": "hbone", "target_port": 0}, "outbound[0].tunnel.target_port: expected a port from 1 to 65535"),
        ({"protocol": "hbone", "target_port": "80"}, "outbound[0].tunnel.target_port: expected a port from 1 to 65535"),
        ({"protocol": "hbone", "target_port": 80, "max_streams": 0}, "outbound[0].tunnel.max_streams:"),
        ({"protocol": "hbone", "target_port": 80, "idle_timeout": "0s"}, "outbound[0].tunnel.idle_timeout:"),
        ({"protocol": "hbone", "target_port": 80, "pool": 3}, "outbound[0].tunnel.pool: unknown key"),
    ],
)
def test_bad_tunnels_name_their_path(tunnel: Any, message: str) -> None:
    assert error({"tls": TLS, "outbound": [{**OUTBOUND, "tunnel": tunnel}]}).startswith(message)


@pytest.mark.parametrize(
    ("hbone", "message"),
    [
        ({"ports": HBONE["ports"]}, "hbone.listen: required"),
        ({"listen": "0.0.0.0:15008"}, "hbone.ports: required"),
        ({"listen": "0.0.0.0:15008", "ports": []}, "hbone.ports: must list at least one port"),
        ({**HBONE, "ports": [{"port": 8080}]}, "hbone.ports[0].allow: required"),
        ({**HBONE, "ports": [{"port": 8080, "allow": []}]}, "hbone.ports[0].allow: must list at least one identity"),
        ({**HBONE, "ports": [{"port": 70000, "allow": ["*"]}]}, "hbone.ports[0].port: expected a port from 1 to 65535"),
        ({**HBONE, "ports": [{"port": 80, "allow": ["spiffe://"]}]}, "hbone.ports[0].allow[0]:"),
        (
            {**HBONE, "ports": [{"port": 80, "allow": ["*"]}, {"port": 80, "allow": ["*"]}]},
            "hbone.ports[1].port: 80 is already listed at hbone.ports[0]",
        ),
        ({**HBONE, "ports": [{"port": 80, "allow": ["*"], "forward": "x"}]}, "hbone.ports[0].forward: unknown key"),
        ({**HBONE, "listen": "15008"}, "hbone.listen:"),
        ({**HBONE, "name": "bad name"}, "hbone.name:"),
        ({**HBONE, "mtu": 1}, "hbone.mtu: unknown key"),
    ],
)
def test_bad_hbone_sections_name_their_path(hbone: dict[str, Any], message: str) -> None:
    assert error({"tls": TLS, "hbone": hbone}).startswith(message)


def test_the_hbone_name_is_unique_among_listeners() -> None:
    out = {**OUTBOUND, "name": "hbone"}
    assert error({"tls": TLS, "hbone": HBONE, "outbound": [out]}).startswith("hbone.name: 'hbone' is already the name")


# -- transparent routes with a tunnel ----------------------------------------------------------------


def transparent(route_tunnel: Any) -> dict[str, Any]:
    route = {"to": "10.0.0.0/8:*", "server_identity": ["spiffe://mesh.local/orders"], "tunnel": route_tunnel}
    return {"tls": TLS, "transparent": {"uid": 10001, "outbound": {"listen": "127.0.0.1:15001", "routes": [route]}}}


def test_a_transparent_route_takes_a_tunnel_without_target_port() -> None:
    cfg = parse(transparent({"protocol": "hbone"}), base_dir=Path("."))
    assert cfg.transparent is not None and cfg.transparent.outbound is not None
    (route,) = cfg.transparent.outbound.routes
    assert route.tunnel == Tunnel("hbone", None, max_streams=100, idle_timeout=300.0)
    tuned = parse(transparent({"protocol": "hbone", "max_streams": 5, "idle_timeout": "1m"}), base_dir=Path("."))
    assert tuned.transparent is not None and tuned.transparent.outbound is not None
    assert tuned.transparent.outbound.routes[0].tunnel == Tunnel("hbone", None, max_streams=5, idle_timeout=60.0)


def test_a_route_without_tunnel_has_none() -> None:
    data = transparent(None)
    cfg = parse(data, base_dir=Path("."))
    assert cfg.transparent is not None and cfg.transparent.outbound is not None
    assert cfg.transparent.outbound.routes[0].tunnel is None


ROUTE = "transparent.outbound.routes[0].tunnel"


@pytest.mark.parametrize(
    ("tunnel", "message"),
    [
        ("hbone", f"{ROUTE}: expected a mapping like {{protocol: hbone}}, got 'hbone'"),
        ({}, f"{ROUTE}.protocol: required"),
        ({"protocol": "h2c"}, f"{ROUTE}.protocol: expected one of hbone"),
        (
            {"protocol": "hbone", "target_port": 8080},
            f"{ROUTE}.target_port: not on a route: CONNECT asks for the original destination's port",
        ),
        ({"protocol": "hbone", "max_streams": 1001}, f"{ROUTE}.max_streams:"),
        ({"protocol": "hbone", "idle_timeout": "0s"}, f"{ROUTE}.idle_timeout: must be greater than 0"),
        ({"protocol": "hbone", "port": 15008}, f"{ROUTE}.port: unknown key"),
    ],
)
def test_bad_route_tunnels_name_their_path(tunnel: Any, message: str) -> None:
    assert error(transparent(tunnel)).startswith(message)
