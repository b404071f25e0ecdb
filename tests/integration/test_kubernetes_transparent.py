"""deploy/kubernetes/transparent: the base manifests with the overlay's patches applied (RFC 6902, as
kustomize applies them) pass `kubernetes-validate --strict`, and the pod they make agrees with
itself: the init container installs the rules of the very config the sidecar runs, with root and
NET_ADMIN only; the app keeps its real port, calls its peer by name, and does not share the
sidecar's uid; the Service and the NetworkPolicy point at the captured port.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_kubernetes_manifests import CORE, KUBE, VERSIONS, load, validate

from sidecar import config

OVERLAY = KUBE / "transparent"
jsonpatch = pytest.importorskip("jsonpatch", reason="jsonpatch is not installed (pip install jsonpatch)")


def rendered() -> dict[tuple[str, str], dict[str, Any]]:
    """The base's core resources with the overlay's patches applied, by (kind, name)."""
    docs = {(d["kind"], d["metadata"]["name"]): d for name in CORE for d in load(name)}
    kustomization = yaml.safe_load((OVERLAY / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["../"]
    for patch in kustomization["patches"]:
        key = (patch["target"]["kind"], patch["target"]["name"])
        ops = yaml.safe_load((OVERLAY / patch["path"]).read_text())
        docs[key] = jsonpatch.apply_patch(copy.deepcopy(docs[key]), ops)
    return docs


def pod() -> dict[str, Any]:
    spec: dict[str, Any] = rendered()["Deployment", "orders"]["spec"]["template"]["spec"]
    return spec


def sidecar_config() -> config.Config:
    text = rendered()["ConfigMap", "orders-sidecar"]["data"]["sidecar.yaml"]
    return config.parse(yaml.safe_load(text), base_dir=Path("/etc/sidecar/config"))


def test_every_patch_file_is_applied() -> None:
    kustomization = yaml.safe_load((OVERLAY / "kustomization.yaml").read_text())
    listed = {p["path"] for p in kustomization["patches"]}
    assert listed == {p.name for p in OVERLAY.glob("*.yaml")} - {"kustomization.yaml"}


@pytest.mark.parametrize("version", VERSIONS)
def test_the_transparent_pod_passes_strict_validation(tmp_path: Path, version: str) -> None:
    files = []
    for (kind, name), doc in rendered().items():
        path = tmp_path / f"{kind.lower()}-{name}.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        files.append(path)
    proc = validate(*files, version=version)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count(" passed for resource ") == len(files), proc.stdout


def test_the_init_container_installs_the_sidecars_own_rules_and_exits() -> None:
    spec = pod()
    iptables, sidecar = spec["initContainers"]
    assert iptables["name"] == "iptables" and "restartPolicy" not in iptables  # runs to completion, first
    assert sidecar["restartPolicy"] == "Always"  # the native sidecar of the base, unchanged
    config_mount = {m["name"]: m["mountPath"] for m in sidecar["volumeMounts"]}["sidecar-config"]
    assert iptables["args"] == ["iptables", "install", "-c", f"{config_mount}/sidecar.yaml"]
    assert sidecar["args"] == ["run", "-c", f"{config_mount}/sidecar.yaml"]
    assert iptables["image"] == sidecar["image"]
    sc = iptables["securityContext"]
    assert (sc["runAsUser"], sc["runAsNonRoot"], sc["allowPrivilegeEscalation"]) == (0, False, False)
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]}
    assert sc["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"] for m in iptables["volumeMounts"]}
    assert "/run" in mounts  # iptables' lock file on a read-only root
    volumes = {v["name"] for v in spec["volumes"]}
    assert {m["name"] for m in iptables["volumeMounts"]} <= volumes
    # nobody else gains a capability or root
    for container in (sidecar, *spec["containers"]):
        assert "add" not in container["securityContext"]["capabilities"], container["name"]
        assert container["securityContext"].get("runAsUser", spec["securityContext"]["runAsUser"]) != 0


def test_the_app_keeps_its_port_calls_its_peer_by_name_and_is_captured() -> None:
    spec = pod()
    (app,) = spec["containers"]
    t = sidecar_config().transparent
    assert t is not None and t.inbound is not None and t.outbound is not None
    assert sidecar_config().inbound == () and sidecar_config().outbound == ()
    assert spec["securityContext"]["runAsUser"] == t.uid  # the sidecar runs as transparent.uid
    assert app["securityContext"]["runAsUser"] != t.uid  # the app's connections are captured
    args = app["args"]
    listen = args[args.index("--listen") + 1]
    call = args[args.index("--call") + 1]
    (port,) = t.inbound.ports
    assert listen == f"0.0.0.0:{port.port}"
    assert {p["name"]: p["containerPort"] for p in app["ports"]} == {"http": port.port}
    (route,) = t.outbound.routes
    assert call == f"http://{route.to.host}:{route.to.port}/"
    admin = sidecar_config().admin
    assert admin is not None and admin.listen.port not in {p.port for p in t.inbound.ports}
    _, sidecar = spec["initContainers"]
    assert {p["name"]: p["containerPort"] for p in sidecar["ports"]} == {"admin": admin.listen.port}


def test_the_service_and_network_policy_point_at_the_captured_port() -> None:
    docs = rendered()
    t = sidecar_config().transparent
    assert t is not None and t.inbound is not None
    (captured,) = (p.port for p in t.inbound.ports)
    ports = {p["name"]: p for p in docs["Service", "orders"]["spec"]["ports"]}
    assert (ports["http"]["port"], ports["http"]["targetPort"]) == (captured, "http")
    assert ports["admin"]["targetPort"] == "admin"
    ingress = docs["NetworkPolicy", "orders"]["spec"]["ingress"]
    assert ingress[0]["ports"] == [{"port": captured, "protocol": "TCP"}]
