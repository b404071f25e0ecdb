"""Tests for the contract section 9 keys in sidecar.config: proxy_protocol and client_cert_header.

No sockets, no certificates: ``parse`` validates YAML data only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sidecar.config import parse
from sidecar.errors import ConfigError
from sidecar.proxy_protocol import Mode

BASE = Path("/etc/sidecar")


def config(**inbound_keys: Any) -> dict[str, Any]:
    inbound = {"name": "orders", "listen": "0.0.0.0:8443", "forward": "127.0.0.1:8080", "allow": ["*"]}
    inbound.update(inbound_keys)
    return {"tls": {"cert": "c.pem", "key": "k.pem", "ca": "ca.pem"}, "inbound": [inbound]}


def error(data: Any) -> str:
    with pytest.raises(ConfigError) as info:
        parse(data, base_dir=BASE)
    return str(info.value)


def test_both_default_to_none() -> None:
    inbound = parse(config(), base_dir=BASE).inbound[0]
    assert inbound.proxy_protocol is None
    assert inbound.client_cert_header is None


@pytest.mark.parametrize(("text", "mode"), [("conn", Mode.CONN), ("tls", Mode.TLS), ("tls-full", Mode.TLS_FULL)])
def test_proxy_protocol_modes(text: str, mode: Mode) -> None:
    assert parse(config(proxy_protocol=text), base_dir=BASE).inbound[0].proxy_protocol is mode


def test_client_cert_header_xfcc() -> None:
    assert parse(config(client_cert_header="xfcc"), base_dir=BASE).inbound[0].client_cert_header == "xfcc"


def test_both_together() -> None:
    inbound = parse(config(proxy_protocol="tls-full", client_cert_header="xfcc"), base_dir=BASE).inbound[0]
    assert (inbound.proxy_protocol, inbound.client_cert_header) == (Mode.TLS_FULL, "xfcc")


def test_explicit_null_means_none() -> None:
    inbound = parse(config(proxy_protocol=None, client_cert_header=None), base_dir=BASE).inbound[0]
    assert (inbound.proxy_protocol, inbound.client_cert_header) == (None, None)


@pytest.mark.parametrize("value", ["v2", "TLS", "tls_full", "full", "", True, 2, ["conn"], {"mode": "conn"}])
def test_bad_proxy_protocol_names_the_yaml_path(value: Any) -> None:
    message = error(config(proxy_protocol=value))
    assert message.startswith("inbound[0].proxy_protocol: expected one of conn|tls|tls-full")


@pytest.mark.parametrize("value", ["XFCC", "x-forwarded-client-cert", "l5d", "", True, ["xfcc"]])
def test_bad_client_cert_header_names_the_yaml_path(value: Any) -> None:
    assert error(config(client_cert_header=value)).startswith("inbound[0].client_cert_header: expected one of xfcc")


def test_misspelt_key_is_an_error_not_a_silent_default() -> None:
    message = error(config(proxy_protocols="conn"))
    assert message.startswith("inbound[0].proxy_protocols: unknown key")
    assert "client_cert_header" in message and "proxy_protocol" in message


def test_path_names_the_right_listener() -> None:
    data = config()
    data["inbound"].append(
        {"name": "b", "listen": "0.0.0.0:9443", "forward": "127.0.0.1:9090", "allow": ["*"], "proxy_protocol": "x"}
    )
    assert error(data).startswith("inbound[1].proxy_protocol:")


def test_outbound_does_not_take_them() -> None:
    data = config()
    data["outbound"] = [{"name": "o", "listen": "127.0.0.1:9001", "upstream": "a.local:8443", "proxy_protocol": "conn"}]
    assert error(data).startswith("outbound[0].proxy_protocol: unknown key")
