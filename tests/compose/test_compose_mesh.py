"""docker-compose.yml, run for real with podman-compose: `make test-compose` (scripts/compose-test.sh).

The mesh comes up once per module inside a network namespace of the test's own; the tests call one
app from another through the sidecars, show a stranger refused, rotate a certificate live, and the
fixture tears everything down, namespace included, whatever happened.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator

import pytest
from compose_mesh import Mesh

pytestmark = pytest.mark.skipif(
    os.environ.get("SIDECAR_COMPOSE_TEST") != "1",
    reason="needs podman and a prepared image: run `make test-compose` (scripts/compose-test.sh)",
)

READY_TIMEOUT = 90.0  # the first start of a mesh also creates the CA and three identities
RELOAD_TIMEOUT = 10.0  # the contract says 2 s; the margin is for a loaded 2-core CI machine
SERVICES = ("frontend", "frontend-sidecar", "backend", "backend-sidecar", "stranger", "stranger-sidecar")
INITS = ("frontend-init", "backend-init", "stranger-init")  # one-shot: install the rules, exit 0
CALL = "http://127.0.0.1:8080/call"  # an app's own endpoint that calls its peer through the mesh


def ready(m: Mesh) -> bool:
    """The app answers through the mesh; a service that died fails at once, with its log."""
    for init in INITS:
        code = m.exit_code(init)
        if code not in (None, 0):
            pytest.fail(f"{init} exited {code}:\n{m.logs_of(init)[-3000:]}")
    for service in SERVICES:
        state = m.podman("inspect", "--format", "{{.State.Status}}", m.container(service)).stdout.strip()
        if state not in ("running", "created", "configured", "initialized"):
            pytest.fail(f"{service} is {state}:\n{m.logs_of(service)[-3000:]}")
    return m.get("frontend", CALL)[0] == 200


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    m = Mesh.from_environment()
    try:
        m.up()
        m.wait_for("frontend to answer through the mesh", lambda: ready(m), READY_TIMEOUT)
        yield m
    finally:
        try:
            m.save_logs()
        finally:
            problems = m.down()
        assert not os.path.exists(f"/run/netns/{m.netns}"), "the network namespace survived teardown"
        assert not problems, problems


@pytest.fixture(scope="module")
def has_admin(mesh: Mesh) -> bool:
    probe = "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('sidecar.admin') else 1)"
    argv = ("run", "--rm", "--network", "none", "--entrypoint", "python3", mesh.image, "-c", probe)
    return mesh.podman(*argv, check=False).returncode == 0


def started_at(mesh: Mesh, service: str) -> str:
    return mesh.podman("inspect", "--format", "{{.State.StartedAt}}", mesh.container(service)).stdout


def test_image_is_small_non_root_without_compilers(mesh: Mesh) -> None:
    inspect = json.loads(mesh.podman("image", "inspect", mesh.image).stdout)[0]
    assert inspect["Config"]["User"] == "10001:10001"
    assert inspect["Config"]["Entrypoint"] == ["sidecar"]
    assert "/readyz" in " ".join(inspect["Healthcheck"]["Test"])
    assert inspect["Size"] < 400 * 1024 * 1024, inspect["Size"]
    script = "for c in gcc cc c++ clang make; do if command -v $c; then exit 1; fi; done; id -u"
    proc = mesh.podman("run", "--rm", "--network", "none", "--entrypoint", "sh", mesh.image, "-c", script, check=False)
    assert proc.returncode == 0, f"compiler found in the final image: {proc.stdout}"
    assert proc.stdout.strip() == "10001"


def test_apps_call_each_other_through_their_sidecars(mesh: Mesh) -> None:
    status, body = mesh.get_json("frontend", CALL)
    assert status == 200, body
    assert isinstance(body, dict) and body["service"] == "frontend" and body["callee"] == "backend", body
    print("frontend /call:", body)
    status, body = mesh.get_json("backend", CALL)
    assert status == 200, body
    assert isinstance(body, dict) and body["service"] == "backend" and body["callee"] == "frontend", body


def test_the_calls_were_captured_and_carried_over_mtls(mesh: Mesh) -> None:
    # frontend's app called http://backend:8080/: its sidecar captured it, backend's sidecar too
    assert [mesh.exit_code(init) for init in INITS] == [0, 0, 0]
    assert "installed" in mesh.logs_of("frontend-init"), mesh.logs_of("frontend-init")
    status, _ = mesh.get_json("frontend", CALL)
    assert status == 200
    out = [json.loads(line) for line in mesh.logs_of("frontend-sidecar").splitlines() if '"sidecar.access"' in line]
    inb = [json.loads(line) for line in mesh.logs_of("backend-sidecar").splitlines() if '"sidecar.access"' in line]
    ok_out = [r for r in out if r["listener"] == "transparent-outbound" and r["outcome"] == "ok"]
    ok_in = [r for r in inb if r["listener"] == "transparent-inbound" and r["outcome"] == "ok"]
    assert ok_out and ok_out[-1]["original_dst"].endswith(":8080"), out[-3:]
    assert ok_out[-1]["peer_identity"] == "spiffe://mesh.local/backend" and ok_out[-1]["tls_version"] == "TLSv1.3"
    assert ok_in and ok_in[-1]["peer_identity"] == "spiffe://mesh.local/frontend", inb[-3:]
    print("frontend sidecar:", ok_out[-1])
    print("backend sidecar:", ok_in[-1])


def test_a_caller_outside_the_mesh_is_refused(mesh: Mesh) -> None:
    # A container on the same network with no sidecar: its plaintext call to backend:8080 is
    # captured by backend's rules and refused by its sidecar (strict mode); so is a connection
    # straight to the capture port.
    status, body = mesh.outsider_get("http://backend:8080/")
    assert status is None, body
    status, body = mesh.outsider_get("http://backend:15006/")
    assert status is None, body


def test_stranger_identity_is_refused(mesh: Mesh, has_admin: bool) -> None:
    status, body = mesh.get_json("stranger", CALL)
    assert status == 502, body
    assert isinstance(body, dict) and body["service"] == "stranger" and "callee" not in body, body
    log = mesh.logs_of("backend-sidecar").splitlines()
    denied = [line for line in log if "spiffe://mesh.local/stranger" in line and "denied" in line]
    assert denied, "no denial of the stranger in the backend sidecar's log:\n" + "\n".join(log[-30:])
    print("stranger /call:", status, body)
    print("backend sidecar:", denied[-1])
    if has_admin:
        status, metrics = mesh.host_get("http://127.0.0.1:9902/metrics")  # the published admin port
        assert status == 200
        denials = [
            line
            for line in metrics.splitlines()
            if line.startswith("sidecar_connections_total{") and 'direction="inbound"' in line and "denied" in line
        ]
        assert denials, metrics
        print("backend sidecar metrics:", denials)


def test_admin_ports_and_healthcheck(mesh: Mesh, has_admin: bool) -> None:
    if not has_admin:
        pytest.skip("this build of the sidecar has no admin server (sidecar.admin) yet")
    for port in (9901, 9902, 9903):
        status, body = mesh.host_get(f"http://127.0.0.1:{port}/readyz")
        assert status == 200, (port, body)
    status, metrics = mesh.host_get("http://127.0.0.1:9901/metrics")
    assert status == 200 and "sidecar_connections_total" in metrics
    # The image's HEALTHCHECK (admin /readyz) passes in each sidecar.
    for service in ("frontend-sidecar", "backend-sidecar", "stranger-sidecar"):
        proc = mesh.podman("healthcheck", "run", mesh.container(service), check=False)
        assert proc.returncode == 0, (service, proc.stdout, proc.stderr)


def test_rotated_certificate_is_presented_live(mesh: Mesh, has_admin: bool) -> None:
    started = started_at(mesh, "backend-sidecar")
    before = mesh.peer_serial("frontend-sidecar", "backend")
    assert before == mesh.file_serial("backend-sidecar")

    held = mesh.hold_connection("frontend", "backend")  # one connection through the mesh, open across the rotation
    assert held.stdin is not None and held.stdout is not None and held.stderr is not None
    try:
        first = held.stdout.readline()
        assert first.startswith("first HTTP/1.1 200") and '"backend"' in first, first + held.stderr.read()

        mesh.compose("--profile", "tools", "run", "--rm", "rotate", "backend")
        after = mesh.file_serial("backend-sidecar")
        assert after != before
        mesh.wait_for(
            "the backend sidecar to present the new serial",
            lambda: mesh.peer_serial("frontend-sidecar", "backend") == after,
            RELOAD_TIMEOUT,
            interval=0.5,
        )

        held.stdin.write("go\n")
        held.stdin.flush()
        second = held.stdout.readline()
        assert second.startswith("second HTTP/1.1 200") and '"backend"' in second, second + held.stderr.read()
    finally:
        held.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            held.wait(timeout=10)
    print(f"backend serial {before} -> {after}, presented live; one connection held across it:")
    print(f"  {first.strip()}\n  {second.strip()}")

    status, body = mesh.get_json("frontend", CALL)
    assert status == 200 and isinstance(body, dict) and body["callee"] == "backend", body
    assert started_at(mesh, "backend-sidecar") == started, "the backend sidecar restarted"
    if has_admin:
        status, certs = mesh.host_get("http://127.0.0.1:9902/certs")
        assert status == 200, certs
        serial = str(json.loads(certs)["identity"]["serial"]).lower()
        assert serial.removeprefix("0x").lstrip("0") == after.lstrip("0"), certs
