"""Test helpers: certificates on disk, a real sidecar process, backends that count, TLS clients.

Everything here uses real sockets on 127.0.0.1 and real certificates made with ``sidecar.pki``
(``cryptography``); nothing is mocked. Listeners bind port 0 and the tests read the bound port
from the sidecar's ``ready`` log line, so parallel runs never race for ports.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
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


class MemoryLink:
    """A client and a server ``SSLObject`` joined by memory BIOs: a real TLS handshake, no sockets.

    Created before the handshake, so a test can act on the client first (offer a session)."""

    def __init__(
        self, client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext, server_hostname: str | None = None
    ) -> None:
        self.c_in, self.c_out, self.s_in, self.s_out = (ssl.MemoryBIO() for _ in range(4))
        self.client = client_ctx.wrap_bio(self.c_in, self.c_out, server_side=False, server_hostname=server_hostname)
        self.server = server_ctx.wrap_bio(self.s_in, self.s_out, server_side=True)

    def handshake(self) -> None:
        """Pump bytes until both ends are done, then echo one message each way (the client reads
        any session ticket with the reply)."""
        done = {"client": False, "server": False}
        for _ in range(20):
            for side, obj in (("client", self.client), ("server", self.server)):
                if not done[side]:
                    try:
                        obj.do_handshake()
                        done[side] = True
                    except ssl.SSLWantReadError:
                        pass
            self.s_in.write(self.c_out.read())
            self.c_in.write(self.s_out.read())
            if all(done.values()):
                break
        assert all(done.values()), f"handshake did not finish: {done}"
        self.client.write(b"ping")
        self.s_in.write(self.c_out.read())
        assert self.server.read(4) == b"ping"
        self.server.write(b"pong")
        self.c_in.write(self.s_out.read())
        assert self.client.read(4) == b"pong"

    def close_cleanly(self) -> None:
        """Both ends send close_notify."""
        for obj in (self.client, self.server):
            with contextlib.suppress(ssl.SSLWantReadError):
                obj.unwrap()


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
        common_name: str | None = None,
        **issue: Any,
    ) -> CertFiles:
        """``spiffe``: "" for ``spiffe://mesh.local/NAME``, None for no URI SAN; ``common_name``
        defaults to ``name``; ``issue``: more of ``pki.issue``'s arguments (key, extended_key_usages)."""
        self._n += 1
        spiffe_ids = [] if spiffe is None else [spiffe or f"{TD}/{name}"]
        issued = pki.issue(
            self.ca,
            common_name=name if common_name is None else common_name,
            spiffe_ids=spiffe_ids,
            dns_names=list(dns),
            organizational_units=list(ous),
            not_before=not_before,
            not_after=not_after,
            **issue,
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


def inbound_config(
    path: Path, leaf: CertFiles, ca_file: Path, listeners: dict[str, tuple[str, list[str]]], **top: Any
) -> Path:
    """A config of inbound listeners on 127.0.0.1:0, name -> (forward address, allow); ``top``: more
    top-level sections (limits, admin, log...)."""
    return write_config(
        path,
        {
            "tls": tls_section(leaf, ca_file),
            "inbound": [
                {"name": name, "listen": "127.0.0.1:0", "forward": forward, "allow": allow}
                for name, (forward, allow) in listeners.items()
            ],
            **top,
        },
    )


# SPIFFE IDs a raw string match of ``spiffe://mesh.local/jobs/*`` or ``/jobs/**`` would admit, and the
# SPIFFE-ID standard forbids (issue 16): each must match no pattern at all.
SPIFFE_TRICKS = (
    f"{TD}/jobs/x?y=1",
    f"{TD}/jobs/x#f",
    f"{TD}/jobs/..",
    f"{TD}/jobs/.",
    f"{TD}/jobs/%2e%2e",
    f"{TD}/jobs/../admin",
    f"{TD}/jobs/x/../../admin",
    f"{TD}/jobs//x",
    f"{TD}/jobs/x/",
    "spiffe://MESH.local/jobs/x",
    "SPIFFE://mesh.local/jobs/x",
    "spiffe://mesh.local:443/jobs/x",
    "spiffe://evil@mesh.local/jobs/x",
)


def start_sidecar(config: Path, *, env: dict[str, str] | None = None, max_fds: int | None = None) -> SidecarProcess:
    """``sidecar run -c config``, ready; ``max_fds``: its open-files limit (RLIMIT_NOFILE), to exhaust."""
    log_path = config.with_suffix(".log")
    log_file = open(log_path, "wb")  # noqa: SIM115 - owned by the process for its life

    def limit() -> None:
        if max_fds is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max_fds, max_fds))

    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "run", "-c", str(config)],
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=log_file,
        env={**os.environ, **(env or {})},
        start_new_session=True,  # its own process group: teardown kills its workers too
        preexec_fn=limit if max_fds is not None else None,
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


def tls_call(
    port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None = None, payload: bytes = b"ping"
) -> tuple[bytes, ssl.SSLSession | None, bool]:
    """One TLS call to 127.0.0.1:port, offering ``session``: (answer, the session to resume with
    next, whether this one resumed). A refusal answers b""; the ticket of a refused handshake is
    still returned (TLS 1.3 sends it right after the handshake)."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost", session=session) as s,
    ):
        s.sendall(payload)
        answer = b""
        with contextlib.suppress(ssl.SSLError, ConnectionResetError):
            answer = recv_exactly(s, len(payload))
        return answer, s.session, s.session_reused


def refused(port: int, ctx: ssl.SSLContext, payload: bytes = b"ping") -> bool:
    """True when the sidecar refuses: the handshake fails or no byte of the echo comes back."""
    try:
        with tls_connect(port, ctx, timeout=10.0) as s:
            s.sendall(payload)
            return s.recv(100) == b""
    except (ssl.SSLError, OSError):
        return True


async def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two ends of one TCP connection on 127.0.0.1, non-blocking: (accepted, connecting)."""
    import asyncio

    loop = asyncio.get_running_loop()
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.setblocking(False)
        far = socket.socket()
        far.setblocking(False)
        await loop.sock_connect(far, server.getsockname())
        mine, _ = await loop.sock_accept(server)
    mine.setblocking(False)
    return mine, far


def plain_connect(port: int, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def iter_lines(path: Path) -> Iterator[str]:
    yield from path.read_text(errors="replace").splitlines()


# -- TLS by hand, a recording TLS upstream, sidecar pairs (outbound, integrity, limits, lifecycle) --


def server_context(leaf: CertFiles, ca_file: Path) -> ssl.SSLContext:
    """A TLS 1.3 server context that requires a client certificate from ``ca_file``'s CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(str(leaf.cert), str(leaf.key))
    ctx.load_verify_locations(cafile=str(ca_file))
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class TLSConn:
    """An ``ssl.SSLObject`` over a blocking socket, driven by hand.

    Unlike ``SSLSocket`` it can half-close: ``close_notify()`` sends close_notify and the read side
    stays usable (TLS 1.3), and after a failed handshake the raw socket can still be read.
    ``recv`` returns b"" at the end of data; ``clean_eof`` says whether that end was a close_notify.
    """

    def __init__(
        self, sock: socket.socket, ctx: ssl.SSLContext, *, server_side: bool, server_hostname: str | None = None
    ) -> None:
        self.sock = sock
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_side=server_side, server_hostname=server_hostname)
        self.clean_eof: bool | None = None

    def _flush(self) -> None:
        if self.outgoing.pending:
            self.sock.sendall(self.outgoing.read())

    def _run(self, op: Callable[[], Any]) -> Any:
        while True:
            try:
                result = op()
            except ssl.SSLWantReadError:
                self._flush()
                data = self.sock.recv(262144)
                if data:
                    self.incoming.write(data)
                else:
                    self.incoming.write_eof()
                continue
            except ssl.SSLError:
                with contextlib.suppress(OSError):
                    self._flush()  # the alert saying why, if the peer still listens
                raise
            self._flush()
            return result

    def handshake(self) -> None:
        self._run(self.obj.do_handshake)

    def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            chunk, view = view[:65536], view[65536:]
            self._run(lambda c=chunk: self.obj.write(c))

    def recv(self, n: int = 262144) -> bytes:
        try:
            data: bytes = self._run(lambda: self.obj.read(n))
        except ssl.SSLZeroReturnError:
            self.clean_eof = True
            return b""
        except ssl.SSLEOFError:
            self.clean_eof = False
            return b""
        if not data:  # SSLObject.read returns b"" (rather than raising) on a close_notify
            self.clean_eof = True
        return data

    def recv_all(self) -> bytes:
        chunks = []
        while data := self.recv():
            chunks.append(data)
        return b"".join(chunks)

    def close_notify(self) -> None:
        """Finish sending (close_notify); keep reading with ``recv``."""
        with contextlib.suppress(ssl.SSLWantReadError, ssl.SSLZeroReturnError):
            self.obj.unwrap()
        self._flush()

    def close(self) -> None:
        self.sock.close()


def tls_client(port: int, leaf: CertFiles | None, ca_file: Path, timeout: float = 10.0) -> TLSConn:
    """A handshaken ``TLSConn`` to 127.0.0.1:port (client certificate ``leaf``; no hostname check)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    conn = TLSConn(raw, client_context(leaf, ca_file), server_side=False, server_hostname="localhost")
    conn.handshake()
    return conn


@dataclass
class TLSSession:
    """What one connection to a ``TLSServer`` showed: the handshake result and every byte."""

    error: str | None = None  # why the handshake failed, None when it succeeded
    plaintext: bytearray = field(default_factory=bytearray)  # decrypted application data received
    raw_after_failure: bytearray = field(default_factory=bytearray)  # raw bytes after a failed handshake
    done: threading.Event = field(default_factory=threading.Event)


class TLSServer:
    """A TLS 1.3 upstream in a thread (client certificates required) that records what it gets.

    Every decrypted byte is kept in ``sessions[i].plaintext`` and echoed back; when the handshake
    fails, whatever arrives afterwards on the raw socket is kept in ``raw_after_failure``. ``sock``
    may be a bound socket that is not listening yet (a "closed port" that later opens).
    """

    def __init__(self, leaf: CertFiles, ca_file: Path, *, sock: socket.socket | None = None) -> None:
        self.ctx = server_context(leaf, ca_file)
        self.sock = sock or socket.create_server(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.sessions: list[TLSSession] = []
        self._closed = False
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def accepts(self) -> int:
        return len(self.sessions)

    def plaintext(self) -> bytes:
        return b"".join(bytes(s.plaintext) for s in self.sessions)

    def _serve(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            session = TLSSession()
            self.sessions.append(session)
            threading.Thread(target=self._run, args=(conn, session), daemon=True).start()

    def _run(self, raw: socket.socket, session: TLSSession) -> None:
        raw.settimeout(10)
        conn = TLSConn(raw, self.ctx, server_side=True)
        try:
            try:
                conn.handshake()
            except (ssl.SSLError, OSError) as exc:
                session.error = str(exc) or type(exc).__name__
                with contextlib.suppress(OSError):
                    while data := raw.recv(65536):
                        session.raw_after_failure += data
                return
            while data := conn.recv():
                session.plaintext += data
                conn.sendall(data)
            conn.close_notify()
        except (ssl.SSLError, OSError):
            pass
        finally:
            raw.close()
            session.done.set()

    def close(self) -> None:
        self._closed = True
        self.sock.close()


def unlistened_socket() -> socket.socket:
    """A socket bound to a free loopback port but not listening: connecting there is refused."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    return s


def start_pair(
    folder: Path,
    ca: CertFactory,
    forwards: dict[str, str],
    *,
    limits: dict[str, Any] | None = None,
    workers: int = 1,
) -> tuple[SidecarProcess, SidecarProcess]:
    """Two sidecars: app -> outbound sidecar (frontend) -> inbound sidecar (orders) -> backend.

    ``forwards`` maps a listener name to a backend address; each name is an inbound listener on the
    first sidecar and an outbound listener (to it) on the second. Returns (inbound, outbound).
    """
    folder.mkdir(parents=True, exist_ok=True)
    orders, frontend = ca.leaf("orders"), ca.leaf("frontend")
    inbound_cfg = write_config(
        folder / "pair-in.yaml",
        {
            "tls": tls_section(orders, ca.ca_file),
            "inbound": [
                {"name": name, "listen": "127.0.0.1:0", "forward": addr, "allow": [f"{TD}/frontend"]}
                for name, addr in forwards.items()
            ],
            "limits": limits or {},
            "workers": workers,
        },
    )
    inbound = start_sidecar(inbound_cfg)
    try:
        outbound_cfg = write_config(
            folder / "pair-out.yaml",
            {
                "tls": tls_section(frontend, ca.ca_file),
                "outbound": [
                    {
                        "name": name,
                        "listen": "127.0.0.1:0",
                        "upstream": f"127.0.0.1:{inbound.port(name)}",
                        "server_identity": [f"{TD}/orders"],
                    }
                    for name in forwards
                ],
                "limits": limits or {},
                "workers": workers,
            },
        )
        outbound = start_sidecar(outbound_cfg)
    except BaseException:
        kill(inbound)
        raise
    return inbound, outbound


@contextlib.contextmanager
def running_pair(
    folder: Path,
    ca: CertFactory,
    forwards: dict[str, str],
    *,
    limits: dict[str, Any] | None = None,
    workers: int = 1,
) -> Iterator[tuple[SidecarProcess, SidecarProcess]]:
    """``start_pair``; on the way out both must drain and exit 0 (and are killed either way)."""
    inbound, outbound = start_pair(folder, ca, forwards, limits=limits, workers=workers)
    try:
        yield inbound, outbound
        assert outbound.stop() == 0
        assert inbound.stop() == 0
    finally:
        kill(inbound, outbound)


def kill(*procs: SidecarProcess) -> None:
    """Kill sidecars still running, worker processes included (test teardown)."""
    for sc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(sc.proc.pid, signal.SIGKILL)
        sc.proc.wait()


def children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (a supervisor's workers)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rpartition(")")[2].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(stat.parent.name))
    return out


# -- the admin server ------------------------------------------------------------------------


def admin_address(sc: SidecarProcess) -> tuple[str, int]:
    """The admin server's bound address, read from its ``admin listening`` log line."""
    for rec in sc.logs():
        if rec.get("msg") == "admin listening":
            host, _, port = str(rec["address"]).rpartition(":")
            return host.strip("[]"), int(port)
    raise AssertionError(f"no 'admin listening' line in the sidecar's log:\n{sc.log_path.read_text()}")


@dataclass
class HTTPAnswer:
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode()


def http_request(
    address: tuple[str, int], method: str, path: str, body: bytes | None = None, timeout: float = 10.0
) -> HTTPAnswer:
    import http.client

    conn = http.client.HTTPConnection(address[0], address[1], timeout=timeout)
    try:
        conn.request(method, path, body=body)
        resp = conn.getresponse()
        return HTTPAnswer(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def admin_request(sc: SidecarProcess, method: str, path: str, body: bytes | None = None) -> HTTPAnswer:
    return http_request(admin_address(sc), method, path, body)


class Scrape:
    """One ``/metrics`` answer, parsed with prometheus_client's own parser."""

    def __init__(self, text: str) -> None:
        from prometheus_client.parser import text_string_to_metric_families

        self.text = text
        self.families = list(text_string_to_metric_families(text))
        self.samples = [(s.name, dict(s.labels), s.value) for fam in self.families for s in fam.samples]

    def value(self, name: str, **labels: str) -> float:
        """The value of the one sample called ``name`` whose labels are exactly ``labels``."""
        found = [v for n, lbl, v in self.samples if n == name and lbl == labels]
        if len(found) != 1:
            near = [(n, lbl, v) for n, lbl, v in self.samples if n == name]
            raise AssertionError(f"{len(found)} samples {name}{labels}; samples of that name: {near}")
        return found[0]

    def series(self, name: str, **labels: str) -> dict[tuple[tuple[str, str], ...], float]:
        """Every sample called ``name`` whose labels include ``labels``, keyed by its sorted labels."""
        return {
            tuple(sorted(lbl.items())): v
            for n, lbl, v in self.samples
            if n == name and all(lbl.get(k) == want for k, want in labels.items())
        }


def scrape(sc: SidecarProcess) -> Scrape:
    answer = admin_request(sc, "GET", "/metrics")
    assert answer.status == 200, answer
    return Scrape(answer.text)


def peer_serial(port: int, ctx: ssl.SSLContext) -> int:
    """The serial number of the certificate a TLS server presents on ``port``."""
    from cryptography import x509

    with tls_connect(port, ctx) as s:
        der = s.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def doubler_handler(conn: socket.socket) -> None:
    """Answers every byte with two, so the bytes each way differ and are known exactly."""
    while data := conn.recv(65536):
        conn.sendall(data * 2)


class BlackHole:
    """A loopback port whose accept queue is full: connecting there hangs until the dialer gives up."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0)
        self.port = self.sock.getsockname()[1]
        self._filler = socket.create_connection(("127.0.0.1", self.port))  # takes the one queue slot

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self._filler.close()
        self.sock.close()


class TunnelWire:
    """An HBONE client and server object joined in memory, optionally through a ``MemoryLink``
    (real TLS in between); ``pump`` moves bytes both ways until both are quiet, collecting events.

    ``auto_consume`` plays a driver whose TCP side writes everything at once: each delivered
    byte is reported consumed, which is what reopens the sender's window."""

    def __init__(self, client: Any, server: Any, link: MemoryLink | None = None) -> None:
        self.client, self.server, self.link = client, server, link
        self.now = 0.0
        self.client_events: list[Any] = []
        self.server_events: list[Any] = []
        self.received: dict[tuple[str, int], bytearray] = {}
        self.auto_consume = {"client": True, "server": True}
        self.chop: Callable[[bytes], list[bytes]] | None = None  # split what one side reads, as a socket may

    def _carry(self, data: bytes, to_server: bool) -> bytes:
        if self.link is None or not data:
            return data
        src, bio, dst = (
            (self.link.client, self.link.s_in, self.link.server)
            if to_server
            else (self.link.server, self.link.c_in, self.link.client)
        )
        src.write(data)
        bio.write((self.link.c_out if to_server else self.link.s_out).read())
        out = bytearray()
        with contextlib.suppress(ssl.SSLWantReadError):
            while chunk := dst.read(1 << 20):
                out += chunk
        return bytes(out)

    def pump(self, rounds: int = 10_000) -> None:
        for _ in range(rounds):
            moved = False
            for conn, peer, to_server in ((self.client, self.server, True), (self.server, self.client, False)):
                data = self._carry(conn.data_to_send(), to_server)
                if data:
                    moved = True
                    for piece in self.chop(data) if self.chop is not None else [data]:
                        peer.receive_data(piece, self.now)
            for side, conn, sink in (
                ("client", self.client, self.client_events),
                ("server", self.server, self.server_events),
            ):
                for event in conn.events():
                    sink.append(event)
                    moved = True
                    if type(event).__name__ == "StreamData":
                        self.received.setdefault((side, event.stream_id), bytearray()).extend(event.data)
                        if self.auto_consume[side]:
                            conn.consumed(event.stream_id, len(event.data))
            if not moved:
                return
        raise AssertionError("the wire never went quiet")

    def of(self, side: str, kind: type, stream_id: int | None = None) -> list[Any]:
        events = self.client_events if side == "client" else self.server_events
        return [e for e in events if isinstance(e, kind) and (stream_id is None or e.stream_id == stream_id)]


class H2Client:
    """A bare HTTP/2 client over TLS (ALPN ``h2`` unless told otherwise) on python-hyper's ``h2``,
    driven by hand: what a third-party HBONE peer could send, including what ours never would."""

    def __init__(self, port: int, ctx: ssl.SSLContext, alpn: tuple[str, ...] = ("h2",)) -> None:
        import h2.config
        import h2.connection

        ctx.set_alpn_protocols(list(alpn))
        self.sock = tls_connect(port, ctx)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.conn.initiate_connection()
        self.status: dict[int, int] = {}
        self.data: dict[int, bytearray] = {}
        self.ended: set[int] = set()
        self.reset: dict[int, int] = {}
        self.closed = False
        self._flush()

    def request(self, headers: list[tuple[str, str]], *, end_stream: bool = False) -> int:
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, [(k.encode(), v.encode()) for k, v in headers], end_stream=end_stream)
        self._flush()
        return sid

    def connect(self, authority: str) -> int:
        return self.request([(":method", "CONNECT"), (":authority", authority)])

    def send(self, sid: int, data: bytes, *, end_stream: bool = False) -> None:
        self.conn.send_data(sid, data, end_stream=end_stream)
        self._flush()

    def pump(self, until: Callable[[], bool], timeout: float = 10.0) -> None:
        """Read and answer frames until ``until()`` holds (or the connection closes)."""
        import h2.events as e

        deadline = time.monotonic() + timeout
        while not until():
            if self.closed:
                raise AssertionError("the connection closed first")
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met within {timeout}s")
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(1 << 20)
            except TimeoutError:
                continue
            if not chunk:
                self.closed = True
                continue
            for ev in self.conn.receive_data(chunk):
                if isinstance(ev, e.ResponseReceived):
                    self.status[ev.stream_id] = int(dict(ev.headers)[b":status"])
                elif isinstance(ev, e.DataReceived):
                    self.data.setdefault(ev.stream_id, bytearray()).extend(ev.data)
                    self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, e.StreamEnded):
                    self.ended.add(ev.stream_id)
                elif isinstance(ev, e.StreamReset):
                    self.reset[ev.stream_id] = int(ev.error_code)
                elif isinstance(ev, e.ConnectionTerminated):
                    self.closed = True
            self._flush()

    def _flush(self) -> None:
        out = self.conn.data_to_send()
        if out:
            self.sock.sendall(out)

    def close(self) -> None:
        self.sock.close()
