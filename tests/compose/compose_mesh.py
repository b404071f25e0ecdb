"""Driving docker-compose.yml with podman-compose inside a network namespace of the test's own.

Rules of this module: every podman command runs under ``nsenter --net=/run/netns/NS``, so the
bridge, the port forwards and the firewall rules podman makes live and die with that namespace and
never touch the host's; everything it creates is named by the compose project or labelled with it,
and ``Mesh.down`` removes exactly that, then the namespace. scripts/compose-test.sh prepares podman,
podman-compose, the containers.conf and the image, and passes them in the environment.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"

# Runs inside a container of the mesh: one HTTP GET, printed as JSON (status, body), no traceback.
HTTP_GET = """
import json, sys, urllib.error, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=10) as r:
        print(json.dumps({"status": r.status, "body": r.read().decode()}))
except urllib.error.HTTPError as e:
    print(json.dumps({"status": e.code, "body": e.read().decode()}))
except OSError as e:
    print(json.dumps({"status": None, "body": f"{type(e).__name__}: {e}"}))
"""

# Runs in a sidecar container, with that sidecar's own identity: the serial of the certificate
# a peer sidecar presents in a fresh mTLS handshake.
PEER_SERIAL = """
import socket, ssl, sys
from cryptography import x509
host, port = sys.argv[1], int(sys.argv[2])
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.minimum_version = ssl.TLSVersion.TLSv1_3
ctx.load_verify_locations("/certs/ca.pem")
ctx.load_cert_chain("/certs/cert.pem", "/certs/key.pem")
with socket.create_connection((host, port), timeout=5) as raw:
    with ctx.wrap_socket(raw, server_hostname=host) as tls:
        der = tls.getpeercert(binary_form=True)
print(format(x509.load_der_x509_certificate(der).serial_number, "x"))
"""

FILE_SERIAL = """
import sys
from cryptography import x509
with open(sys.argv[1], "rb") as f:
    print(format(x509.load_pem_x509_certificate(f.read()).serial_number, "x"))
"""

# Runs in an app container: one keep-alive HTTP connection to the peer, by name, on its real port
# (captured by the app's sidecar); a request, then (after a line on stdin) a second request on it.
HELD_CONNECTION = """
import socket, sys
s = socket.create_connection((sys.argv[1], 8080), timeout=15)
req = b"GET / HTTP/1.1\\r\\nHost: mesh\\r\\nConnection: keep-alive\\r\\n\\r\\n"
def one():
    s.sendall(req)
    data = b""
    while b"\\r\\n\\r\\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            return "closed"
        data += chunk
    head, _, body = data.partition(b"\\r\\n\\r\\n")
    length = int([h.split(b":")[1] for h in head.split(b"\\r\\n") if h.lower().startswith(b"content-length")][0])
    while len(body) < length:
        body += s.recv(4096)
    return head.split(b"\\r\\n")[0].decode() + " " + body.decode()
print("first", one(), flush=True)
sys.stdin.readline()
print("second", one(), flush=True)
"""


class CommandFailed(AssertionError):
    pass


@dataclass
class Mesh:
    netns: str
    project: str
    podman_compose: str
    image: str
    logs: Path
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))

    @classmethod
    def from_environment(cls) -> Mesh:
        env = dict(os.environ)
        return cls(
            netns=env["SIDECAR_COMPOSE_NETNS"],
            project=env["SIDECAR_COMPOSE_PROJECT"],
            podman_compose=env["PODMAN_COMPOSE"],
            image=env["SIDECAR_IMAGE"],
            logs=Path(env.get("SIDECAR_COMPOSE_LOGS", "build/compose-logs")),
            env=env,
        )

    # --- commands ------------------------------------------------------------------------------

    def run(
        self, argv: Sequence[str], *, check: bool = True, timeout: float = 120, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the test's network namespace; on failure the error shows its output."""
        cmd = ["nsenter", f"--net=/run/netns/{self.netns}", *argv]
        proc = subprocess.run(
            cmd, input=stdin, capture_output=True, text=True, timeout=timeout, env=self.env, cwd=ROOT, check=False
        )
        if check and proc.returncode != 0:
            raise CommandFailed(
                f"{' '.join(argv)} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
            )
        return proc

    def compose(self, *args: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        argv = [self.podman_compose, "--in-pod", "false", "-p", self.project, "-f", str(COMPOSE_FILE), *args]
        return self.run(argv, check=check, timeout=timeout)

    def podman(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return self.run(["podman", *args], check=check, timeout=timeout)

    def container(self, service: str) -> str:
        out = self.podman(
            "ps", "-a", "--format", "{{.Names}}",
            "--filter", f"label=io.podman.compose.project={self.project}",
            "--filter", f"label=com.docker.compose.service={service}",
        ).stdout.split()  # fmt: skip
        if len(out) != 1:
            raise CommandFailed(f"expected one container for service {service!r}, found {out}")
        return out[0]

    def python(self, service: str, script: str, *args: str, check: bool = True) -> str:
        """Run a Python script with the image's interpreter inside ``service``'s container."""
        return self.podman("exec", self.container(service), "python3", "-c", script, *args, check=check).stdout.strip()

    def get(self, service: str, url: str) -> tuple[int | None, str]:
        """An HTTP GET made from inside ``service``'s network namespace: (status or None, body)."""
        answer = json.loads(self.python(service, HTTP_GET, url))
        return answer["status"], answer["body"]

    def get_json(self, service: str, url: str) -> tuple[int | None, object]:
        status, body = self.get(service, url)
        try:
            return status, json.loads(body)
        except ValueError:
            return status, body

    def outsider_get(self, url: str) -> tuple[int | None, str]:
        """An HTTP GET from a container on the mesh's network that has no sidecar and no rules."""
        argv = ("run", "--rm", "--network", f"{self.project}_default", "--entrypoint", "python3", self.image)
        answer = json.loads(self.podman(*argv, "-c", HTTP_GET, url, timeout=120).stdout)
        return answer["status"], answer["body"]

    def exit_code(self, service: str) -> int | None:
        state = self.podman("inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", self.container(service))
        status, code = state.stdout.split()
        return int(code) if status == "exited" else None

    def host_get(self, url: str) -> tuple[int | None, str]:
        """An HTTP GET from the namespace's own loopback: what a published port shows the host."""
        answer = json.loads(self.run([sys.executable, "-c", HTTP_GET, url]).stdout)
        return answer["status"], answer["body"]

    def peer_serial(self, from_sidecar: str, host: str, port: int = 8080) -> str:
        """From inside ``from_sidecar``'s container, as its uid: not captured, so straight to the
        peer's port, where the peer's sidecar captures it."""
        return self.python(from_sidecar, PEER_SERIAL, host, str(port))

    def file_serial(self, service: str, path: str = "/certs/cert.pem") -> str:
        return self.python(service, FILE_SERIAL, path)

    def hold_connection(self, service: str, peer: str) -> subprocess.Popen[str]:
        """Start HELD_CONNECTION in ``service`` to ``peer``; a line to its stdin sends the second request."""
        cmd = ["nsenter", f"--net=/run/netns/{self.netns}", "podman", "exec", "-i", self.container(service)]
        return subprocess.Popen(
            [*cmd, "python3", "-u", "-c", HELD_CONNECTION, peer],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env,
        )

    def logs_of(self, service: str) -> str:
        proc = self.podman("logs", self.container(service), check=False)
        return proc.stdout + proc.stderr

    def wait_for(self, what: str, probe: object, timeout: float, interval: float = 1.0) -> object:
        """Call ``probe`` until it returns something truthy; fail naming ``what`` after ``timeout``."""
        assert callable(probe)
        deadline = time.monotonic() + timeout
        last: object = None
        while True:
            try:
                last = probe()
            except (CommandFailed, ValueError, subprocess.TimeoutExpired) as exc:
                last = exc
            else:
                if last:
                    return last
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}")
            time.sleep(interval)

    # --- lifecycle -----------------------------------------------------------------------------

    def up(self, timeout: float = 120.0) -> None:
        """Bring the mesh up in the order its ``depends_on`` gives, one wave at a time.

        Docker Compose does this itself. podman-compose turns ``depends_on`` into podman's
        ``--requires``, and podman before 5.6 cannot start a container whose stopped requirement (a
        finished init service) needs a running container of its own (the app whose network
        namespace it joined): "depends on container ... not found in input list"
        (containers/podman#26193). So each wave is started with ``--no-deps`` and this waits for the
        conditions the file declares (``service_started``: running; ``service_completed_successfully``:
        exited 0) before the next wave: the same order, checked here rather than by podman."""
        subprocess.run(["ip", "netns", "add", self.netns], check=True)
        subprocess.run(["ip", "-n", self.netns, "link", "set", "lo", "up"], check=True)
        self.env["SIDECAR_IMAGE"] = self.image
        for wave in start_waves(COMPOSE_FILE):
            self.compose("up", "-d", "--no-build", "--no-deps", *(name for name, _ in wave))
            for name, condition in wave:
                if condition is not None:
                    self.wait_for(f"{name}: {condition}", lambda n=name, c=condition: self._met(n, c), timeout)

    def _met(self, service: str, condition: str) -> bool:
        state = self.podman("inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", self.container(service))
        status, code = state.stdout.split()
        if condition == "service_completed_successfully":
            if status == "exited" and code != "0":
                raise AssertionError(f"{service} exited {code}:\n{self.logs_of(service)[-3000:]}")
            return status == "exited"
        return status == "running"

    def save_logs(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        names = self.podman(
            "ps", "-a", "--format", "{{.Names}}", "--filter", f"label=io.podman.compose.project={self.project}",
            check=False,
        ).stdout.split()  # fmt: skip
        for name in names:
            proc = self.podman("logs", name, check=False)
            (self.logs / f"{name}.log").write_text(proc.stdout + proc.stderr)

    def down(self) -> list[str]:
        """Remove everything this project made, then the namespace; returns what went wrong."""
        problems: list[str] = []
        if not Path(f"/run/netns/{self.netns}").exists():
            return problems
        steps: list[Sequence[str]] = [
            [self.podman_compose, "--in-pod", "false", "-p", self.project, "-f", str(COMPOSE_FILE),
             "--profile", "tools", "down", "-v", "-t", "10"],
        ]  # fmt: skip
        for argv in steps:
            try:
                proc = self.run(argv, check=False, timeout=120)
                if proc.returncode != 0:
                    problems.append(f"{' '.join(argv[:1])} down exited {proc.returncode}: {proc.stderr[-500:]}")
            except subprocess.TimeoutExpired:
                problems.append("compose down timed out")
        label = f"label=io.podman.compose.project={self.project}"
        leftovers = self.podman("ps", "-aq", "--filter", label, check=False).stdout.split()
        if leftovers:
            problems.append(f"containers left after down: {leftovers}")
            self.podman("rm", "-f", "-t", "2", *leftovers, check=False)
        volumes = self.podman("volume", "ls", "-q", "--filter", label, check=False).stdout.split()
        if volumes:
            problems.append(f"volumes left after down: {volumes}")
            self.podman("volume", "rm", "-f", *volumes, check=False)
        self.podman("network", "rm", "-f", f"{self.project}_default", check=False)
        # Whatever still runs in the namespace (aardvark-dns, say) was started by this test.
        pids = subprocess.run(["ip", "netns", "pids", self.netns], capture_output=True, text=True, check=False)
        for pid in pids.stdout.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGTERM)
        subprocess.run(["ip", "netns", "del", self.netns], check=False)
        return problems


def start_waves(compose_file: Path) -> list[list[tuple[str, str | None]]]:
    """The services (without a profile) in layers: each layer depends only on earlier ones; each
    service with the strongest condition any dependent declares on it (None: nobody waits for it)."""
    import yaml

    services = {
        name: spec
        for name, spec in yaml.safe_load(compose_file.read_text())["services"].items()
        if "profiles" not in spec
    }
    waits: dict[str, str] = {}
    for spec in services.values():
        for dep, how in (spec.get("depends_on") or {}).items():
            condition = how["condition"] if isinstance(how, dict) else "service_started"
            if waits.get(dep) != "service_completed_successfully":
                waits[dep] = condition
    waves: list[list[tuple[str, str | None]]] = []
    placed: set[str] = set()
    while len(placed) < len(services):
        ready = sorted(
            n for n, spec in services.items() if n not in placed and set(spec.get("depends_on") or {}) <= placed
        )
        if not ready:
            raise AssertionError(f"depends_on has a cycle among {sorted(set(services) - placed)}")
        waves.append([(n, waits.get(n)) for n in ready])
        placed.update(ready)
    return waves
