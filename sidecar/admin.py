"""The admin HTTP server (contract section 4): health, readiness, metrics, certificates, reload.

Rules of this module: handlers only read state the sidecar already keeps in memory (no file or
network I/O, no lock the data path takes), so a slow or hostile client costs itself a socket and
never stalls proxying. Requests are small by construction: no endpoint takes a body, headers are
capped, and a connection that sends nothing is closed after ``idle_timeout``. Every answer but
``/metrics`` is JSON, errors included. ``POST /reload`` is the only endpoint that changes anything.
"""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .config import Address
from .errors import SidecarError
from .logs import event
from .metrics import Metrics
from .tls import CertInfo, Material, TLSStore

if TYPE_CHECKING:
    from .workload_api import Status as SourceStatus

log = logging.getLogger("sidecar.admin")

IDLE_TIMEOUT = 5.0  # seconds a connection may sit without a request (also bounds a half-sent one)
SHUTDOWN_TIMEOUT = 1.0  # on stop, how long an in-flight admin request may take to finish
MAX_BODY = 1024  # no endpoint needs a body; anything bigger is refused with 413 unread
MAX_LINE = 4096  # request line and each header line
MAX_HEADERS = 32


class Status(Protocol):
    """What the admin server may see and do of the process: read its state, ask for a reload."""

    @property
    def store(self) -> TLSStore: ...

    @property
    def metrics(self) -> Metrics: ...

    def not_ready_reasons(self) -> list[str]: ...

    def source_status(self) -> SourceStatus | None: ...  # the Workload API stream (None: files)

    async def reload(self) -> Material:
        """Reload now; raises ``SidecarError`` (old material kept, or not every worker has it)."""
        ...


class AdminServer:
    """``admin.listen``: started after the TLS material loads and before listeners bind."""

    def __init__(self, status: Status, listen: Address, *, idle_timeout: float = IDLE_TIMEOUT) -> None:
        self.status = status
        self.listen = listen
        self.idle_timeout = idle_timeout
        self.bound: Address | None = None
        self._runner: web.AppRunner | None = None
        self._queued: asyncio.Future[Material] | None = None
        self._reloading = asyncio.Lock()

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application(client_max_size=MAX_BODY, middlewares=[_bounded_json_errors])
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/certs", self.certs)
        app.router.add_post("/reload", self.reload)
        runner = web.AppRunner(
            app,
            handle_signals=False,  # the sidecar owns signals
            access_log=None,  # the admin port is not the data path; keep its requests out of the logs
            shutdown_timeout=SHUTDOWN_TIMEOUT,
            keepalive_timeout=self.idle_timeout,
            lingering_time=0,  # never read an unwanted body after answering
            max_line_size=MAX_LINE,
            max_field_size=MAX_LINE,
            max_headers=MAX_HEADERS,
        )
        await runner.setup()
        self._runner = runner
        site = web.TCPSite(runner, self.listen.host or None, self.listen.port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await self.stop()
            raise SidecarError(f"admin.listen: cannot listen on {self.listen}: {exc.strerror or exc}") from None
        host, port = runner.addresses[0][:2]
        self.bound = Address(host, port)
        event(log, logging.INFO, "admin listening", address=str(self.bound))

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    # -- endpoints ---------------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        reasons = self.status.not_ready_reasons()
        if reasons:
            return _json({"ready": False, "reason": "; ".join(reasons), "reasons": reasons}, status=503)
        return _json({"ready": True})

    async def metrics(self, request: web.Request) -> web.Response:
        store = self.status.store
        metrics = self.status.metrics
        material = store.material if store.loaded else None
        metrics.observe_state(ready=not self.status.not_ready_reasons(), material=material)
        if metrics.reads_files:  # a supervisor sums its workers' files: off the event loop
            body = await asyncio.to_thread(generate_latest, metrics.registry)
        else:  # CPU work proportional to the number of series: small and bounded (metrics.py)
            body = generate_latest(metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST, "Cache-Control": "no-store"})

    async def certs(self, request: web.Request) -> web.Response:
        store = self.status.store
        if not store.loaded:
            return _json({"error": "TLS material not loaded yet"}, status=503)
        material = store.material
        return _json(
            {
                **source_json(material, self.status.source_status()),
                "identity": identity_json(material),
                "ca_certs": [
                    {"subject": ca.subject, "not_after": _iso(ca.not_after), "sha256": ca.sha256}
                    for ca in material.ca_infos
                ],
                "reloads": {"ok": store.reloads_ok, "error": store.reloads_error, "last_error": store.last_error},
            }
        )

    async def reload(self, request: web.Request) -> web.Response:
        event(log, logging.INFO, "reload requested", by="POST /reload", client=request.remote)
        try:
            material = await self._reload()
        except SidecarError as exc:
            store = self.status.store
            kept = identity_json(store.material) if store.loaded else None
            return _json({"reloaded": False, "error": str(exc), "identity": kept}, status=500)
        return _json({"reloaded": True, "identity": identity_json(material)})

    async def _reload(self) -> Material:
        """A reload that starts after this request arrived, shared with requests that arrive meanwhile.

        However many clients ask at once, at most one reload runs and one more waits: a request
        joins the waiting one if there is one, else queues a new one behind the running one.
        """
        if self._queued is None:
            self._queued = asyncio.ensure_future(self._run_queued())
            self._queued.add_done_callback(_retrieve)
        return await asyncio.shield(self._queued)

    async def _run_queued(self) -> Material:
        async with self._reloading:
            self._queued = None  # from here on, newcomers need a reload that starts after this one
            return await self.status.reload()


def source_json(material: Material, stream: SourceStatus | None) -> dict[str, Any]:
    """Where ``/certs``'s material comes from: ``files``, or ``workload_api`` with the socket, the
    bundle's trust domains and the stream's state."""
    if stream is None:
        return {"source": material.source}
    last_update = datetime.fromtimestamp(stream.last_update, UTC) if stream.last_update is not None else None
    return {
        "source": material.source,
        "socket": stream.address,
        "trust_domains": list(material.trust_domains),
        "workload_api": {
            "connected": stream.link == "up",
            "updates": stream.updates,
            "refused": stream.refused,
            "disconnects": stream.disconnects,
            "last_update": _iso(last_update) if last_update is not None else None,
            "last_error": stream.last_error,
        },
    }


def identity_json(material: Material) -> dict[str, Any]:
    """The identity summary of ``/certs`` and ``POST /reload``."""
    ident: CertInfo = material.identity
    return {
        "subject": ident.subject,
        "spiffe_ids": list(ident.spiffe_ids),
        "dns_names": list(ident.dns_names),
        "serial": ident.serial,
        "not_before": _iso(ident.not_before),
        "not_after": _iso(ident.not_after),
        "sha256": ident.sha256,
        "loaded_at": _iso(datetime.fromtimestamp(material.loaded_at, UTC)),
    }


@web.middleware
async def _bounded_json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse bodies unread, and answer errors (404, 405, ...) as JSON like everything else."""
    if (request.content_length or 0) > MAX_BODY or "chunked" in request.headers.get("Transfer-Encoding", "").lower():
        return _json({"error": "request body not accepted"}, status=413, close=True)
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        resp = _json({"error": exc.reason}, status=exc.status)
        if "Allow" in exc.headers:
            resp.headers["Allow"] = exc.headers["Allow"]
        return resp


def _json(data: Any, *, status: int = 200, close: bool = False) -> web.Response:
    resp = web.Response(
        text=json.dumps(data, indent=2) + "\n",
        status=status,
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )
    if close:
        resp.force_close()
    return resp


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat()


def _retrieve(fut: asyncio.Future[Material]) -> None:
    # a waiter that went away must not leave "exception was never retrieved" behind
    if not fut.cancelled():
        fut.exception()
