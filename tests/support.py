"""Test helpers: certificates on disk, a real sidecar process, backends that count, TLS clients.

Everything here uses real sockets on 127.0.0.1 and real certificates made with ``sidecar.pki``
(``cryptography``); nothing is mocked. Listeners bind port 0 and the tests read the bound port
from the sidecar's ``ready`` log line, so parallel runs never race for ports.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

from sidecar import pki

TD = "spiffe://mesh.local"
START_TIMEOUT = 15.0


@dataclass
class CertFiles:
    cert: Path
    key: Path
    issued: pki.Issued

    @property
    def serial(self) -> int:
        return self.issued.cert.serial_number


class CertFactory:
    """Issues leaves from a CA into a folder; ``ca_file`` is the trust bundle for sidecars."""

    def __init__(self, root: Path, ca: pki.Issued | None = None, name: str = "ca") -> None:
        self.root = root
        self.ca = ca or pki.new_ca(f"test {name}", trust_domain="mesh.local")
        self.ca_file = root / f"{name}.pem"
        root.mkdir(parents=True, exist_ok=True)
        pki.write_atomic(self.ca_file, self.ca.cert_pem())
        self._n = 0

    def leaf(
        self,
        name: str,
        *,
        spiffe: str | None = "",
        dns: tuple[str, ...] = ("localhost",),
        ous: tuple[str, ...] = (),
        not_before: datetime | None = None,
        not_after: datetime | None = None,
        folder: Path | None = None,
    ) -> CertFiles:
        self._n += 1
        spiffe_ids = [] if spiffe is None else [spiffe or f"{TD}/{name}"]
        issued = pki.issue(
            self.ca,
            common_name=name,
            spiffe_ids=spiffe_ids,
            dns_names=list(dns),
            organizational_units=list(ous),
            not_before=not_before,
            not_after=not_after,
        )
        out = folder or self.root / f"{name}-{self._n}"
        out.mkdir(parents=True, exist_ok=True)
        cert, key = out / "cert.pem", out / "key.pem"
        pki.write_issued(issued, cert, key)
        return CertFiles(cert, key, issued)

    def expired(self, name: str) -> CertFiles:
        now = datetime.now(UTC)
        return self.leaf(name, not_before=now - timedelta(days=2), not_after=now - timedelta(days=1))

    def not_yet_valid(self, name: str) -> CertFiles:
        now = datetime.now(UTC)
        return self.leaf(name, not_before=now + timedelta(days=1), not_after=now + timedelta(days=2))


# -- the sidecar as a process ---------------------------------------------------------------


@dataclass
class SidecarProcess:
    """``sidecar run -c CONFIG`` with its stderr captured to a file."""

    config: Path
    proc: subprocess.Popen[bytes]
    log_path: Path
    bound: dict[str, tuple[str, int]] = field(default_factory=dict)

    def port(self, listener: str) -> int:
        return self.bound[listener][1]

    def logs(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                out.append({"raw": line})
        return out

    def access(self, listener: str | None = None) -> list[dict[str, Any]]:
        return [
            r
            for r in self.logs()
            if r.get("logger") == "sidecar.access" and (listener is None or r.get("listener") == listener)
        ]

    def wait_access(self, count: int, listener: str | None = None, timeout: float = 10.0) -> list[dict[str, Any]]:
        return wait_for(lambda: r if len(r := self.access(listener)) >= count else None, timeout)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        return self.proc.returncode

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")


def write_config(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def tls_section(leaf: CertFiles, ca_file: Path, crl: Path | None = None) -> dict[str, str]:
    out = {"cert": str(leaf.cert), "key": str(leaf.key), "ca": str(ca_file)}
    if crl is not None:
        out["crl"] = str(crl)
    return out


def start_sidecar(config: Path, *, env: dict[str, str] | None = None) -> SidecarProcess:
    log_path = config.with_suffix(".log")
    log_file = open(log_path, "wb")  # noqa: SIM115 - owned by the process for its life
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "run", "-c", str(config)],
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=log_file,
        env={**os.environ, **(env or {})},
    )
    log_file.close()
    sc = SidecarProcess(config, proc, log_path)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        for rec in sc.logs():
            if rec.get("msg") == "ready":
                for name, addr in rec["listeners"].items():
                    host, _, port = addr.rpartition(":")
                    sc.bound[name] = (host.strip("[]"), int(port))
                return sc
        if proc.poll() is not None:
            raise RuntimeError(f"sidecar exited with {proc.returncode}:\n{log_path.read_text()}")
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"sidecar not ready in {START_TIMEOUT}s:\n{log_path.read_text()}")


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05) -> Any:
    """Poll until ``predicate`` returns something truthy (a generous liveness bound, not a timing)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


# -- backends --------------------------------------------------------------------------------


class Backend:
    """A plain TCP server on 127.0.0.1 that counts accepts and runs ``handler`` per connection."""

    def __init__(self, handler: Callable[[socket.socket], None] | None = None) -> None:
        self.handler = handler or echo_handler
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=512)
        self.port = self.sock.getsockname()[1]
        self.accepts = 0
        self.received = 0
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self.accepts += 1
            t = threading.Thread(target=self._run, args=(conn,), daemon=True)
            t.start()
            self._threads.append(t)

    def _run(self, conn: socket.socket) -> None:
        try:
            self.handler(conn)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self._closed = True
        self.sock.close()


def echo_handler(conn: socket.socket) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


def http_handler(conn: socket.socket) -> None:
    """Answers each request (read up to the blank line) with a small HTTP/1.1 response."""
    buf = b""
    while True:
        data = conn.recv(65536)
        if not data:
            return
        buf += data
        while b"\r\n\r\n" in buf:
            _, buf = buf.split(b"\r\n\r\n", 1)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")


# -- clients ---------------------------------------------------------------------------------


def client_context(leaf: CertFiles | None, ca_file: Path, *, tls12: bool = False) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(ca_file))
    ctx.check_hostname = False
    if tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if leaf is not None:
        ctx.load_cert_chain(str(leaf.cert), str(leaf.key))
    return ctx


def tls_connect(port: int, ctx: ssl.SSLContext, timeout: float = 10.0) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return ctx.wrap_socket(raw, server_hostname="localhost")


def tls_exchange(port: int, ctx: ssl.SSLContext, payload: bytes = b"ping", timeout: float = 10.0) -> bytes:
    """Connect, send, half-close with close_notify... read everything back. Raises on refusal."""
    with tls_connect(port, ctx, timeout) as s:
        s.sendall(payload)
        return recv_exactly(s, len(payload))


def recv_exactly(s: socket.socket, n: int) -> bytes:
    chunks = []
    got = 0
    while got < n:
        data = s.recv(min(65536, n - got))
        if not data:
            break
        chunks.append(data)
        got += len(data)
    return b"".join(chunks)


def refused(port: int, ctx: ssl.SSLContext, payload: bytes = b"ping") -> bool:
    """True when the sidecar refuses: the handshake fails or no byte of the echo comes back."""
    try:
        with tls_connect(port, ctx, timeout=10.0) as s:
            s.sendall(payload)
            return s.recv(100) == b""
    except (ssl.SSLError, OSError):
        return True


def plain_connect(port: int, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def iter_lines(path: Path) -> Iterator[str]:
    yield from path.read_text(errors="replace").splitlines()
