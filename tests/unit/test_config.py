"""Tests for sidecar.config: durations, addresses, unknown keys, relative paths, defaults.

No sockets and no certificates: ``parse``/``load`` only read YAML and validate it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.config import (
    Address,
    Config,
    Limits,
    TLSFiles,
    TLSWorkloadAPI,
    load,
    loads,
    parse,
    parse_address,
    parse_duration,
)
from sidecar.errors import ConfigError, SidecarError

BASE = Path("/etc/sidecar")


def minimal(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "tls": {"cert": "cert.pem", "key": "key.pem", "ca": "ca.pem"},
        "inbound": [
            {"name": "orders", "listen": "0.0.0.0:8443", "forward": "127.0.0.1:8080", "allow": ["*"]},
        ],
    }
    data.update(overrides)
    return data


def parse_error(data: Any) -> str:
    with pytest.raises(ConfigError) as info:
        parse(data, base_dir=BASE)
    return str(info.value)


# -- durations -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("10s", 10.0), ("1.5s", 1.5), ("5m", 300.0), ("1h", 3600.0), ("0s", 0.0), (3, 3.0), (0.5, 0.5)],
)
def test_duration_units(text: Any, seconds: float) -> None:
    assert parse_duration(text, "limits.x") == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["10", "10 parsecs", "10d", "s", "", "-1s", "1e3s", "10S", True, None, [1]])
def test_bad_duration_names_the_key(text: Any) -> None:
    with pytest.raises(ConfigError, match=r"^limits\.idle_timeout: "):
        parse_duration(text, "limits.idle_timeout")


def test_negative_number_of_seconds_is_refused() -> None:
    with pytest.raises(ConfigError, match="negative"):
        parse_duration(-1, "limits.drain_timeout")


# -- addresses -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("127.0.0.1:8443", "127.0.0.1", 8443),
        ("0.0.0.0:0", "0.0.0.0", 0),
        ("billing.mesh.local:443", "billing.mesh.local", 443),
        ("[::1]:8443", "::1", 8443),
        ("[::]:65535", "::", 65535),
        ("[fe80::1]:1", "fe80::1", 1),
        (" localhost:80 ", "localhost", 80),
    ],
)
def test_address_forms(text: str, host: str, port: int) -> None:
    assert parse_address(text, "x") == Address(host, port)


def test_ipv6_address_prints_with_brackets() -> None:
    assert str(parse_address("[::1]:8443", "x")) == "[::1]:8443"
    assert str(parse_address("127.0.0.1:8443", "x")) == "127.0.0.1:8443"


@pytest.mark.parametrize(
    "text",
    [
        "127.0.0.1",  # no port
        ":8443",  # no host
        "host:",  # empty port
        "host:http",  # not a number
        "host:65536",  # out of range
        "host:-1",
        "::1:8443",  # IPv6 without brackets
        "[::1]8443",  # no colon after the bracket
        "[::1]",
        "[not-v6]:80",
        8443,
        None,
    ],
)
def test_bad_address_names_the_key(text: Any) -> None:
    with pytest.raises(ConfigError, match=r"^inbound\[0\]\.listen: "):
        parse_address(text, "inbound[0].listen")


def test_forward_port_0_is_refused_but_listen_port_0_is_fine() -> None:
    cfg = parse(minimal(), base_dir=BASE)
    assert cfg.inbound[0].listen == Address("0.0.0.0", 8443)
    data = minimal()
    data["inbound"][0]["listen"] = "127.0.0.1:0"
    assert parse(data, base_dir=BASE).inbound[0].listen.port == 0
    data["inbound"][0]["forward"] = "127.0.0.1:0"
    assert parse_error(data).startswith("inbound[0].forward:")


def test_ipv6_listen_in_a_whole_config() -> None:
    data = minimal()
    data["inbound"][0]["listen"] = "[::1]:8443"
    assert parse(data, base_dir=BASE).inbound[0].listen == Address("::1", 8443)


# -- unknown and missing keys ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "value", "where"),
    [
        (("inbound", 0, "allwo"), ["*"], "inbound[0].allwo"),
        (("tls", "crt"), "x.pem", "tls.crt"),
        (("limits",), {"idle": "1s"}, "limits.idle"),
        (("log",), {"format": "json", "colour": True}, "log.colour"),
        (("admin",), {"listen": "127.0.0.1:9901", "port": 1}, "admin.port"),
        (("inbounds",), [], "inbounds"),
    ],
)
def test_unknown_key_is_an_error_naming_its_path(path: tuple[Any, ...], value: Any, where: str) -> None:
    data = minimal()
    node: Any = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    message = parse_error(data)
    assert message.startswith(f"{where}: unknown key"), message


def test_unknown_key_in_outbound_is_named() -> None:
    data = minimal(outbound=[{"name": "b", "listen": "127.0.0.1:0", "upstream": "b.mesh:443", "snii": "x"}])
    assert parse_error(data).startswith("outbound[0].snii: unknown key")


@pytest.mark.parametrize(
    ("drop", "where"),
    [
        (("tls", "key"), "tls.key"),
        (("inbound", 0, "forward"), "inbound[0].forward"),
        (("inbound", 0, "allow"), "inbound[0].allow"),
        (("inbound", 0, "name"), "inbound[0].name"),
    ],
)
def test_missing_required_key_is_named(drop: tuple[Any, ...], where: str) -> None:
    data = minimal()
    node: Any = data
    for key in drop[:-1]:
        node = node[key]
    del node[drop[-1]]
    assert parse_error(data) == f"{where}: required"


def test_tls_section_is_required() -> None:
    data = minimal()
    del data["tls"]
    assert parse_error(data) == "tls: required"


def test_at_least_one_listener_is_required() -> None:
    assert "at least one listener" in parse_error({"tls": minimal()["tls"]})


def test_top_level_must_be_a_mapping() -> None:
    assert "mapping" in parse_error(["tls"])


def test_empty_allow_is_refused() -> None:
    data = minimal()
    data["inbound"][0]["allow"] = []
    assert parse_error(data).startswith("inbound[0].allow:")


def test_bad_pattern_names_its_index() -> None:
    data = minimal()
    data["inbound"][0]["allow"] = ["spiffe://mesh.local/ok", "spiffe://mesh.local/fr*nt"]
    assert parse_error(data).startswith("inbound[0].allow[1]:")


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        ("spiffe://mesh.local/jobs/../*", "'.' or '..'"),
        ("spiffe://Mesh.local/jobs/*", "lower case"),
        ("spiffe://mesh.local/jobs?x=1", "no query"),
        ("spki-sha256:AAAA", "decodes to 3 bytes"),
        ("spki-sha256:%%%%", "not standard base64"),
    ],
)
def test_bad_spiffe_or_pin_pattern_names_its_yaml_path(pattern: str, why: str) -> None:
    data = minimal(outbound=[{"name": "billing", "listen": "127.0.0.1:0", "upstream": "b.mesh:443"}])
    data["inbound"][0]["allow"] = ["*", pattern]
    message = parse_error(data)
    assert message.startswith("inbound[0].allow[1]:") and why in message, message
    data["inbound"][0]["allow"] = ["*"]
    data["outbound"][0]["server_identity"] = [pattern]
    message = parse_error(data)
    assert message.startswith("outbound[0].server_identity[0]:") and why in message, message


def test_pin_patterns_load_in_allow_and_server_identity() -> None:
    pin = "spki-sha256:" + "A" * 43 + "="
    data = minimal(
        outbound=[{"name": "b", "listen": "127.0.0.1:0", "upstream": "b.mesh:443", "server_identity": [pin]}]
    )
    data["inbound"][0]["allow"] = [pin]
    cfg = parse(data, base_dir=BASE)
    assert cfg.inbound[0].allow[0].kind == "spki"
    assert cfg.outbound[0].server_identity is not None and cfg.outbound[0].server_identity[0].kind == "spki"


def test_duplicate_listener_names_are_refused() -> None:
    data = minimal(outbound=[{"name": "orders", "listen": "127.0.0.1:0", "upstream": "b.mesh:443"}])
    assert parse_error(data).startswith("outbound[0].name:")


def test_config_errors_are_user_errors() -> None:
    assert issubclass(ConfigError, SidecarError)


# -- outbound identity rules -----------------------------------------------------------------------


def test_outbound_without_server_identity_uses_hostname_verification() -> None:
    data = minimal(outbound=[{"name": "b", "listen": "127.0.0.1:0", "upstream": "billing.mesh.local:8443"}])
    out = parse(data, base_dir=BASE).outbound[0]
    assert out.server_identity is None and out.sni is None
    assert out.upstream == Address("billing.mesh.local", 8443)


def test_outbound_to_an_ip_needs_server_identity_or_sni() -> None:
    spec = {"name": "b", "listen": "127.0.0.1:0", "upstream": "10.0.0.7:8443"}
    assert parse_error(minimal(outbound=[spec])).startswith("outbound[0].server_identity:")
    with_sni = parse(minimal(outbound=[{**spec, "sni": "billing.mesh.local"}]), base_dir=BASE)
    assert with_sni.outbound[0].sni == "billing.mesh.local"
    with_id = parse(minimal(outbound=[{**spec, "server_identity": ["spiffe://mesh.local/billing"]}]), base_dir=BASE)
    [pattern] = with_id.outbound[0].server_identity or ()
    assert pattern.text == "spiffe://mesh.local/billing"


def test_empty_server_identity_is_refused() -> None:
    spec = {"name": "b", "listen": "127.0.0.1:0", "upstream": "b.mesh:443", "server_identity": []}
    assert parse_error(minimal(outbound=[spec])).startswith("outbound[0].server_identity:")


# -- limits and defaults ---------------------------------------------------------------------------


def test_defaults() -> None:
    cfg = parse(minimal(), base_dir=BASE)
    assert cfg.limits == Limits()
    assert (
        cfg.limits.handshake_timeout,
        cfg.limits.connect_timeout,
        cfg.limits.idle_timeout,
        cfg.limits.max_connections,
        cfg.limits.drain_timeout,
    ) == (10.0, 5.0, 300.0, 10000, 15.0)
    assert (cfg.log.level, cfg.log.format) == ("info", "json")
    assert cfg.admin is None
    assert cfg.outbound == ()
    assert cfg.tls.crl is None
    assert cfg.workers == 1


def test_limits_are_parsed() -> None:
    limits = {
        "handshake_timeout": "250ms",
        "connect_timeout": "2s",
        "idle_timeout": "0s",
        "max_connections": 2,
        "drain_timeout": "1m",
    }
    cfg = parse(minimal(limits=limits), base_dir=BASE)
    assert cfg.limits == Limits(0.25, 2.0, 0.0, 2, 60.0)


@pytest.mark.parametrize(
    ("key", "value"),
    [("handshake_timeout", "0s"), ("connect_timeout", 0), ("max_connections", 0), ("max_connections", True)],
)
def test_limits_that_cannot_be_zero(key: str, value: Any) -> None:
    assert parse_error(minimal(limits={key: value})).startswith(f"limits.{key}:")


@pytest.mark.parametrize("value", [0, -1, 65, "two", 1.5, True, None])
def test_bad_workers_are_refused(value: Any) -> None:
    assert parse_error(minimal(workers=value)).startswith("workers: expected a whole number from 1 to 64 or 'auto'")


def test_workers_auto_is_the_number_of_cores() -> None:
    import os

    assert parse(minimal(workers="auto"), base_dir=BASE).workers == max(1, min(os.cpu_count() or 1, 64))
    assert parse(minimal(workers=3), base_dir=BASE).workers == 3


def test_idle_timeout_zero_disables() -> None:
    assert parse(minimal(limits={"idle_timeout": 0}), base_dir=BASE).limits.idle_timeout == 0


def test_admin_and_log() -> None:
    cfg = parse(minimal(admin={"listen": "127.0.0.1:9901"}, log={"level": "debug", "format": "text"}), base_dir=BASE)
    assert cfg.admin is not None and cfg.admin.listen == Address("127.0.0.1", 9901)
    assert (cfg.log.level, cfg.log.format) == ("debug", "text")


# -- files -----------------------------------------------------------------------------------------


def test_relative_paths_resolve_against_the_config_files_folder(tmp_path: Path) -> None:
    folder = tmp_path / "conf"
    folder.mkdir()
    data = minimal()
    data["tls"] = {"cert": "certs/cert.pem", "key": "../keys/key.pem", "ca": "/abs/ca.pem", "crl": "crl.pem"}
    path = folder / "sidecar.yaml"
    path.write_text(yaml.safe_dump(data))
    cfg = load(path)
    assert isinstance(cfg, Config)
    assert cfg.tls.cert == folder / "certs" / "cert.pem"
    assert cfg.tls.key == folder / ".." / "keys" / "key.pem"
    assert cfg.tls.ca == Path("/abs/ca.pem")
    assert cfg.tls.crl == folder / "crl.pem"
    assert cfg.path == path


def test_missing_config_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"absent\.yaml"):
        load(tmp_path / "absent.yaml")


def test_invalid_yaml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("tls: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml"):
        load(path)


# -- tls.workload_api --------------------------------------------------------------------------------


def test_workload_api_replaces_the_files() -> None:
    cfg = parse(minimal(tls={"workload_api": "unix:///run/spire/sockets/agent.sock"}), base_dir=BASE)
    assert cfg.tls == TLSWorkloadAPI(
        address="unix:///run/spire/sockets/agent.sock", socket=Path("/run/spire/sockets/agent.sock")
    )
    assert cfg.tls.paths() == ()  # nothing on disk to watch


def test_workload_api_takes_the_session_settings() -> None:
    tls = {"workload_api": "unix:///agent.sock", "session_resumption": False, "session_lifetime": "10m"}
    cfg = parse(minimal(tls=tls), base_dir=BASE)
    assert isinstance(cfg.tls, TLSWorkloadAPI)
    assert (cfg.tls.session_resumption, cfg.tls.session_lifetime) == (False, 600.0)


@pytest.mark.parametrize("key", ["cert", "key", "ca", "crl"])
def test_workload_api_with_files_is_an_error_naming_workload_api(key: str) -> None:
    tls = {"workload_api": "unix:///agent.sock", key: "x.pem"}
    message = parse_error(minimal(tls=tls))
    assert message.startswith("tls.workload_api: cannot be combined with"), message
    assert f"tls.{key}" in message


@pytest.mark.parametrize(
    "value",
    [
        "/run/agent.sock",  # no scheme
        "unix:/run/agent.sock",  # gRPC's one-slash form: not what the contract writes
        "unix://run/agent.sock",  # an authority, not an absolute path
        "tcp://127.0.0.1:8081",
        "unix:///run/",
        "unix:///",
        "unix:///run/\0agent.sock",
        "unix:///" + "a" * 120,
        7,
        None,
    ],
)
def test_bad_workload_api_addresses_are_refused(value: Any) -> None:
    data = minimal(tls={"workload_api": value})
    if value is None:
        assert parse_error(data) == "tls.workload_api: required"
    else:
        assert parse_error(data).startswith("tls.workload_api:")


def test_unknown_key_beside_workload_api_is_named() -> None:
    assert parse_error(minimal(tls={"workload_api": "unix:///a.sock", "trust": "x"})).startswith(
        "tls.trust: unknown key"
    )


def test_files_are_still_the_default_source() -> None:
    assert isinstance(parse(minimal(), base_dir=BASE).tls, TLSFiles)


# -- what the fuzzer found (fuzz/targets.py: any bytes give a Config or a one-line ConfigError) ------

GOOD = b"tls: {cert: c, key: k, ca: ca}\ninbound: [{name: x, listen: '0.0.0.0:1', forward: 'h:2', allow: ['*']}]\n"


def loads_error(raw: bytes) -> str:
    with pytest.raises(ConfigError) as info:
        loads(raw, base_dir=BASE, path=BASE / "sidecar.yaml")
    message = str(info.value)
    assert len(message.splitlines()) == 1, message
    return message


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (GOOD + b"# caf\xe9\n", "not UTF-8 text"),  # found by the fuzzer: a traceback before
        (b"when: 2001-13-01\n", "month must be in 1..12"),  # YAML's timestamp, built by datetime
        (b"[" * 5000, "nested too deeply"),
        (GOOD + b'"a\\nb": 1\n', "'a\\nb': unknown key"),
        (GOOD.replace(b"h:2", b'"a\\nb:c:2"'), "in brackets"),
        (GOOD + b"limits: {handshake_timeout: .nan}\n", "finite"),
        (GOOD + b"limits: {drain_timeout: .inf}\n", "finite"),
        (GOOD + b"limits: {idle_timeout: " + b"9" * 400 + b"h}\n", "finite"),
        (GOOD.replace(b"cert: c", b"cert: '~nosuchuser-h16/c'"), "cannot expand the home folder"),
        (GOOD.replace(b"cert: c", b'cert: "c\\0d"'), "tls.cert: expected a file path"),
    ],
)
def test_odd_bytes_are_one_line_config_errors(raw: bytes, why: str) -> None:
    message = loads_error(raw)
    assert why in message, message


def test_loads_is_load_without_the_disk(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_bytes(GOOD)
    assert load(path) == loads(GOOD, base_dir=tmp_path, path=path)
