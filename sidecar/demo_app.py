"""A plain HTTP demo service for the mesh examples (compose, Kubernetes, `sidecar demo`).

Rules of this module: it knows nothing of TLS or of the proxy and imports nothing from the
``sidecar`` package (stdlib and aiohttp only), so it stands for any application a sidecar fronts.
It calls its peer only through the URL it is given, which is the local sidecar's outbound listener.

    python -m sidecar.demo_app --name NAME --listen HOST:PORT [--call URL]

``GET /`` answers ``{"service": NAME, "peer": <X-Forwarded-Client-Cert header or null>}``;
``GET /call`` fetches ``--call`` and answers with both names (502 with the error if it fails);
``GET /healthz`` answers ``ok``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
from aiohttp import web

PEER_HEADER = "X-Forwarded-Client-Cert"
CALL_TIMEOUT = aiohttp.ClientTimeout(total=10)
NAME_KEY = web.AppKey("name", str)
CALL_KEY = web.AppKey("call", str)
SESSION_KEY = web.AppKey("session", aiohttp.ClientSession)


def parse_listen(value: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` to a (host, port) pair; argparse reports a ValueError."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


async def index(request: web.Request) -> web.Response:
    return web.json_response({"service": request.app[NAME_KEY], "peer": request.headers.get(PEER_HEADER)})


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def call(request: web.Request) -> web.Response:
    name, url = request.app[NAME_KEY], request.app[CALL_KEY]
    if not url:
        return web.json_response({"service": name, "error": "no --call URL configured"}, status=404)
    try:
        async with request.app[SESSION_KEY].get(url) as response:
            body = await response.text()
            status = response.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return web.json_response({"service": name, "url": url, "error": error}, status=502)
    upstream: Any
    try:
        upstream = json.loads(body)
    except ValueError:
        upstream = body
    callee = upstream.get("service") if isinstance(upstream, dict) else None
    return web.json_response(
        {"service": name, "callee": callee, "status": status, "upstream": upstream},
        status=200 if status == 200 else 502,
    )


async def client_session(app: web.Application) -> AsyncIterator[None]:
    # force_close: one TCP connection per call, so every call is a fresh mTLS handshake through
    # the sidecar (a rotated certificate shows on the very next call).
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=CALL_TIMEOUT) as session:
        app[SESSION_KEY] = session
        yield


def make_app(name: str, call_url: str | None = None) -> web.Application:
    app = web.Application()
    app[NAME_KEY] = name
    app[CALL_KEY] = call_url or ""
    app.cleanup_ctx.append(client_session)
    app.router.add_get("/", index)
    app.router.add_get("/call", call)
    app.router.add_get("/healthz", healthz)
    return app


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sidecar.demo_app", description=__doc__)
    parser.add_argument("--name", required=True, help="service name reported in answers")
    parser.add_argument(
        "--listen",
        type=parse_listen,
        default=("127.0.0.1", 8080),
        metavar="HOST:PORT",
        help="where to serve plain HTTP (127.0.0.1:8080)",
    )
    parser.add_argument(
        "--call",
        metavar="URL",
        help="what GET /call fetches: the local sidecar's outbound listener, http://127.0.0.1:9001/",
    )
    args = parser.parse_args(argv)
    host, port = args.listen
    print(f"demo app {args.name} listening on {host}:{port}", file=sys.stderr, flush=True)
    web.run_app(make_app(args.name, args.call), host=host, port=port, print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
