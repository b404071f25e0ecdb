"""``sidecar demo``: a whole mesh on loopback, told as a short story, checked as it goes.

Three plain HTTP apps (``sidecar.demo_app``, which knows nothing of TLS) each get a sidecar
process: frontend calls orders through its outbound listener over mTLS, and the orders app reads
who called from the x-forwarded-client-cert header its sidecar set; stranger, whose identity
orders does not allow, is refused; then orders' certificate is re-issued on disk and the next
handshake presents the new serial while a connection opened before the rotation keeps working.
Exit 0 only when every step behaved; every process and file it made is gone afterwards.
"""

from __future__ import annotations

import contextlib
import functools
import json
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509

from . import pki

TD = "mesh.local"
START_TIMEOUT = 20.0
RELOAD_TIMEOUT = 10.0


class DemoFailure(Exception):
    """A step did not behave; the message says what was expected."""


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def records(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                rec = json.loads(line)
                if isinstance(rec, dict):
                    out.append(rec)
        return out


@dataclass
class Mesh:
    root: Path
    procs: list[Proc] = field(default_factory=list)
    ports: dict[str, int] = field(default_factory=dict)

    def spawn(self, name: str, *args: str) -> Proc:
        log = self.root / f"{name}.log"
        with open(log, "wb") as out:
            popen = subprocess.Popen(
                [sys.executable, "-m", *args], stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=self.root
            )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.popen.wait(10)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait()


def run_demo(*, keep: bool = False) -> int:
    root = Path(tempfile.mkdtemp(prefix="sidecar-demo-"))
    mesh = Mesh(root)
    say = _Story()
    try:
        _story(mesh, say)
    except DemoFailure as exc:
        say.fail(str(exc))
    except KeyboardInterrupt:
        say.fail("interrupted")
    finally:
        mesh.stop()
        if keep:
            print(f"\nfiles kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    print()
    if say.failed:
        print("demo FAILED: see the step marked FAIL above")
        return 1
    print(
        "demo passed: mTLS call, caller identity, refusal and live rotation behaved; everything it started is stopped"
    )
    return 0


def _story(mesh: Mesh, say: _Story) -> None:
    root = mesh.root
    say.head("1. A development CA and one identity per workload (sidecar pki)")
    pki.init_ca(root / "pki", trust_domain=TD)
    for name in ("frontend", "orders", "stranger"):
        leaf = pki.issue_to_dir(root / "pki", name, dns_names=["localhost"], hours=1)
        say.ok(f"{name:9} spiffe://{TD}/{name}  serial {leaf.cert.serial_number:x}"[:96])

    say.head("2. Plain HTTP apps, each with a sidecar beside it (loopback only)")
    for key in ("orders_app", "orders_in", "frontend_app", "frontend_out", "stranger_app", "stranger_out", "admin"):
        mesh.ports[key] = _free_port()
    p = mesh.ports
    _sidecar_config(
        root,
        "orders",
        inbound=[
            {
                "name": "orders",
                "listen": f"127.0.0.1:{p['orders_in']}",
                "forward": f"127.0.0.1:{p['orders_app']}",
                "allow": [f"spiffe://{TD}/frontend"],
                "client_cert_header": "xfcc",
            }
        ],
        admin=p["admin"],
    )
    for caller in ("frontend", "stranger"):
        _sidecar_config(
            root,
            caller,
            outbound=[
                {
                    "name": "orders",
                    "listen": f"127.0.0.1:{p[caller + '_out']}",
                    "upstream": f"localhost:{p['orders_in']}",
                    "server_identity": [f"spiffe://{TD}/orders"],
                }
            ],
        )
    apps = {
        "orders": mesh.spawn(
            "orders-app", "sidecar.demo_app", "--name", "orders", "--listen", f"127.0.0.1:{p['orders_app']}"
        ),
        "frontend": mesh.spawn(
            "frontend-app",
            "sidecar.demo_app",
            "--name",
            "frontend",
            "--listen",
            f"127.0.0.1:{p['frontend_app']}",
            "--call",
            f"http://127.0.0.1:{p['frontend_out']}/",
        ),
        "stranger": mesh.spawn(
            "stranger-app",
            "sidecar.demo_app",
            "--name",
            "stranger",
            "--listen",
            f"127.0.0.1:{p['stranger_app']}",
            "--call",
            f"http://127.0.0.1:{p['stranger_out']}/",
        ),
    }
    cars = {
        name: mesh.spawn(f"{name}-sidecar", "sidecar", "run", "-c", f"{name}.yaml")
        for name in ("orders", "frontend", "stranger")
    }
    for name, proc in cars.items():
        _wait(
            functools.partial(_is_ready, proc),
            START_TIMEOUT,
            f"{name} sidecar did not become ready (log: {proc.log})",
            proc,
        )
    for name in apps:
        _wait(
            functools.partial(_listening, p[name + "_app"]),
            START_TIMEOUT,
            f"{name} app did not start",
            apps[name],
        )
    say.ok(f"orders   app :{p['orders_app']}  <- sidecar inbound :{p['orders_in']} (allow spiffe://{TD}/frontend)")
    say.ok(f"frontend app :{p['frontend_app']}  -> sidecar outbound :{p['frontend_out']} -> orders :{p['orders_in']}")
    say.ok(f"stranger app :{p['stranger_app']}  -> sidecar outbound :{p['stranger_out']} -> orders :{p['orders_in']}")

    say.head("3. frontend calls orders through its sidecar (plain HTTP in, mTLS between sidecars)")
    status, body = _http_get(f"http://127.0.0.1:{p['frontend_app']}/call")
    if status != 200 or body.get("callee") != "orders":
        raise DemoFailure(f"frontend's call to orders failed: HTTP {status} {body}")
    say.ok(f"frontend got HTTP 200 from the {body['callee']!r} app, which saw a plain HTTP request")
    out_rec = _last_access(cars["frontend"], "ok")
    in_rec = _last_access(cars["orders"], "ok")
    say.ok(
        f"frontend's sidecar verified the server: {out_rec['peer_identity']} ({out_rec['tls_version']}, "
        f"{out_rec['cipher']})"
    )
    say.ok(f"orders' sidecar verified the client:    {in_rec['peer_identity']} and allowed it")
    upstream = body.get("upstream")
    peer = _xfcc(upstream.get("peer") if isinstance(upstream, dict) else None)
    if peer.get("URI") != f"spiffe://{TD}/frontend":
        raise DemoFailure(f"the orders app was not told who called: {upstream}")
    say.ok(f"the orders app read who called: x-forwarded-client-cert URI={peer['URI']} Hash={peer['Hash'][:8]}...")
    forged = f"URI=spiffe://{TD}/admin"
    status, body = _http_get(f"http://127.0.0.1:{p['frontend_out']}/", {"X-Forwarded-Client-Cert": forged})
    seen = body.get("peer") if isinstance(body, dict) else None
    if status != 200 or seen is None or forged in seen or _xfcc(seen).get("URI") != f"spiffe://{TD}/frontend":
        raise DemoFailure(f"a forged x-forwarded-client-cert reached the orders app: HTTP {status} {body}")
    say.ok(f"a caller's own x-forwarded-client-cert ({forged}) is replaced before the app sees it")

    say.head("4. stranger calls orders: a valid certificate, but not on orders' allow list")
    status, body = _http_get(f"http://127.0.0.1:{p['stranger_app']}/call")
    if status == 200:
        raise DemoFailure(f"stranger reached orders: HTTP {status} {body}")
    denied = _wait(
        lambda: _find_access(cars["orders"], "denied"), 5.0, "orders' sidecar logged no denial", cars["orders"]
    )
    say.ok(f"stranger got HTTP {status}; orders' sidecar refused {denied['peer_identity']} (outcome denied)")
    say.ok("the orders app never saw that connection: the sidecar refuses before it dials the app")

    say.head("5. orders' certificate is re-issued on disk while a connection is open")
    ca_file = root / "pki" / "ca.pem"
    frontend_ctx = _client_ctx(root / "pki" / "frontend", ca_file)
    before = _served_serial(p["orders_in"], frontend_ctx)
    kept = _KeepAlive(p["frontend_out"])
    first = kept.get()
    pki.issue_to_dir(root / "pki", "orders", dns_names=["localhost"], hours=1)
    new = x509.load_pem_x509_certificate((root / "pki" / "orders" / "cert.pem").read_bytes()).serial_number
    started = time.monotonic()
    _wait(
        lambda: _served_serial(p["orders_in"], frontend_ctx) == new,
        RELOAD_TIMEOUT,
        "orders' sidecar did not present the new certificate",
        cars["orders"],
    )
    seen_after = time.monotonic() - started
    say.ok(f"serial before {before:x}")
    say.ok(f"serial after  {new:x}  (seen by the next handshake {seen_after * 1000:.0f} ms after the write)")
    second = kept.get()
    kept.close()
    if first != 200 or second != 200:
        raise DemoFailure(f"the connection opened before the rotation broke: answers {first}, {second}")
    say.ok("the connection opened before the rotation still answered afterwards: nothing was dropped")
    status, body = _http_get(f"http://127.0.0.1:{p['frontend_app']}/call")
    if status != 200:
        raise DemoFailure(f"frontend's call after the rotation failed: HTTP {status} {body}")
    say.ok("a new call from frontend succeeds against the new certificate")
    status, certs = _http_get(f"http://127.0.0.1:{p['admin']}/certs")
    served = certs.get("identity", {}).get("serial") if isinstance(certs, dict) else None
    if status != 200 or served is None or int(str(served), 16) != new:
        raise DemoFailure(f"orders' admin /certs does not report the new serial: HTTP {status} {certs}")
    say.ok(f"orders' admin endpoint agrees: GET /certs reports serial {served}")


# -- helpers ---------------------------------------------------------------------------------


class _Story:
    def __init__(self) -> None:
        self.failed = False

    def head(self, text: str) -> None:
        print(f"\n{text}", flush=True)

    def ok(self, text: str) -> None:
        print(f"   ok    {text}", flush=True)

    def fail(self, text: str) -> None:
        self.failed = True
        print(f"   FAIL  {text}", flush=True)


def _sidecar_config(
    root: Path,
    name: str,
    *,
    inbound: list[dict[str, Any]] | None = None,
    outbound: list[dict[str, Any]] | None = None,
    admin: int | None = None,
) -> None:
    cfg: dict[str, Any] = {"tls": {"cert": f"pki/{name}/cert.pem", "key": f"pki/{name}/key.pem", "ca": "pki/ca.pem"}}
    if inbound:
        cfg["inbound"] = inbound
    if outbound:
        cfg["outbound"] = outbound
    if admin:
        cfg["admin"] = {"listen": f"127.0.0.1:{admin}"}
    (root / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(check: Callable[[], Any], timeout: float, what: str, proc: Proc | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            if value := check():
                return value
        if proc is not None and proc.popen.poll() is not None:
            tail = "\n".join(proc.log.read_text(errors="replace").splitlines()[-5:])
            raise DemoFailure(f"{what}: {proc.name} exited with {proc.popen.returncode}\n{tail}")
        time.sleep(0.05)
    raise DemoFailure(f"{what} within {timeout:.0f} s")


def _is_ready(proc: Proc) -> bool:
    return any(r.get("msg") == "ready" for r in proc.records())


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


def _http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        raise DemoFailure(f"GET {url}: {exc}") from None
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def _xfcc(value: object) -> dict[str, str]:
    """The elements of an x-forwarded-client-cert value (``{}`` for none): ``URI``, ``Hash``..."""
    if not isinstance(value, str):
        return {}
    return {k: v for k, _, v in (element.partition("=") for element in value.split(";"))}


def _find_access(proc: Proc, outcome: str) -> dict[str, Any] | None:
    found = [r for r in proc.records() if r.get("logger") == "sidecar.access" and r.get("outcome") == outcome]
    return found[-1] if found else None


def _last_access(proc: Proc, outcome: str) -> dict[str, Any]:
    found: dict[str, Any] = _wait(
        lambda: _find_access(proc, outcome), 5.0, f"no '{outcome}' record from {proc.name}", proc
    )
    return found


def _client_ctx(folder: Path, ca_file: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cafile=str(ca_file))
    ctx.load_cert_chain(str(folder / "cert.pem"), str(folder / "key.pem"))
    return ctx


def _served_serial(port: int, ctx: ssl.SSLContext) -> int:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as s,
    ):
        der = s.getpeercert(binary_form=True)
    if der is None:
        raise ValueError("no certificate")
    return x509.load_der_x509_certificate(der).serial_number


class _KeepAlive:
    """One HTTP/1.1 keep-alive connection through an outbound listener, used across the rotation."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.file = self.sock.makefile("rb")

    def get(self) -> int:
        self.sock.sendall(b"GET / HTTP/1.1\r\nHost: orders\r\nConnection: keep-alive\r\n\r\n")
        status = int(self.file.readline().split()[1])
        length = 0
        while (line := self.file.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        self.file.read(length)
        return status

    def close(self) -> None:
        self.file.close()
        self.sock.close()
