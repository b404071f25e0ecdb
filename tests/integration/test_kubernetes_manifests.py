"""deploy/kubernetes: the core manifests pass `kubernetes-validate --strict`, and they agree.

kubernetes-validate (PyPI) carries the Kubernetes OpenAPI schemas, so this needs no cluster and no
network. cert-manager.yaml holds custom resources that it has no schema for: it is checked here by
hand, against what the Deployment and the sidecar config expect of it. The SPIRE variant
(deploy/kubernetes/spire) is validated the same way, and checked to differ from the base only in
where the identity comes from.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar import config

KUBE = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
SPIRE = KUBE / "spire"
CORE = ["serviceaccount.yaml", "configmap.yaml", "deployment.yaml", "service.yaml", "networkpolicy.yaml"]
# 1.29: the first release with native sidecars (init containers with restartPolicy: Always) on by
# default; "latest": whatever the installed kubernetes-validate knows best.
VERSIONS = ["1.29.0", "latest"]


def validate(*files: Path, version: str) -> subprocess.CompletedProcess[str]:
    pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is not installed (pip install kubernetes-validate)"
    )
    argv = [sys.executable, "-m", "kubernetes_validate", "--strict", *map(str, files)]
    if version != "latest":
        argv[3:3] = ["-k", version]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


def load(name: str, folder: Path = KUBE) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((folder / name).read_text()) if doc]


def one(name: str, kind: str, resource: str | None = None, folder: Path = KUBE) -> dict[str, Any]:
    docs = load(name, folder)
    found = [d for d in docs if d["kind"] == kind and resource in (None, d.get("metadata", {}).get("name"))]
    assert len(found) == 1, f"expected one {kind} {resource or ''} in {name}, found {len(found)}"
    return found[0]


def pod_spec(folder: Path = KUBE) -> dict[str, Any]:
    spec: dict[str, Any] = one("deployment.yaml", "Deployment", folder=folder)["spec"]["template"]["spec"]
    return spec


def sidecar_yaml(folder: Path = KUBE) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(one("configmap.yaml", "ConfigMap", folder=folder)["data"]["sidecar.yaml"])
    return data


def sidecar_config(folder: Path = KUBE) -> config.Config:
    return config.parse(sidecar_yaml(folder), base_dir=Path("/etc/sidecar/config"))


@pytest.mark.parametrize("folder", [KUBE, SPIRE], ids=["base", "spire"])
@pytest.mark.parametrize("version", VERSIONS)
def test_core_manifests_pass_strict_validation(version: str, folder: Path) -> None:
    proc = validate(*(folder / name for name in CORE), version=version)
    print(proc.stdout, proc.stderr)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count(" passed for resource ") == len(CORE), proc.stdout


def test_strict_validation_catches_a_misspelt_field(tmp_path: Path) -> None:
    # Proves the check above has teeth: an unknown key (here a typo) fails under --strict.
    broken = tmp_path / "deployment.yaml"
    text = (KUBE / "deployment.yaml").read_text()
    broken.write_text(text.replace("readOnlyRootFilesystem:", "readOnlyRootFileSystem:"))
    proc = validate(broken, version="latest")
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "readOnlyRootFileSystem" in proc.stdout + proc.stderr


@pytest.mark.parametrize("folder", [KUBE, SPIRE], ids=["base", "spire"])
def test_kustomization_lists_every_manifest(folder: Path) -> None:
    listed = set(one("kustomization.yaml", "Kustomization", folder=folder)["resources"])
    present = {p.name for p in folder.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


def test_sidecar_is_a_native_sidecar_that_gates_readiness() -> None:
    spec = pod_spec()
    (sidecar,) = spec["initContainers"]
    (app,) = spec["containers"]
    assert sidecar["restartPolicy"] == "Always"  # starts before the app, stops after it
    admin = sidecar_config().admin
    assert admin is not None
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    assert ports["admin"] == admin.listen.port
    assert ports["mtls"] == sidecar_config().inbound[0].listen.port
    for probe in ("startupProbe", "readinessProbe"):
        assert sidecar[probe]["httpGet"] == {"path": "/readyz", "port": "admin"}, probe
    assert sidecar["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # The app listens on the pod's loopback only, so the kubelet cannot probe it over the network.
    forward = sidecar_config().inbound[0].forward
    assert forward.host == "127.0.0.1"
    assert "httpGet" not in app["readinessProbe"]
    assert f"{forward.host}:{forward.port}" in app["args"]


def test_non_root_with_read_only_root_file_systems() -> None:
    spec = pod_spec()
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] == 10001  # the image's USER
    assert pod["seccompProfile"]["type"] == "RuntimeDefault"
    assert spec["automountServiceAccountToken"] is False
    for container in spec["initContainers"] + spec["containers"]:
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True, container["name"]
        assert sc["allowPrivilegeEscalation"] is False, container["name"]
        assert sc["capabilities"]["drop"] == ["ALL"], container["name"]


def test_termination_grace_fits_the_drain() -> None:
    spec = pod_spec()
    (app,) = spec["containers"]
    pre_stop = app["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = sidecar_config().limits.drain_timeout
    # The app's preStop runs first; the sidecar is sent SIGTERM after the app exits and drains.
    assert float(pre_stop[1]) + drain + 5 <= spec["terminationGracePeriodSeconds"], (pre_stop, drain)


def test_certificate_secret_matches_what_the_sidecar_reads() -> None:
    spec = pod_spec()
    (sidecar,) = spec["initContainers"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["name"]: m for m in sidecar["volumeMounts"]}
    assert "subPath" not in mounts["tls"]  # a subPath mount never sees Secret updates
    tls_dir = Path(mounts["tls"]["mountPath"])
    tls = sidecar_config().tls
    # cert-manager's Secret keys: tls.crt (leaf, then chain), tls.key, ca.crt.
    assert (tls.cert, tls.key, tls.ca) == (tls_dir / "tls.crt", tls_dir / "tls.key", tls_dir / "ca.crt")
    cfg_dir = Path(mounts["sidecar-config"]["mountPath"])
    assert sidecar["args"] == ["run", "-c", str(cfg_dir / "sidecar.yaml")]
    assert volumes["sidecar-config"]["configMap"]["name"] == one("configmap.yaml", "ConfigMap")["metadata"]["name"]

    cert = one("cert-manager.yaml", "Certificate", "orders")
    assert cert["apiVersion"] == "cert-manager.io/v1"
    assert cert["spec"]["secretName"] == volumes["tls"]["secret"]["secretName"]
    uris = cert["spec"]["uris"]
    assert uris == ["spiffe://mesh.local/orders"]
    assert {"server auth", "client auth"} <= set(cert["spec"]["usages"])
    key = cert["spec"]["privateKey"]
    assert (key["algorithm"], key["size"], key["rotationPolicy"]) == ("ECDSA", 256, "Always")
    issuer = cert["spec"]["issuerRef"]["name"]
    assert one("cert-manager.yaml", "Issuer", issuer)["spec"]["ca"]["secretName"]
    # The service's name is in the DNS SANs, and the Service sends peers to the mTLS port only.
    service = one("service.yaml", "Service")
    assert f"{service['metadata']['name']}.default.svc.cluster.local" in cert["spec"]["dnsNames"]
    assert {p["targetPort"] for p in service["spec"]["ports"]} == {"mtls", "admin"}


# -- the SPIRE variant ---------------------------------------------------------------------------


def _without(items: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    kept = [item for item in items if item["name"] != name]
    assert len(kept) == len(items) - 1, f"no {name} in {items}"
    return kept


def test_spire_variant_differs_from_the_base_only_in_where_the_identity_comes_from() -> None:
    for name in ("serviceaccount.yaml", "service.yaml", "networkpolicy.yaml"):  # copies: kustomize needs them here
        assert load(name, SPIRE) == load(name), name
    # the pod: the Secret volume and its mount replaced by the CSI volume and its mount, nothing else
    base, spire = pod_spec(), pod_spec(SPIRE)
    for spec, volume in ((base, "tls"), (spire, "spiffe-workload-api")):
        spec["volumes"] = _without(spec["volumes"], volume)
        (sidecar,) = spec["initContainers"]
        sidecar["volumeMounts"] = _without(sidecar["volumeMounts"], volume)
    assert spire == base
    base_deployment, spire_deployment = (
        one("deployment.yaml", "Deployment"),
        one("deployment.yaml", "Deployment", folder=SPIRE),
    )
    del base_deployment["spec"]["template"]["spec"], spire_deployment["spec"]["template"]["spec"]
    assert spire_deployment == base_deployment
    # the config: only `tls` differs
    base_cfg, spire_cfg = sidecar_yaml(), sidecar_yaml(SPIRE)
    assert set(base_cfg.pop("tls")) == {"cert", "key", "ca"} and set(spire_cfg.pop("tls")) == {"workload_api"}
    assert spire_cfg == base_cfg


def test_spire_variant_mounts_the_agent_socket_the_config_names() -> None:
    spec = pod_spec(SPIRE)
    (sidecar,) = spec["initContainers"]
    volume = {v["name"]: v for v in spec["volumes"]}["spiffe-workload-api"]
    assert volume["csi"] == {"driver": "csi.spiffe.io", "readOnly": True}
    mount = {m["name"]: m for m in sidecar["volumeMounts"]}["spiffe-workload-api"]
    assert mount["readOnly"] is True and "subPath" not in mount
    tls = sidecar_config(SPIRE).tls
    assert isinstance(tls, config.TLSWorkloadAPI)
    assert tls.socket.parent == Path(mount["mountPath"])
    (app,) = spec["containers"]
    assert all(m["name"] != "spiffe-workload-api" for m in app.get("volumeMounts", []))  # the app gets no identity

    # The registration gives the pods of this Deployment the identity the base's certificate has.
    entry = one("clusterspiffeid.yaml", "ClusterSPIFFEID", "orders", folder=SPIRE)
    assert entry["apiVersion"] == "spire.spiffe.io/v1alpha1"
    labels = one("deployment.yaml", "Deployment", folder=SPIRE)["spec"]["template"]["metadata"]["labels"]
    assert entry["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    namespace = one("kustomization.yaml", "Kustomization", folder=SPIRE)["namespace"]
    assert entry["spec"]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": namespace}
    rendered = entry["spec"]["spiffeIDTemplate"].replace("{{ .TrustDomain }}", "mesh.local")
    assert [rendered] == one("cert-manager.yaml", "Certificate", "orders")["spec"]["uris"]
