"""The container files read statically (runs in `make test`, no podman): docker-compose.yml, the
per-service sidecar configs in config/compose, the Dockerfile, and the demo app's independence.
The compose mesh itself runs in test_compose_mesh.py (`make test-compose`).
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar import config

ROOT = Path(__file__).resolve().parents[2]
COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
SIDECARS = sorted(name for name in SERVICES if name.endswith("-sidecar"))
TRUST_DOMAIN = "spiffe://mesh.local"


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def sidecar_config(service: str) -> config.Config:
    (mount,) = [v for v in SERVICES[service]["volumes"] if v.endswith(":/etc/sidecar/sidecar.yaml:ro")]
    path = ROOT / mount.split(":")[0]
    assert path.parent == ROOT / "config" / "compose"
    return config.load(path)


def raw_config(service: str) -> dict[str, Any]:
    (mount,) = [v for v in SERVICES[service]["volumes"] if v.endswith(":/etc/sidecar/sidecar.yaml:ro")]
    data: dict[str, Any] = yaml.safe_load((ROOT / mount.split(":")[0]).read_text())
    return data


def test_mesh_has_an_app_and_a_sidecar_per_identity() -> None:
    assert SIDECARS == ["backend-sidecar", "frontend-sidecar", "stranger-sidecar"]
    issued = SERVICES["pki"]["command"][1:]
    assert SERVICES["pki"]["command"][0] == "init"
    assert sorted(issued) == [s.removesuffix("-sidecar") for s in SIDECARS]


@pytest.mark.parametrize("sidecar", SIDECARS)
def test_sidecar_and_init_join_their_apps_namespace_and_the_rules_come_first(sidecar: str) -> None:
    app, init = sidecar.removesuffix("-sidecar"), sidecar.replace("-sidecar", "-init")
    mount = f"./config/compose/{app}.yaml:/etc/sidecar/sidecar.yaml:ro"
    assert SERVICES[sidecar]["network_mode"] == SERVICES[init]["network_mode"] == f"service:{app}"
    assert SERVICES[init]["depends_on"] == {app: {"condition": "service_started"}}
    assert SERVICES[sidecar]["depends_on"] == {
        app: {"condition": "service_started"},  # podman starts what a container requires, with its requirements
        init: {"condition": "service_completed_successfully"},
        "pki": {"condition": "service_completed_successfully"},
    }
    # the init: `sidecar iptables install` from the sidecar's own config, root with NET_ADMIN only
    assert SERVICES[init]["command"] == ["iptables", "install", "-c", "/etc/sidecar/sidecar.yaml"]
    assert "entrypoint" not in SERVICES[init], "the image's entrypoint, sidecar"
    assert SERVICES[init]["volumes"] == [mount]
    assert SERVICES[init]["user"] == "0:0" and SERVICES[init]["cap_drop"] == ["ALL"]
    assert set(SERVICES[init]["cap_add"]) == {"NET_ADMIN", "NET_RAW"}
    assert SERVICES[init]["restart"] == "no" and SERVICES[init]["read_only"] is True
    assert mount in SERVICES[sidecar]["volumes"] and f"{app}-certs:/certs:ro" in SERVICES[sidecar]["volumes"]
    assert "cap_add" not in SERVICES[sidecar] and "user" not in SERVICES[sidecar], "the image's uid 10001, no caps"
    cfg = sidecar_config(sidecar)
    assert isinstance(cfg.tls, config.TLSFiles)
    assert (cfg.tls.cert, cfg.tls.key, cfg.tls.ca) == (
        Path("/certs/cert.pem"),
        Path("/certs/key.pem"),
        Path("/certs/ca.pem"),
    )
    assert cfg.inbound == () and cfg.outbound == (), "transparent mode only: no sidecar address for the app"
    assert cfg.transparent is not None and cfg.transparent.uid == 10001
    assert cfg.admin is not None
    published = [p for p in SERVICES[app].get("ports", []) if p.endswith(f":{cfg.admin.listen.port}")]
    assert published and all(p.startswith("127.0.0.1:") for p in published), "admin published on loopback only"
    assert SERVICES[sidecar]["read_only"] is True and SERVICES[app]["read_only"] is True


@pytest.mark.parametrize("sidecar", SIDECARS)
def test_the_app_listens_on_its_real_port_and_calls_its_peer_by_name(sidecar: str) -> None:
    app = sidecar.removesuffix("-sidecar")
    t = sidecar_config(sidecar).transparent
    assert t is not None and t.outbound is not None
    argv = SERVICES[app]["command"]
    assert flag(argv, "--name") == app
    assert flag(argv, "--listen") == "0.0.0.0:8080"
    (route,) = t.outbound.routes
    assert route.to.host is not None and route.to.port is not None
    assert flag(argv, "--call") == f"http://{route.to.host}:{route.to.port}/", "the peer's name and real port"
    assert str(t.outbound.listen.port) not in flag(argv, "--call")
    assert t.outbound.unmatched is config.Unmatched.DENY
    if t.inbound is not None:
        assert [p.port for p in t.inbound.ports] == [8080]
        assert t.inbound.mode is config.InboundMode.STRICT
    user = SERVICES[app]["user"]
    assert user.split(":")[0] != str(t.uid), "the app's connections must not be exempt from capture"


@pytest.mark.parametrize("caller", SIDECARS)
def test_outbound_reaches_a_peer_that_allows_exactly_the_intended_callers(caller: str) -> None:
    (route,) = raw_config(caller)["transparent"]["outbound"]["routes"]
    host, port = route["to"].rsplit(":", 1)
    assert route["server_identity"] == [f"{TRUST_DOMAIN}/{host}"]
    (entry,) = raw_config(f"{host}-sidecar")["transparent"]["inbound"]["ports"]
    assert entry["port"] == int(port)
    me = f"{TRUST_DOMAIN}/{caller.removesuffix('-sidecar')}"
    if caller == "stranger-sidecar":
        assert me not in entry["allow"] and "*" not in entry["allow"]
    else:
        assert me in entry["allow"]


def test_rotate_is_an_on_demand_tool_with_every_identity_volume() -> None:
    rotate, pki = SERVICES["rotate"], SERVICES["pki"]
    assert rotate["profiles"] == ["tools"]
    assert rotate["entrypoint"][-1] == "rotate"
    assert sorted(rotate["volumes"]) == sorted(pki["volumes"])
    assert "user" not in rotate, "rotate runs as the image's non-root user, like the sidecars"
    # The CA's key is mounted by the two pki services only.
    for name, service in SERVICES.items():
        if name not in ("pki", "rotate"):
            assert not any(v.startswith("ca:") for v in service.get("volumes", [])), name


def test_dockerfile_shape() -> None:
    text = (ROOT / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert "ARG BASE_IMAGE=python:3.11-slim" in lines
    froms = [line for line in lines if line.startswith("FROM ")]
    assert froms == ["FROM ${BASE_IMAGE} AS build", "FROM ${BASE_IMAGE}"], "build stage, then a clean final stage"
    final = text[text.rindex("\nFROM ") :]
    assert "python3 -m venv /opt/venv" in text and "COPY --from=build /opt/venv /opt/venv" in final
    assert re.search(r"^USER 10001:10001$", final, re.M)
    assert 'ENTRYPOINT ["sidecar"]' in final
    assert "--no-install-recommends iptables" in final, "transparent mode's init containers run this image"
    assert re.search(r"^HEALTHCHECK .*\n?.*/readyz", final, re.M)
    for compiler in ("gcc", "build-essential", "clang"):
        assert compiler not in final


def test_dockerignore_is_an_allow_list() -> None:
    entries = [e for e in (ROOT / ".dockerignore").read_text().splitlines() if e and not e.startswith("#")]
    assert entries[0] == "*"
    assert {"!pyproject.toml", "!README.md", "!sidecar/"} <= set(entries)


def test_demo_app_imports_nothing_from_the_sidecar_package() -> None:
    tree = ast.parse((ROOT / "sidecar" / "demo_app.py").read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "no relative imports"
            imported.add((node.module or "").split(".")[0])
    assert imported - {"__future__", "aiohttp"} <= sys.stdlib_module_names, imported
