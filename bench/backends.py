"""The backends every pair forwards to: an HTTP server for wrk and a bulk sink/source for iperf3.

HTTP: nginx answering ``200 ok`` from memory (one worker, no access log, keep-alive without a
request limit), so it is never the bottleneck; the pure-Python server of ``pyserve`` when nginx is
missing. nginx also answers on a second port that expects a PROXY protocol header first
(``listen ... proxy_protocol``), for the pair whose server side sends one (``--forwarding``).
Bulk: ``iperf3 -s`` when the tools load is used, else ``pyserve``'s bulk port. All pairs share the
same backends, so the backend's cost is the same for everyone and not counted.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

from .procs import Procs, free_port, wait_listening
from .tools import Tools


@dataclass(frozen=True)
class Backends:
    http_port: int
    bulk_port: int
    http_kind: str  # nginx | python | target
    bulk_kind: str  # iperf3 | python | target
    host: str = "127.0.0.1"
    http_proxy_port: int | None = None  # the HTTP backend reading a PROXY header first (nginx only)


def start(procs: Procs, tools: Tools, env: dict[str, str], *, tools_load: bool, fd_limit: int) -> Backends:
    py: tuple[int, int] | None = None

    def python_backend() -> tuple[int, int]:
        nonlocal py
        if py is None:
            proc = procs.start("pyserve", [sys.executable, "-m", "bench.pyserve"], env=env, cwd=_repo_root())
            found = proc.wait_for(lambda t: re.search(r"^ready (\d+) (\d+)$", t, re.M), "ready line")
            assert isinstance(found, re.Match)
            py = (int(found.group(1)), int(found.group(2)))
        return py

    proxy_port = None
    if "nginx" in tools.paths:
        (http_port, proxy_port), http_kind = _nginx_http(procs, tools, env, fd_limit), "nginx"
    else:
        http_port, http_kind = python_backend()[0], "python"
    if tools_load:
        bulk_port = free_port()
        argv = [tools.path("iperf3"), "-s", "-B", "127.0.0.1", "-p", str(bulk_port)]
        proc = procs.start("iperf3-server", argv, env=env)
        wait_listening(proc, [bulk_port])
        bulk_kind = "iperf3"
    else:
        bulk_port, bulk_kind = python_backend()[1], "python"
    return Backends(http_port, bulk_port, http_kind, bulk_kind, http_proxy_port=proxy_port)


NGINX_HTTP = """\
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile {nofile};
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections {conns}; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    default_type text/plain;
    keepalive_requests 100000000;
    keepalive_timeout 600s;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{ return 200 "ok\\n"; }}
    }}
    server {{
        listen 127.0.0.1:{proxy_port} proxy_protocol backlog=4096;
        client_header_buffer_size 4k;  # a tls-full header carries the client certificate
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""


def _nginx_http(procs: Procs, tools: Tools, env: dict[str, str], fd_limit: int) -> tuple[int, int]:
    """nginx's plain HTTP port and its port that reads a PROXY header first."""
    d = procs.folder("backend-nginx")
    port, proxy_port = free_port(), free_port()
    conf = d / "nginx.conf"
    conns = max(1024, fd_limit - 100)
    conf.write_text(NGINX_HTTP.format(d=d, port=port, proxy_port=proxy_port, nofile=fd_limit, conns=conns))
    proc = procs.start("backend-nginx", nginx_argv(tools, d, conf), env=env)
    wait_listening(proc, [port, proxy_port])
    return port, proxy_port


def nginx_argv(tools: Tools, folder: Path, conf: Path) -> list[str]:
    return [tools.path("nginx"), "-p", str(folder), "-c", str(conf), "-e", str(folder / "error.log")]


def _repo_root() -> Path:
    return Path(__file__).resolve().parent.parent
