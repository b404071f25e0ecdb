"""The caller's identity as real apps receive it, through a real sidecar pair (contract section 9).

calling app (this test, plain HTTP bytes) -> outbound sidecar (frontend) -> mTLS -> inbound sidecar
(orders) -> app. The inbound listeners:
- ``app``: ``client_cert_header: xfcc`` to an aiohttp app that echoes the x-forwarded-client-cert
  values it reads, and records every request it serves;
- ``raw``: ``client_cert_header: xfcc`` to a recorder that keeps every byte it receives and frames
  requests with h11 (trailers included), so a header hidden anywhere would show;
- ``full``: ``proxy_protocol: tls-full`` and xfcc to the recorder reading the PROXY v2 header with
  the ``proxy-protocol`` package first;
- ``nginx``: ``proxy_protocol: tls-full`` to nginx (``listen ... proxy_protocol``), answering with
  ``$proxy_protocol_addr``; ``haproxy``: ``proxy_protocol: tls`` to HAProxy (``accept-proxy``),
  answering with the addresses and the authority TLV it parsed.

Spoofing attempts (the calling app sends its own x-forwarded-client-cert in every form) never
reach an app; smuggling attempts get ``400`` and a closed connection, are counted and logged, and
the app never sees the refused request.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import aiohttp
import h11
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID, ObjectIdentifier
from proxyprotocol.result import ProxyResultIPv4
from proxyprotocol.v2 import ProxyProtocolV2
from support import (
    TD,
    CertFactory,
    CertFiles,
    Scrape,
    SidecarProcess,
    admin_request,
    kill,
    start_sidecar,
    tls_client,
    tls_section,
    wait_for,
    write_config,
)

from sidecar import pki

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)
LIMIT = 10.0
ANY_XFCC = re.compile(rb"x[-_]forwarded[-_]client[-_]cert", re.IGNORECASE)
SPOOF = 'By=spiffe://mesh.local/orders;Hash=00;Subject="CN=admin";URI=spiffe://mesh.local/admin'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the apps ----------------------------------------------------------------------------------------


@dataclass
class Seen:
    """One request as the recorder's h11 framed it."""

    target: str
    headers: list[tuple[bytes, bytes]]
    body: bytes
    trailers: list[tuple[bytes, bytes]]


@dataclass
class Visit:
    """One connection to the recorder: its PROXY header (parsed), raw bytes and requests."""

    proxy: Any = None
    raw: bytearray = field(default_factory=bytearray)
    requests: list[Seen] = field(default_factory=list)
    reset: bool = False  # the connection ended with a reset (the sidecar aborted it)
    done: threading.Event = field(default_factory=threading.Event)


class Recorder:
    """A plain HTTP/1.1 app on 127.0.0.1 that keeps every byte and answers each request with the
    x-forwarded-client-cert values h11 saw. ``proxy``: it reads a PROXY v2 header first."""

    def __init__(self, *, proxy: bool = False) -> None:
        self.proxy = proxy
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.visits: list[Visit] = []
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def requests(self) -> list[Seen]:
        return [r for v in self.visits for r in v.requests]

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            visit = Visit()
            self.visits.append(visit)
            threading.Thread(target=self._run, args=(conn, visit), daemon=True).start()

    def _run(self, conn: socket.socket, visit: Visit) -> None:
        conn.settimeout(LIMIT)
        try:
            with conn:
                self._talk(conn, visit)
        except ConnectionResetError:
            visit.reset = True
        except (OSError, h11.RemoteProtocolError):
            pass
        finally:
            visit.done.set()

    def _talk(self, conn: socket.socket, visit: Visit) -> None:
        if self.proxy:
            head = _recv_exactly(conn, 16)
            header = head + _recv_exactly(conn, int.from_bytes(head[14:16], "big"))
            visit.proxy = ProxyProtocolV2().unpack(header)
        h = h11.Connection(h11.SERVER)
        current: dict[str, Any] = {}
        while True:
            event = h.next_event()
            if event is h11.NEED_DATA:
                data = conn.recv(65536)
                visit.raw += data
                h.receive_data(data)
                if not data:
                    return
                continue
            if isinstance(event, h11.Request):
                current = {"target": event.target.decode(), "headers": list(event.headers), "body": b""}
            elif isinstance(event, h11.Data):
                current["body"] += event.data
            elif isinstance(event, h11.EndOfMessage):
                seen = Seen(current["target"], current["headers"], current["body"], list(event.headers))
                visit.requests.append(seen)
                xfcc = [v.decode() for n, v in seen.headers if n == b"x-forwarded-client-cert"]
                body = json.dumps({"xfcc": xfcc}).encode()
                conn.sendall(
                    h.send(h11.Response(status_code=200, headers=[("content-length", str(len(body)))]))
                    + h.send(h11.Data(data=body))
                    + h.send(h11.EndOfMessage())
                )
                h.start_next_cycle()
            elif isinstance(event, h11.ConnectionClosed):
                return

    def close(self) -> None:
        self.sock.close()


def _recv_exactly(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionResetError("closed early")
        data += chunk
    return data


class AioApp:
    """A real aiohttp app in a thread of its own: echoes the x-forwarded-client-cert values and the
    raw header names of each request, serves a WebSocket echo, records every path it serves."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.loop = asyncio.new_event_loop()
        self.port = 0
        started = threading.Event()
        threading.Thread(target=self._run, args=(started,), daemon=True).start()
        assert started.wait(LIMIT), "the aiohttp app did not start"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_get("/ws", self._ws)
        app.router.add_route("*", "/{tail:.*}", self._echo)
        self.runner = web.AppRunner(app, access_log=None)
        self.loop.run_until_complete(self.runner.setup())
        site = web.SockSite(self.runner, socket.create_server(("127.0.0.1", 0)))
        self.loop.run_until_complete(site.start())
        self.port = site._sock.getsockname()[1]  # type: ignore[union-attr]
        started.set()
        self.loop.run_forever()

    async def _echo(self, request: web.Request) -> web.Response:
        self.paths.append(request.path)
        await request.read()
        return web.json_response(
            {
                "xfcc": request.headers.getall("x-forwarded-client-cert", []),
                "names": [name.decode() for name, _ in request.raw_headers],
            }
        )

    async def _ws(self, request: web.Request) -> web.WebSocketResponse:
        self.paths.append(request.path)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str(json.dumps(request.headers.getall("x-forwarded-client-cert", [])))
        async for msg in ws:
            await ws.send_str("echo:" + msg.data)
        return ws

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(LIMIT)
        self.loop.call_soon_threadsafe(self.loop.stop)


# -- nginx and HAProxy behind the inbound sidecar ------------------------------------------------------

NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    default_type text/plain;
    server {{
        listen 127.0.0.1:{port} proxy_protocol;
        client_header_buffer_size 4k;
        location / {{ return 200 "$proxy_protocol_addr:$proxy_protocol_port $proxy_protocol_server_port"; }}
    }}
}}
"""

HAPROXY_CONF = """\
global
    log stderr format raw local0
defaults
    mode http
    timeout connect 5s
    timeout client 10s
    timeout server 10s
frontend fe
    bind 127.0.0.1:{port} accept-proxy
    http-request return status 200 content-type text/plain lf-string "%[src]:%[src_port] %[dst_port] %[fc_pp_authority]"
"""


@contextlib.contextmanager
def tool(argv: list[str], port: int, folder: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``argv`` until the test module ends; ready once ``port`` accepts."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=(folder / "stderr").open("wb"))
    try:
        deadline = time.monotonic() + LIMIT
        while True:
            assert proc.poll() is None, f"{argv[0]} exited: {(folder / 'stderr').read_text()}"
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            assert time.monotonic() < deadline, f"{argv[0]} did not listen on {port}"
            time.sleep(0.05)
        yield proc
    finally:
        proc.terminate()
        proc.wait(LIMIT)


# -- the pair ------------------------------------------------------------------------------------------


@dataclass
class Mesh:
    inbound: SidecarProcess
    outbound: SidecarProcess
    app: AioApp
    raw: Recorder
    full: Recorder
    frontend_der: bytes
    nginx: bool
    haproxy: bool

    def port(self, name: str) -> int:
        return self.outbound.port(name)

    def expected_xfcc(self) -> str:
        digest = hashlib.sha256(self.frontend_der).hexdigest()
        return f'By={TD}/orders;Hash={digest};Subject="CN=frontend";URI={TD}/frontend;DNS=localhost'


@pytest.fixture(scope="module")
def mesh(ca: CertFactory, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    folder = tmp_path_factory.mktemp("identity")
    orders, frontend = ca.leaf("orders"), ca.leaf("frontend")
    der = x509.load_pem_x509_certificate(frontend.cert.read_bytes()).public_bytes(serialization.Encoding.DER)
    app, raw, full = AioApp(), Recorder(), Recorder(proxy=True)
    with contextlib.ExitStack() as stack:
        listeners = [
            {"name": "app", "forward": app.address, "client_cert_header": "xfcc"},
            {"name": "raw", "forward": raw.address, "client_cert_header": "xfcc"},
            {
                "name": "full",
                "forward": full.address,
                "proxy_protocol": "tls-full",
                "client_cert_header": "xfcc",
                "allow": [f"{TD}/frontend", f"{TD}/big/*"],
            },
        ]
        if NGINX is not None:
            port, d = free_port(), folder / "nginx"
            d.mkdir()
            (d / "nginx.conf").write_text(NGINX_CONF.format(d=d, port=port))
            stack.enter_context(
                tool([NGINX, "-p", str(d), "-c", str(d / "nginx.conf"), "-e", str(d / "e.log")], port, d)
            )
            listeners.append({"name": "nginx", "forward": f"127.0.0.1:{port}", "proxy_protocol": "tls-full"})
        if HAPROXY is not None:
            port, d = free_port(), folder / "haproxy"
            d.mkdir()
            (d / "haproxy.cfg").write_text(HAPROXY_CONF.format(port=port))
            stack.enter_context(tool([HAPROXY, "-db", "-f", str(d / "haproxy.cfg")], port, d))
            listeners.append({"name": "haproxy", "forward": f"127.0.0.1:{port}", "proxy_protocol": "tls"})
        inbound = start_sidecar(
            write_config(
                folder / "in.yaml",
                {
                    "tls": tls_section(orders, ca.ca_file),
                    "inbound": [{"listen": "127.0.0.1:0", "allow": [f"{TD}/frontend"], **x} for x in listeners],
                    "admin": {"listen": "127.0.0.1:0"},
                },
            )
        )
        stack.callback(kill, inbound)
        outbound = start_sidecar(
            write_config(
                folder / "out.yaml",
                {
                    "tls": tls_section(frontend, ca.ca_file),
                    "outbound": [
                        {
                            "name": x["name"],
                            "listen": "127.0.0.1:0",
                            "upstream": f"127.0.0.1:{inbound.port(x['name'])}",
                            "server_identity": [f"{TD}/orders"],
                            "sni": "orders.mesh.local",
                        }
                        for x in listeners
                    ],
                },
            )
        )
        stack.callback(kill, outbound)
        stack.callback(app.close)
        stack.callback(raw.close)
        stack.callback(full.close)
        yield Mesh(inbound, outbound, app, raw, full, der, NGINX is not None, HAPROXY is not None)


def exchange(
    port: int, data: bytes, *, answers: int = 1, closes: bool = False
) -> list[tuple[int, dict[str, str], bytes]]:
    """Send ``data`` as the calling app and read up to ``answers`` responses with h11: (status,
    headers, body) each, fewer if the connection closes first. ``closes``: then the sidecar must
    close the connection, with no byte after the last answer."""
    h = h11.Connection(h11.CLIENT)
    out: list[tuple[int, dict[str, str], bytes]] = []
    with socket.create_connection(("127.0.0.1", port), timeout=LIMIT) as s:
        s.sendall(data)
        for _ in range(answers):
            # h11 frames answers to requests it believes it sent: tell it of one per answer
            h.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
            h.send(h11.EndOfMessage())
            answer = _answer(h, s)
            if answer is None:
                break
            out.append(answer)
            if h.their_state is not h11.DONE or h.our_state is not h11.DONE:
                break
            h.start_next_cycle()
        if closes:
            with contextlib.suppress(ConnectionResetError):
                rest = s.recv(65536)
                assert rest == b"", f"bytes after the last answer: {rest!r}"
    return out


def _answer(h: h11.Connection, s: socket.socket) -> tuple[int, dict[str, str], bytes] | None:
    status, headers, body = 0, {}, b""
    while True:
        event = h.next_event()
        if event is h11.NEED_DATA:
            h.receive_data(s.recv(65536))
        elif isinstance(event, h11.Response):
            status, headers = event.status_code, {k.decode(): v.decode() for k, v in event.headers}
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return status, headers, body
        elif isinstance(event, h11.ConnectionClosed):
            return None


def get(path: str, *extra: str) -> bytes:
    return "\r\n".join([f"GET {path} HTTP/1.1", "Host: orders", *extra, "", ""]).encode()


def records(sc: SidecarProcess, listener: str) -> list[dict[str, Any]]:
    """``listener``'s access records so far, once none of its connections is open any more (an
    earlier test's may still be closing: its record must not be taken for the next one's)."""
    wait_for(lambda: scrape(sc).value("sidecar_active_connections", listener=listener, direction="inbound") == 0)
    return sc.access(listener)


def scrape(sc: SidecarProcess) -> Scrape:
    return Scrape(admin_request(sc, "GET", "/metrics").text)


def next_record(sc: SidecarProcess, listener: str, before: int) -> dict[str, Any]:
    """The access record of the one connection on ``listener`` since there were ``before``."""
    [record] = wait_for(lambda: r[before:] if len(r := sc.access(listener)) > before else None, LIMIT)
    return record


def counted(sc: SidecarProcess, listener: str, outcome: str) -> float:
    return scrape(sc).value("sidecar_connections_total", listener=listener, direction="inbound", outcome=outcome)


def xfcc_names(names: list[str]) -> list[str]:
    return [n for n in names if ANY_XFCC.fullmatch(n.encode())]


# -- x-forwarded-client-cert: exactly one, ours ----------------------------------------------------------


def test_the_app_reads_exactly_one_xfcc_ours(mesh: Mesh) -> None:
    before = len(records(mesh.inbound, "app"))
    [(status, _, body)] = exchange(mesh.port("app"), get("/hello"))
    assert status == 200
    answer = json.loads(body)
    assert answer["xfcc"] == [mesh.expected_xfcc()]
    assert xfcc_names(answer["names"]) == ["x-forwarded-client-cert"]  # added after the caller's fields
    assert answer["names"][-1] == "x-forwarded-client-cert"
    rec = next_record(mesh.inbound, "app", before)
    assert (rec["outcome"], rec["peer_identity"]) == ("ok", f"{TD}/frontend")


SPOOFS = {
    "lower": [f"x-forwarded-client-cert: {SPOOF}"],
    "upper": [f"X-FORWARDED-CLIENT-CERT: {SPOOF}"],
    "mixed_case": [f"X-Forwarded-Client-Cert: {SPOOF}"],
    "twice": [f"x-forwarded-client-cert: {SPOOF}", f"X-Forwarded-Client-Cert: {SPOOF}"],
    "first_and_last": [f"x-forwarded-client-cert: {SPOOF}", "Accept: */*", f"x-forwarded-client-cert: {SPOOF}"],
    "underscores": [f"X_Forwarded_Client_Cert: {SPOOF}", f"x-forwarded_client-cert: {SPOOF}"],
    "empty_value": ["x-forwarded-client-cert:", "x-forwarded-client-cert:   "],
    "no_space": [f"x-forwarded-client-cert:{SPOOF}"],
}


@pytest.mark.parametrize("extra", SPOOFS.values(), ids=SPOOFS.keys())
def test_a_caller_sent_xfcc_never_reaches_the_app(mesh: Mesh, extra: list[str]) -> None:
    [(status, _, body)] = exchange(mesh.port("app"), get("/spoof", *extra))
    assert status == 200
    answer = json.loads(body)
    assert answer["xfcc"] == [mesh.expected_xfcc()]
    assert xfcc_names(answer["names"]) == ["x-forwarded-client-cert"]


def test_every_pipelined_request_gets_ours_and_only_ours(mesh: Mesh) -> None:
    spoofing = [get(f"/p{i}", f"X-Forwarded-Client-Cert: {SPOOF}") for i in range(3)]
    post = b"POST /p3 HTTP/1.1\r\nHost: x\r\nContent-Length: 31\r\n\r\nx-forwarded-client-cert: inbody"
    answers = exchange(mesh.port("app"), b"".join(spoofing) + post, answers=4)
    assert [a[0] for a in answers] == [200] * 4
    assert all(json.loads(a[2])["xfcc"] == [mesh.expected_xfcc()] for a in answers)
    assert mesh.app.paths[-4:] == ["/p0", "/p1", "/p2", "/p3"]


def test_a_spoof_in_the_trailers_or_the_body_is_no_header_at_the_app(mesh: Mesh) -> None:
    """The recorder keeps the bytes: the only header-shaped xfcc in them is ours, once per request;
    what the body says passes untouched (it is payload)."""
    body = b"x-forwarded-client-cert: in the body"
    chunked = (
        b"POST /trailers HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTrailer: X-Forwarded-Client-Cert\r\n\r\n"
        + f"{len(body):x}\r\n".encode()
        + body
        + f"\r\n0\r\nX-Forwarded-Client-Cert: {SPOOF}\r\nx_forwarded_client_cert: {SPOOF}\r\n\r\n".encode()
    )
    visits = len(mesh.raw.visits)
    [(status, _, answer)] = exchange(mesh.port("raw"), chunked)
    assert status == 200 and json.loads(answer)["xfcc"] == [mesh.expected_xfcc()]
    visit = mesh.raw.visits[visits]
    [seen] = visit.requests
    assert seen.body == body
    assert not [n for n, _ in seen.trailers if ANY_XFCC.fullmatch(n)]
    heads = bytes(visit.raw).replace(body, b"")
    assert len(ANY_XFCC.findall(heads)) == 2  # ours, and the Trailer field naming it (a name, not a value)
    assert f"x-forwarded-client-cert: {mesh.expected_xfcc()}".encode() in heads


def test_after_a_websocket_upgrade_the_stream_is_raw_both_ways(mesh: Mesh) -> None:
    async def talk() -> tuple[str, str]:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(
                f"http://127.0.0.1:{mesh.port('app')}/ws", headers={"X-Forwarded-Client-Cert": SPOOF}
            ) as ws,
        ):
            xfcc = await ws.receive_str(timeout=LIMIT)
            await ws.send_str("x-forwarded-client-cert: frames are not headers")
            return xfcc, await ws.receive_str(timeout=LIMIT)

    xfcc, echo = asyncio.run(talk())
    assert json.loads(xfcc) == [mesh.expected_xfcc()]
    assert echo == "echo:x-forwarded-client-cert: frames are not headers"


# -- smuggling: refused with 400, counted, logged; the app sees none of it ------------------------------

SMUGGLES = {
    "te_and_cl": (
        b"POST /smuggle HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\nGET /hidden HTTP/1.1\r\nHost: x\r\n\r\n",
        "ambiguous_length",
    ),
    "two_lengths": (
        b"POST /smuggle HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        "ambiguous_length",
    ),
    "te_list": (
        b"POST /smuggle HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        "bad_transfer_encoding",
    ),
    "cl_with_underscore": (
        b"POST /smuggle HTTP/1.1\r\nHost: x\r\nContent_Length: 5\r\n\r\nhello",
        "bad_field",
    ),
    "obs_folded_xfcc": (
        b"GET /smuggle HTTP/1.1\r\nHost: x\r\nX-Note: a\r\n x-forwarded-client-cert: " + SPOOF.encode() + b"\r\n\r\n",
        "obs_fold",
    ),
    "space_before_colon": (
        b"GET /smuggle HTTP/1.1\r\nHost: x\r\nx-forwarded-client-cert : " + SPOOF.encode() + b"\r\n\r\n",
        "bad_field",
    ),
    "bare_lf": (
        b"GET /smuggle HTTP/1.1\r\nHost: x\nx-forwarded-client-cert: " + SPOOF.encode() + b"\r\n\r\n",
        "bad_line_ending",
    ),
    "nul": (b"GET /smuggle HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n", "bad_bytes"),
    "two_hosts": (b"GET /smuggle HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", "duplicate_host"),
    "h2c_upgrade": (
        b"GET /smuggle HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n",
        "bad_upgrade",
    ),
    "http2_preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "bad_version"),
}


@pytest.mark.parametrize(("data", "reason"), SMUGGLES.values(), ids=SMUGGLES.keys())
def test_a_smuggling_attempt_gets_400_and_never_reaches_the_app(mesh: Mesh, data: bytes, reason: str) -> None:
    before, denied = len(records(mesh.inbound, "app")), counted(mesh.inbound, "app", "denied")
    [(status, headers, body)] = exchange(mesh.port("app"), data, closes=True)
    assert (status, headers["connection"], body) == (400, "close", b"")
    rec = next_record(mesh.inbound, "app", before)
    assert rec["outcome"] == "denied"
    assert rec["reason"].startswith(f"{reason} (400): ")
    assert rec["peer_identity"] == f"{TD}/frontend"
    wait_for(lambda: counted(mesh.inbound, "app", "denied") == denied + 1, LIMIT)
    assert not {"/smuggle", "/hidden"} & set(mesh.app.paths)


def test_answers_owed_before_a_refusal_go_out_first(mesh: Mesh) -> None:
    data = get("/first") + get("/second") + SMUGGLES["te_and_cl"][0]
    answers = exchange(mesh.port("app"), data, answers=3, closes=True)
    assert [a[0] for a in answers] == [200, 200, 400]
    assert mesh.app.paths[-2:] == ["/first", "/second"]
    assert not {"/smuggle", "/hidden"} & set(mesh.app.paths)


def test_a_head_past_64_kib_gets_431_counted_as_limit(mesh: Mesh) -> None:
    before, limited = len(records(mesh.inbound, "app")), counted(mesh.inbound, "app", "limit")
    [(status, headers, _)] = exchange(mesh.port("app"), get("/big", "X-Big: " + "a" * 70_000), closes=True)
    assert (status, headers["connection"]) == (431, "close")
    rec = next_record(mesh.inbound, "app", before)
    assert rec["outcome"] == "limit" and rec["reason"].startswith("head_too_large (431): ")
    wait_for(lambda: counted(mesh.inbound, "app", "limit") == limited + 1, LIMIT)
    assert "/big" not in mesh.app.paths


def test_an_error_inside_a_chunked_body_resets_the_app_connection(mesh: Mesh) -> None:
    """The head and the first chunk are already at the app: its connection is reset, so it can
    never take the cut request as complete; the caller gets 400."""
    visits, before = len(mesh.raw.visits), len(records(mesh.inbound, "raw"))
    data = b"POST /partial HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nZZ\r\n"
    [(status, _, _)] = exchange(mesh.port("raw"), data, closes=True)
    assert status == 400
    rec = next_record(mesh.inbound, "raw", before)
    assert rec["outcome"] == "denied" and rec["reason"].startswith("bad_chunk (400): ")
    visit = mesh.raw.visits[visits]
    assert visit.done.wait(LIMIT)
    assert visit.reset and visit.requests == []
    assert b"ZZ" not in visit.raw


# -- PROXY protocol v2 ------------------------------------------------------------------------------------


def test_tls_full_header_then_the_rewritten_stream(mesh: Mesh) -> None:
    visits, before = len(mesh.full.visits), len(records(mesh.inbound, "full"))
    [(status, _, body)] = exchange(mesh.port("full"), get("/pp", f"x-forwarded-client-cert: {SPOOF}"))
    assert status == 200 and json.loads(body)["xfcc"] == [mesh.expected_xfcc()]
    rec = next_record(mesh.inbound, "full", before)
    host, _, port = rec["client"].rpartition(":")
    result = mesh.full.visits[visits].proxy
    assert (str(result.source[0]), result.source[1]) == (host, int(port))  # the outbound sidecar's address
    assert (str(result.dest[0]), result.dest[1]) == ("127.0.0.1", mesh.inbound.port("full"))
    assert result.tlv.authority == "orders.mesh.local"  # the SNI the outbound sidecar sent
    ssl = result.tlv.ssl
    assert (ssl.client, ssl.verify, ssl.version, ssl.cn) == (0x07, 0, "TLSv1.3", "frontend")
    assert ssl[0x28] == mesh.frontend_der
    assert result.tlv[0xE0] == f"{TD}/frontend".encode()


def _client(rec: dict[str, Any]) -> str:
    return str(rec["client"])


@pytest.mark.parametrize(
    ("listener", "answer"),
    [
        pytest.param(
            "nginx",  # $proxy_protocol_addr:$proxy_protocol_port $proxy_protocol_server_port
            "{client} {port}",
            marks=pytest.mark.skipif(NGINX is None, reason="nginx is not installed (make bench-deps installs it)"),
        ),
        pytest.param(
            "haproxy",  # %[src]:%[src_port] %[dst_port] %[fc_pp_authority]
            "{client} {port} orders.mesh.local",
            marks=pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (make bench-deps installs it)"),
        ),
    ],
)
def test_a_server_that_reads_proxy_headers_sees_the_caller(mesh: Mesh, listener: str, answer: str) -> None:
    """The address nginx or HAProxy reports is the one the inbound sidecar logged as the caller's."""
    before = len(records(mesh.inbound, listener))
    [(status, _, body)] = exchange(mesh.port(listener), get("/"))
    rec = next_record(mesh.inbound, listener, before)
    assert status == 200
    assert body.decode() == answer.format(client=rec["client"], port=mesh.inbound.port(listener))


PROXY_SPOOFS = {
    "v1": b"PROXY TCP4 6.6.6.6 7.7.7.7 6666 8080\r\n",
    "v2": ProxyProtocolV2().pack(ProxyResultIPv4((IPv4Address("6.6.6.6"), 6666), (IPv4Address("7.7.7.7"), 8080))),
}


@pytest.mark.parametrize("spoof", PROXY_SPOOFS.values(), ids=PROXY_SPOOFS.keys())
def test_a_caller_sent_proxy_header_is_never_taken_for_ours(mesh: Mesh, spoof: bytes) -> None:
    """The calling app writes a PROXY header of its own (v1 or v2) claiming 6.6.6.6: the app reads
    ours first, naming the real caller; what the caller wrote is a request that is no HTTP, refused
    with 400 and counted as denied, and never reaches the app."""
    visits, before = len(mesh.full.visits), len(records(mesh.inbound, "full"))
    denied = counted(mesh.inbound, "full", "denied")
    answers = exchange(mesh.port("full"), spoof + get("/pp-spoof"), closes=True)
    assert [status for status, _, _ in answers] == [400]
    rec = next_record(mesh.inbound, "full", before)
    assert rec["outcome"] == "denied" and rec["reason"].startswith("bad_"), rec
    wait_for(lambda: counted(mesh.inbound, "full", "denied") == denied + 1, LIMIT)
    for visit in mesh.full.visits[visits:]:
        assert visit.done.wait(LIMIT)
        host, _, port = rec["client"].rpartition(":")
        assert (str(visit.proxy.source[0]), visit.proxy.source[1]) == (host, int(port))
        assert visit.raw == b"" and visit.requests == []


@pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (make bench-deps installs it)")
@pytest.mark.parametrize("spoof", PROXY_SPOOFS.values(), ids=PROXY_SPOOFS.keys())
def test_haproxy_behind_the_sidecar_never_takes_a_callers_proxy_header(mesh: Mesh, spoof: bytes) -> None:
    """Without a rewriter the stream is raw after our header: HAProxy (accept-proxy) reads ours
    and takes the caller's for a malformed request; it never reports the claimed address."""
    with socket.create_connection(("127.0.0.1", mesh.port("haproxy")), timeout=LIMIT) as s:
        s.sendall(spoof + get("/"))
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert b"6.6.6.6" not in answer


BIG_ID = f"{TD}/big/" + "x" * 1000


def big_leaf(ca: CertFactory, folder: Path, der_size: int) -> CertFiles:
    """A client certificate of about ``der_size`` bytes (DER), its SPIFFE ID ``BIG_ID``: padded
    with an unknown, non-critical extension (OpenSSL refuses a certificate past about 65100
    bytes in a handshake, so one certificate alone cannot overflow a TLV; this one and its long
    SPIFFE ID overflow the header's total)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    pad = der_size - 1400  # what the rest of the certificate takes, about
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "frontend")]))
        .issuer_name(ca.ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(BIG_ID)]), critical=False)
        .add_extension(
            x509.UnrecognizedExtension(
                ObjectIdentifier("1.3.6.1.4.1.55555.1"), b"\x04\x83" + pad.to_bytes(3, "big") + b"x" * pad
            ),
            critical=False,
        )
        .sign(ca.ca.key, hashes.SHA256())
    )
    issued = pki.Issued(cert=cert, key=key)
    pki.write_issued(issued, folder / "cert.pem", folder / "key.pem")
    return CertFiles(folder / "cert.pem", folder / "key.pem", issued)


def test_a_header_past_the_protocols_limit_refuses_the_caller_and_never_dials(
    mesh: Mesh, ca: CertFactory, tmp_path: Path
) -> None:
    """A header whose TLVs pass 65535 bytes is never truncated: the connection is refused
    (``limit``), and the app is never dialled."""
    big = big_leaf(ca, tmp_path, 64_800)
    der = big.issued.cert.public_bytes(serialization.Encoding.DER)
    assert 64_000 < len(der) < 65_100 and 59 + len(der) + len(BIG_ID) > 65535
    visits, before = len(mesh.full.visits), len(records(mesh.inbound, "full"))
    limited = counted(mesh.inbound, "full", "limit")
    conn = tls_client(mesh.inbound.port("full"), big, ca.ca_file)
    try:
        with contextlib.suppress(ssl.SSLError, OSError):
            conn.sendall(get("/never"))
        assert conn.recv() == b""  # closed (close_notify, then FIN) without a byte
    finally:
        conn.close()
    rec = next_record(mesh.inbound, "full", before)
    assert rec["outcome"] == "limit"
    assert rec["reason"].startswith("proxy_header_too_large: ")
    assert rec["peer_identity"] == BIG_ID
    wait_for(lambda: counted(mesh.inbound, "full", "limit") == limited + 1, LIMIT)
    assert len(mesh.full.visits) == visits  # never dialled
