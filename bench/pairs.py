"""The pairs: how each proxy is configured, started, and how its server side reports handshakes.

Every pair serves two routes, ``http`` (to the HTTP backend) and ``bulk`` (to the bulk backend),
each as client-side proxy (plain in, TLS 1.3 mTLS out, server verified: chain to the bench CA and
the name ``localhost`` or the sidecar's SPIFFE ID) -> server-side proxy (TLS 1.3 only, client
certificate required and verified) -> backend. Same security everywhere: TLS 1.3 only, the same
suites (``certs.CIPHERSUITES``), the same EC P-256 certificates; key exchange is each OpenSSL
client's first key share, X25519. Every proxy process runs ``--workers`` workers, one by default
(nginx ``worker_processes``, HAProxy ``nbthread``, our sidecar's ``workers``); stunnel has no such
knob (a thread per connection). Every proxy writes one access record per connection, as
our sidecar does, so nobody saves the cost of logging.

Client-side session resumption is each peer's default; ``resume=False`` turns it off
(``no-ssl-reuse``, ``proxy_ssl_session_reuse off``, ``sessionResume = no``). Our sidecar has no
resumption through ``tls.session_resumption`` on its client side, measured like the peers.
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from . import certs as certs_mod
from .backends import Backends, nginx_argv
from .certs import Certs
from .procs import Proc, Procs, free_port, wait_listening
from .tools import Tools

ROUTES = ("http", "bulk")
IDLE_TIMEOUT = "600s"


@dataclass(frozen=True)
class Handshake:
    """One connection the server side accepted and finished normally."""

    version: str | None
    cipher: str | None
    resumed: bool | None  # None: this proxy does not say


@dataclass
class Ctx:
    procs: Procs
    tools: Tools
    certs: Certs
    backends: Backends
    env: dict[str, str]  # for every process we start: the operator's own OPENSSL_CONF, or none
    fd_limit: int
    workers: int = 1  # per proxy process: sidecar ``workers``, nginx ``worker_processes``, HAProxy ``nbthread``

    def backend(self, route: str) -> int:
        return self.backends.http_port if route == "http" else self.backends.bulk_port

    def backend_address(self, route: str, *, proxy: bool = False) -> str:
        """Where ``route`` is served; ``proxy``: the HTTP backend's port that reads a PROXY header first."""
        host = self.backends.host
        port = self.backends.http_proxy_port if proxy and route == "http" else self.backend(route)
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass
class Running:
    """A started pair: where the load generator connects, and which processes are the pair's."""

    pair: str
    resume: bool
    http_port: int  # client side, plain
    bulk_port: int
    tls_port: int | None = None  # server side's TLS port on the http route (for the checks)
    procs: list[Proc] = field(default_factory=list)
    server: Proc | None = None  # whose log tells about handshakes
    parse: Callable[[str], list[Handshake]] | None = None
    host: str = "127.0.0.1"  # where the load generator connects (``direct`` to a --target, a capture pair)
    on_stop: Callable[[], None] | None = None  # after its processes are stopped (a capture pair's rules)

    @property
    def url_host(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host

    tunnel_target: int | None = None  # HBONE: the server side's TLS port takes CONNECT streams to this port

    def pids(self) -> list[int]:
        return [pid for proc in self.procs for pid in proc.pids()]

    def log_offset(self) -> int:
        return self.server.log_size() if self.server is not None else 0

    def handshakes_since(self, offset: int) -> list[Handshake]:
        if self.server is None or self.parse is None:
            return []
        return self.parse(self.server.log_text(offset))

    def dead(self) -> list[str]:
        return [f"{p.name} exited with {p.popen.returncode}:\n{p.tail()}" for p in self.procs if not p.alive()]


class Pair:
    name: ClassVar[str]
    tool: ClassVar[str | None] = None
    resumption: ClassVar[bool] = True  # whether client-side resumption can be had (and toggled)
    proxied: ClassVar[bool] = True
    workloads: ClassVar[tuple[str, ...] | None] = None  # None: every workload
    verbose_for_cipher: ClassVar[bool] = False  # whether the suite is only logged at a costly level

    def available(self, tools: Tools) -> bool:
        return self.tool is None or tools.has(self.tool)

    def start(self, ctx: Ctx, *, resume: bool, verbose: bool = False) -> Running:
        raise NotImplementedError

    def _ports(self) -> dict[str, int]:
        return {f"{side}_{route}": free_port() for side in ("client", "server") for route in ROUTES}

    def _running(
        self,
        resume: bool,
        ports: dict[str, int],
        procs: list[Proc],
        server_log: Proc,
        parse: Callable[[str], list[Handshake]],
    ) -> Running:
        """A started peer pair: ``procs`` are (server, client), ``server_log`` tells about handshakes."""
        server, client = procs
        return Running(
            self.name,
            resume,
            ports["client_http"],
            ports["client_bulk"],
            ports["server_http"],
            [client, server],
            server_log,
            parse,
        )


class Direct(Pair):
    name = "direct"
    resumption = False
    proxied = False

    def start(self, ctx: Ctx, *, resume: bool, verbose: bool = False) -> Running:
        return Running(self.name, False, ctx.backends.http_port, ctx.backends.bulk_port, host=ctx.backends.host)


# -- our sidecar ---------------------------------------------------------------------------------


class Sidecar(Pair):
    name = "sidecar"
    resumption = True  # the client side's tls.session_resumption; the server side issues tickets either way
    forwarding: ClassVar[dict[str, str]] = {}  # identity forwarding keys of the server side's http route

    def start(self, ctx: Ctx, *, resume: bool, verbose: bool = False) -> Running:
        d = ctx.procs.folder(f"{self.name}-{free_port()}")
        tls_server = {"cert": str(ctx.certs.server.cert), "key": str(ctx.certs.server.key), "ca": str(ctx.certs.ca)}
        tls_client = {
            "cert": str(ctx.certs.client.cert),
            "key": str(ctx.certs.client.key),
            "ca": str(ctx.certs.ca),
            "session_resumption": resume,
        }
        common = {
            "limits": {"max_connections": 20000 * ctx.workers, "idle_timeout": IDLE_TIMEOUT, "drain_timeout": "1s"},
            "log": {"level": "info", "format": "json"},
            "workers": ctx.workers,
        }
        server_cfg = {"tls": tls_server, **self._server_listeners(ctx), **common}
        server = self._run(ctx, d / "server.yaml", server_cfg, f"{self.name}-server")
        server_ports = _ready_ports(server)
        client_cfg = {"tls": tls_client, "outbound": self._outbound(ctx, server_ports), **common}
        client = self._run(ctx, d / "client.yaml", client_cfg, f"{self.name}-client")
        client_ports = _ready_ports(client)
        return Running(
            self.name,
            resume,
            client_ports["http"],
            client_ports["bulk"],
            server_ports[self._tls_listener],
            [client, server],
            server,
            parse_sidecar,
            tunnel_target=self._tunnel_target(ctx),
        )

    _tls_listener = "http"  # the server side's listener the checks probe

    def _server_listeners(self, ctx: Ctx) -> dict[str, Any]:
        return {
            "inbound": [
                {
                    "name": route,
                    "listen": "127.0.0.1:0",
                    "forward": ctx.backend_address(route, proxy="proxy_protocol" in self.forwarding),
                    "allow": [certs_mod.CLIENT_ID],
                    **(self.forwarding if route == "http" else {}),
                }
                for route in ROUTES
            ]
        }

    def _outbound(self, ctx: Ctx, server_ports: dict[str, int]) -> list[dict[str, Any]]:
        return [
            {
                "name": route,
                "listen": "127.0.0.1:0",
                "upstream": f"127.0.0.1:{server_ports[route]}",
                "server_identity": [certs_mod.SERVER_ID],
            }
            for route in ROUTES
        ]

    def _tunnel_target(self, ctx: Ctx) -> int | None:
        return None

    def _run(self, ctx: Ctx, path: Path, cfg: dict[str, Any], name: str) -> Proc:
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return ctx.procs.start(name, self.argv(path), env=self.env(ctx), cwd=self.cwd())

    def argv(self, config: Path) -> list[str]:
        return [sys.executable, "-m", "sidecar", "run", "-c", str(config)]

    def env(self, ctx: Ctx) -> dict[str, str]:
        return ctx.env

    def cwd(self) -> Path | None:
        return None  # the bench's: the working tree


class SidecarHbone(Sidecar):
    """Our sidecar pair with every connection carried as an HTTP/2 CONNECT stream over one pooled
    mTLS connection per route (``tunnel: {protocol: hbone}`` into an ``hbone`` listener)."""

    name = "sidecar-hbone"
    _tls_listener = "hbone"

    def _server_listeners(self, ctx: Ctx) -> dict[str, Any]:
        ports = [{"port": ctx.backend(route), "allow": [certs_mod.CLIENT_ID]} for route in ROUTES]
        return {"hbone": {"listen": "127.0.0.1:0", "ports": ports}}

    def _outbound(self, ctx: Ctx, server_ports: dict[str, int]) -> list[dict[str, Any]]:
        routes = super()._outbound(ctx, {route: server_ports["hbone"] for route in ROUTES})
        for route in routes:
            route["tunnel"] = {"protocol": "hbone", "target_port": ctx.backend(route["name"])}
        return routes

    def _tunnel_target(self, ctx: Ctx) -> int | None:
        return ctx.backend("http")


class Baseline(Sidecar):
    """Our sidecar pair as it was at another commit (``--baseline REV``): the same configuration,
    code exported from git into ``code`` and put first on the Python path, so a change can be
    measured against its base in the same run."""

    name = "baseline"

    def __init__(self, code: Path) -> None:
        self.code = code

    def env(self, ctx: Ctx) -> dict[str, str]:
        return self.env_for(ctx.env)

    def env_for(self, env: dict[str, str]) -> dict[str, str]:
        return {**env, "PYTHONPATH": str(self.code)}

    def cwd(self) -> Path | None:
        # ``python -m`` puts its working directory first on the path, before PYTHONPATH: started
        # from the repository, it would import the working tree's package, not this one
        return self.code


class SidecarXfcc(Sidecar):
    """Our pair with ``client_cert_header: xfcc`` on the server side (``--forwarding``): every
    request rewritten. Keep-alive only: the other workloads are not HTTP requests."""

    name = "sidecar-xfcc"
    workloads = ("keepalive",)
    forwarding = {"client_cert_header": "xfcc"}


class SidecarProxy(Sidecar):
    """Our pair with ``proxy_protocol: tls-full`` on the server side (``--forwarding``), to nginx's
    port that reads the header. Keep-alive only, like ``sidecar-xfcc``."""

    name = "sidecar-proxy"
    tool = "nginx"  # the only HTTP backend here that reads a PROXY header
    workloads = ("keepalive",)
    forwarding = {"proxy_protocol": "tls-full"}


FORWARDING = ("sidecar-xfcc", "sidecar-proxy")


def _ready_ports(proc: Proc) -> dict[str, int]:
    def ready(text: str) -> dict[str, int] | None:
        for line in text.splitlines():
            if '"ready"' in line:
                rec = json.loads(line)
                return {name: int(addr.rpartition(":")[2]) for name, addr in rec["listeners"].items()}
        return None

    found = proc.wait_for(ready, "ready log line")
    assert isinstance(found, dict)
    return found


def parse_sidecar(text: str) -> list[Handshake]:
    out = []
    for line in text.splitlines():
        if '"sidecar.access"' not in line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("direction") == "inbound" and rec.get("outcome") == "ok":
            out.append(Handshake(rec.get("tls_version"), rec.get("cipher"), rec.get("resumed")))
    return out


# -- HAProxy -----------------------------------------------------------------------------------

HAPROXY_GLOBAL = """\
global
    nbthread {workers}
    maxconn {maxconn}
    log stderr format raw local0 info
    ssl-default-bind-ciphersuites {suites}
    ssl-default-bind-options ssl-min-ver TLSv1.3
    ssl-default-server-ciphersuites {suites}
    ssl-default-server-options ssl-min-ver TLSv1.3

defaults
    mode tcp
    log global
    option tcplog
    maxconn {maxconn}
    timeout connect 5s
    timeout client {idle}
    timeout server {idle}
"""
HAPROXY_CLIENT_ROUTE = """
frontend {route}
    bind 127.0.0.1:{listen} backlog 4096
    default_backend {route}

backend {route}
    server upstream 127.0.0.1:{upstream} {tls}
"""
HAPROXY_SERVER_ROUTE = """
frontend {route}
    bind 127.0.0.1:{listen} ssl crt {crt} ca-file {ca} verify required backlog 4096
    log-format "bench %sslv %sslc %[ssl_fc_is_resumed]"
    default_backend {route}

backend {route}
    server app 127.0.0.1:{upstream}
"""


class HAProxy(Pair):
    name = "haproxy"
    tool = "haproxy"

    def start(self, ctx: Ctx, *, resume: bool, verbose: bool = False) -> Running:
        ports = self._ports()
        d = ctx.procs.folder(f"haproxy-{ports['client_http']}")
        common = {
            "maxconn": max(1000, (ctx.fd_limit - 200) // 2),
            "suites": certs_mod.CIPHERSUITES,
            "idle": IDLE_TIMEOUT,
            "workers": ctx.workers,
        }
        server_conf = HAPROXY_GLOBAL.format(**common) + "".join(
            HAPROXY_SERVER_ROUTE.format(
                route=r,
                listen=ports[f"server_{r}"],
                upstream=ctx.backend(r),
                crt=ctx.certs.server.combined,
                ca=ctx.certs.ca,
            )
            for r in ROUTES
        )
        name = certs_mod.SERVER_NAME
        tls = f"ssl verify required ca-file {ctx.certs.ca} crt {ctx.certs.client.combined}"
        tls += f" verifyhost {name} sni str({name})" + ("" if resume else " no-ssl-reuse")
        client_conf = HAPROXY_GLOBAL.format(**common) + "".join(
            HAPROXY_CLIENT_ROUTE.format(
                route=r,
                listen=ports[f"client_{r}"],
                upstream=ports[f"server_{r}"],
                tls=tls,
            )
            for r in ROUTES
        )
        procs = []
        for side, conf in (("server", server_conf), ("client", client_conf)):
            path = d / f"{side}.cfg"
            path.write_text(conf)
            proc = ctx.procs.start(f"haproxy-{side}", [ctx.tools.path("haproxy"), "-db", "-f", str(path)], env=ctx.env)
            wait_listening(proc, [ports[f"{side}_{r}"] for r in ROUTES])
            procs.append(proc)
        return self._running(resume, ports, procs, procs[0], parse_haproxy)


def _parse_bench_lines(text: str, fresh: str, resumed: str) -> list[Handshake]:
    """Lines ``bench VERSION CIPHER MARK`` (our log format for HAProxy and nginx), MARK ``resumed``
    for a resumed session and ``fresh`` for a full handshake."""
    pattern = rf"^bench (TLSv[\d.]+) (\S+) ([{re.escape(fresh + resumed)}])$"
    return [Handshake(m.group(1), m.group(2), m.group(3) == resumed) for m in re.finditer(pattern, text, re.M)]


def parse_haproxy(text: str) -> list[Handshake]:
    return _parse_bench_lines(text, fresh="0", resumed="1")


# -- nginx ---------------------------------------------------------------------------------------

NGINX_MAIN = """\
daemon off;
master_process on;
worker_processes {workers};
worker_rlimit_nofile {nofile};
pid {d}/nginx.pid;
error_log {d}/error.log warn;
{load_module}
events {{ worker_connections {conns}; }}
stream {{
    proxy_connect_timeout 5s;
    proxy_timeout {idle};
{body}}}
"""
NGINX_CLIENT = """\
    log_format bench '$remote_addr $bytes_sent $bytes_received $session_time';
    access_log {d}/access.log bench;
    proxy_ssl on;
    proxy_ssl_protocols TLSv1.3;
    proxy_ssl_conf_command Ciphersuites {suites};
    proxy_ssl_certificate {cert};
    proxy_ssl_certificate_key {key};
    proxy_ssl_trusted_certificate {ca};
    proxy_ssl_verify on;
    proxy_ssl_verify_depth 2;
    proxy_ssl_name {name};
    proxy_ssl_server_name on;
    proxy_ssl_session_reuse {reuse};
"""
NGINX_SERVER = """\
    log_format bench 'bench $ssl_protocol $ssl_cipher $ssl_session_reused';
    access_log {d}/access.log bench;
    ssl_protocols TLSv1.3;
    ssl_conf_command Ciphersuites {suites};
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_client_certificate {ca};
    ssl_verify_client on;
    ssl_verify_depth 2;
"""
NGINX_SERVER_BLOCK = """\
    server {{
        listen 127.0.0.1:{listen}{ssl} backlog=4096;
        proxy_pass 127.0.0.1:{upstream};
    }}
"""


class Nginx(Pair):
    name = "nginx"
    tool = "nginx"

    def start(self, ctx: Ctx, *, resume: bool, verbose: bool = False) -> Running:
        ports = self._ports()
        assert ctx.tools.nginx_stream is not None
        load_module = f"load_module {ctx.tools.nginx_stream};" if ctx.tools.nginx_stream else ""
        procs = []
        for side in ("server", "client"):
            d = ctx.procs.folder(f"nginx-{side}-{ports['client_http']}")
            if side == "server":
                body = NGINX_SERVER.format(
                    d=d,
                    suites=certs_mod.CIPHERSUITES,
                    cert=ctx.certs.server.cert,
                    key=ctx.certs.server.key,
                    ca=ctx.certs.ca,
                )
                blocks = [(ports[f"server_{r}"], " ssl", ctx.backend(r)) for r in ROUTES]
            else:
                body = NGINX_CLIENT.format(
                    d=d,
                    suites=certs_mod.CIPHERSUITES,
                    cert=ctx.certs.client.cert,
                    key=ctx.certs.client.key,
                    ca=ctx.certs.ca,
                    name=certs_mod.SERVER_NAME,
                    reuse="on" if resume else "off",
                )
                blocks = [(ports[f"client_{r}"], "", ports[f"server_{r}"]) for r in ROUTES]
            body += "".join(NGINX_SERVER_BLOCK.format(listen=p, ssl=s, upstream=u) for p, s, u in blocks)
            conf = d / "nginx.conf"
            conf.write_text(
                NGINX_MAIN.format(
                    d=d,
                    nofile=ctx.fd_limit,
                    conns=max(1024, ctx.fd_limit - 100),
                    load_module=load_module,
                    idle=IDLE_TIMEOUT,
                    body=body,
                    workers=ctx.workers,
                )
            )
            proc = ctx.procs.start(f"nginx-{side}", nginx_argv(ctx.tools, d, conf), env=ctx.env)
            wait_listening(proc, [p for p, _, _ in blocks])
            procs.append(proc)
        access = Path(ctx.procs.tmp / f"nginx-server-{ports['client_http']}" / "access.log")
        return self._running(resume, ports, procs, Proc("nginx-server access log", procs[0].popen, access), parse_nginx)


def parse_nginx(text: str) -> list[Handshake]:
    return _parse_bench_lines(text, fresh=".", resumed="r")


# -- stunnel -------------------------------------------------------------------------------------

# ``syslog = no``: stunnel also logs to syslog by default; with no syslog daemon (containers) glibc
# falls back to the console, which cost ~10 ms of CPU per connection on the bench machine.
STUNNEL_GLOBAL = """\
foreground = quiet
pid =
syslog = no
debug = {debug}
output = {log}
socket = l:TCP_NODELAY=1
socket = r:TCP_NODELAY=1
"""
STUNNEL_CLIENT_ROUTE = """
[{route}]
client = yes
accept = 127.0.0.1:{listen}
connect = 127.0.0.1:{upstream}
cert = {cert}
key = {key}
CAfile = {ca}
verifyChain = yes
checkHost = {name}
sni = {name}
sslVersionMin = TLSv1.3
ciphersuites = {suites}
sessionResume = {reuse}
TIMEOUTidle = 600
"""
STUNNEL_SERVER_ROUTE = """
[{route}]
accept = 127.0.0.1:{listen}
connect = 127.0.0.1:{upstream}
cert = {cert}
key = {key}
CAfile = {ca}
verifyChain = yes
requireCert = yes
sslVersionMin = TLSv1.3
ciphersuites = {suites}
TIMEOUTidle = 600
"""


class Stunnel(Pair):
    name = "stunnel"
    tool = "stunnel"
    verbose_for_cipher = True  # the suite is logged at "info", ~17 lines per connection

    def start(self, ctx: Ctx, *, resume: bool, verbose: bool = False) -> Running:
        ports = self._ports()
        d = ctx.procs.folder(f"stunnel-{ports['client_http']}")
        debug = "info" if verbose else "notice"
        procs = []
        for side in ("server", "client"):
            log = d / f"{side}.log"
            conf = STUNNEL_GLOBAL.format(debug=debug, log=log)
            for r in ROUTES:
                if side == "server":
                    conf += STUNNEL_SERVER_ROUTE.format(
                        route=r,
                        listen=ports[f"server_{r}"],
                        upstream=ctx.backend(r),
                        cert=ctx.certs.server.cert,
                        key=ctx.certs.server.key,
                        ca=ctx.certs.ca,
                        suites=certs_mod.CIPHERSUITES,
                    )
                else:
                    conf += STUNNEL_CLIENT_ROUTE.format(
                        route=r,
                        listen=ports[f"client_{r}"],
                        upstream=ports[f"server_{r}"],
                        cert=ctx.certs.client.cert,
                        key=ctx.certs.client.key,
                        ca=ctx.certs.ca,
                        name=certs_mod.SERVER_NAME,
                        suites=certs_mod.CIPHERSUITES,
                        reuse="yes" if resume else "no",
                    )
            path = d / f"{side}.conf"
            path.write_text(conf)
            proc = ctx.procs.start(f"stunnel-{side}", [ctx.tools.path("stunnel"), str(path)], env=ctx.env)
            wait_listening(proc, [ports[f"{side}_{r}"] for r in ROUTES])
            procs.append(proc)
        server_log = Proc("stunnel-server log", procs[0].popen, d / "server.log")
        return self._running(resume, ports, procs, server_log, parse_stunnel)


def parse_stunnel(text: str) -> list[Handshake]:
    """Group the server's lines by connection number; a connection that closed normally counts.

    At ``notice`` stunnel says "Certificate accepted at depth=0" only when it verified the client's
    certificate, i.e. on a full handshake: without it the session was resumed. At ``info`` it also
    names the suite and says "previous session reused".
    """
    conns: dict[str, dict[str, Any]] = defaultdict(dict)
    for m in re.finditer(r"LOG\d\[(\d+)\]: (.*)$", text, re.M):
        c, msg = conns[m.group(1)], m.group(2)
        if msg.startswith("Certificate accepted at depth=0"):
            c["cert"] = True
        elif msg.startswith("TLS accepted: previous session reused"):
            c["resumed"] = True
        elif msg.startswith("TLS accepted: new session"):
            c["resumed"] = False
        elif found := re.match(r"(TLSv[\d.]+) ciphersuite: (\S+)", msg):
            c["version"], c["cipher"] = found.groups()
        elif msg.startswith("Connection closed:"):
            c["ok"] = True
    return [
        Handshake(c.get("version"), c.get("cipher"), c.get("resumed", not c.get("cert", False)))
        for c in conns.values()
        if c.get("ok")
    ]


PAIRS: dict[str, Pair] = {
    p.name: p
    for p in (Direct(), Sidecar(), SidecarHbone(), SidecarXfcc(), SidecarProxy(), Stunnel(), HAProxy(), Nginx())
}
PEERS = ("stunnel", "haproxy", "nginx")
