"""The running sidecar: start, serve, reload, drain.

Start order: load TLS material (a failure is fatal), bind every listener (a failure is fatal and
names the listener), start the periodic ticker, log ``ready``. Shutdown order: stop accepting on
every listener, let open connections finish for up to ``drain_timeout``, close what is left, log
how many were cut. Every task started here is owned here and cancelled on the way out.

With ``workers: N`` the same order holds, with the workers in the middle: the supervisor binds N
shares of every listener, starts the workers (``workers.py``) and logs ``ready`` once all are;
on shutdown it closes its sockets and waits for every worker's own drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry

from . import openssl_conf_in_effect
from .config import Config
from .errors import CertificateError, SidecarError
from .listeners import InboundListener, Listener, OutboundListener
from .logs import event
from .metrics import DataMetrics, Metrics
from .tls import Material, TLSStore
from .watch import CertWatcher
from .workers import WorkerPool

if TYPE_CHECKING:
    from .worker import WorkerChannel

log = logging.getLogger("sidecar")
TICK_SECONDS = 1.0
EXPIRY_WARNING_FRACTION = 0.1


class Sidecar:
    """One sidecar process in one of three roles.

    - alone (``workers: 1``): everything in this process;
    - supervisor (``workers: N``): TLS loading, admin, file watching and the listening sockets,
      with ``pool`` running the workers that proxy;
    - worker (``channel`` given): proxies on sockets and TLS material handed over by its
      supervisor; no admin server, no watching, no signals but SIGTERM.
    """

    def __init__(self, cfg: Config, metrics: Metrics | None = None, *, channel: WorkerChannel | None = None) -> None:
        self.cfg = cfg
        self.channel = channel
        self.pool = WorkerPool(cfg) if channel is None and cfg.workers > 1 else None
        if metrics is None and channel is None:
            metrics = Metrics(workers_dir=self.pool.metrics_dir if self.pool else None)
        self.metrics = metrics  # what /metrics serves; a worker's own counts go to its supervisor's
        data: DataMetrics = metrics if metrics is not None else DataMetrics(CollectorRegistry())
        self.store = TLSStore(
            cfg.tls,
            on_reload=self._count_reload if channel is None else None,
            before_publish=self.pool.push if self.pool is not None else None,
        )
        self.store.subscribers.append(self._on_material)
        self.watcher = CertWatcher(cfg.tls.paths(), self._reload_quietly)
        self._expiry_warned: int | None = None
        self.listeners: list[Listener] = []
        for spec in cfg.inbound:
            metrics_i = data.for_listener(spec.name, "inbound")
            self.listeners.append(InboundListener(spec, self.store, cfg.limits, metrics_i))
        for spec_o in cfg.outbound:
            metrics_o = data.for_listener(spec_o.name, "outbound")
            self.listeners.append(OutboundListener(spec_o, self.store, cfg.limits, metrics_o))
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self.started = False
        self.draining = False
        self._forced = False
        self._closed = asyncio.Event()  # set whenever a connection ends
        for listener in self.listeners:
            listener.on_closed = self._connection_closed
        # Extra services start after the TLS material loads and before listeners bind (so /readyz
        # can say "not bound yet"), and stop after the drain.
        self.services: list[tuple[Callable[[], Awaitable[None]], Callable[[], Awaitable[None]]]] = []
        if cfg.admin is not None:
            from .admin import AdminServer

            admin = AdminServer(self, cfg.admin.listen)
            self.services.append((admin.start, admin.stop))

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        if not openssl_conf_in_effect():
            event(
                log,
                logging.WARNING,
                "the sidecar's OpenSSL settings are not in effect "
                "(OPENSSL_CONF set by the operator, or ssl imported first): TLS 1.3 groups are OpenSSL's defaults",
            )
        if self.channel is not None:
            await self.start_worker(self.channel)
            return
        loaded_fp = await self.watcher.current()
        await self.store.load()
        self.watcher.mark_loaded(loaded_fp)
        for start, _stop in self.services:
            await start()
        counters = {"inbound": 0, "outbound": 0}
        shares = []
        for listener in self.listeners:
            index = counters[listener.direction]
            counters[listener.direction] += 1
            try:
                if self.pool is not None:
                    shares.append(await listener.bind_shares(self.pool.count))
                else:
                    await listener.start()
            except OSError as exc:
                where = f"{listener.direction}[{index}].listen"
                raise SidecarError(f"{where}: cannot listen on {listener.listen}: {exc.strerror or exc}") from None
        if self.pool is not None:
            await self.pool.start(shares, self.store.material)
        self._spawn(self._ticker())
        self._spawn(self.watcher.run())
        self.started = True
        ident = self.store.material.identity
        event(
            log,
            logging.INFO,
            "ready",
            identity=ident.summary(),
            listeners={lst.name: str(lst.bound) for lst in self.listeners},
            workers=self.cfg.workers,
        )

    async def start_worker(self, channel: WorkerChannel) -> None:
        await self.store.load(channel.source, channel.ticket_keys)
        for index, listener in enumerate(self.listeners):
            await listener.start(channel.sockets(index))
        self._spawn(self._ticker())
        self._spawn(channel.serve(self))
        self.started = True

    async def run(self) -> None:
        """Start, serve until asked to stop, drain."""
        loop = asyncio.get_running_loop()
        try:
            await self.start()
        except BaseException:
            await self.close_listeners_and_services()
            raise
        with _signals(loop, self.request_stop, self.force_stop, self.request_reload, worker=self.channel is not None):
            await self._stop.wait()
            await self.drain()

    def request_stop(self) -> None:
        self._stop.set()

    def force_stop(self) -> None:
        """A second SIGINT: stop waiting for open connections."""
        self._forced = True
        self._stop.set()
        self._closed.set()
        if self.pool is not None and self.draining:
            self._spawn(self.pool.force())

    async def _all_closed(self) -> None:
        while self.active_connections() and not self._forced:
            self._closed.clear()
            await self._closed.wait()

    def _connection_closed(self) -> None:
        self._closed.set()

    def request_reload(self) -> None:
        self._spawn(self._reload_logged("SIGHUP"))

    async def drain(self) -> None:
        """Stop accepting at once, wait for open connections up to ``drain_timeout``, close the rest."""
        self.draining = True
        for listener in self.listeners:
            listener.stop_accepting()
        if self.pool is not None:
            event(log, logging.INFO, "draining", workers=self.pool.count, drain_timeout_s=self.cfg.limits.drain_timeout)
            if self._forced:
                self._spawn(self.pool.force())
            await self.pool.stop(self.cfg.limits.drain_timeout)
            await self.close_listeners_and_services()
            event(log, logging.INFO, "stopped")
            return
        open_now = self.active_connections()
        event(log, logging.INFO, "draining", open_connections=open_now, drain_timeout_s=self.cfg.limits.drain_timeout)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._all_closed(), self.cfg.limits.drain_timeout)
        left = [conn for listener in self.listeners for conn in list(listener.active)]
        for conn in left:
            conn.finish(conn.outcome or "ok", "drain_timeout", abort=True)
        await asyncio.sleep(0)  # let aborted transports report connection_lost
        await self.close_listeners_and_services()
        event(log, logging.INFO, "stopped", cut_connections=len(left))

    async def close_listeners_and_services(self) -> None:
        for listener in self.listeners:
            listener.stop_accepting()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for _start, stop in reversed(self.services):
            with contextlib.suppress(Exception):
                await stop()
        if self.pool is not None:
            await self.pool.close()
        for server in (server for listener in self.listeners for server in listener.servers):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)

    # -- state for the admin server and tests ------------------------------------------------

    def active_connections(self) -> int:
        return sum(len(listener.active) for listener in self.listeners)

    def not_ready_reasons(self) -> list[str]:
        reasons: list[str] = []
        if self.draining:
            reasons.append("draining")
        for listener in self.listeners:
            if listener.bound is None:
                reasons.append(f"listener {listener.name} is not bound")
        if self.pool is not None:
            reasons.extend(self.pool.not_ready())
        if not self.store.loaded:
            reasons.append("identity certificate not loaded")
        else:
            ident = self.store.material.identity
            now = datetime.now(UTC)
            if now > ident.not_after:
                reasons.append(f"identity certificate expired at {ident.not_after.isoformat()}")
            elif now < ident.not_before:
                reasons.append(f"identity certificate not valid before {ident.not_before.isoformat()}")
        return reasons

    async def reload(self) -> Material:
        """Reload TLS material now (raises ``CertificateError``, old material kept); with workers,
        done once every worker serves it too (a worker that could not is logged and named)."""
        return await self.store.reload()

    # -- internals ---------------------------------------------------------------------------

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reload_logged(self, why: str) -> None:
        event(log, logging.INFO, "reload requested", by=why)
        await self._reload_quietly()

    async def _reload_quietly(self) -> bool:
        """Reload; the outcome is logged and counted by ``_count_reload``, not raised."""
        try:
            await self.reload()
        except CertificateError:
            return False
        return True

    def _count_reload(self, ok: bool, error: str | None) -> None:
        if self.metrics is not None:
            self.metrics.cert_reloads.labels(result="ok" if ok else "error").inc()
        if ok:
            event(log, logging.INFO, "certificates reloaded", identity=self.store.material.identity.summary())
        else:
            event(log, logging.ERROR, "certificate reload failed; keeping the material in use", error=error)

    def _on_material(self, material: Material) -> None:
        if self.metrics is not None:
            self.metrics.cert_expiry.labels(cert="identity").set(material.identity.not_after.timestamp())

    async def _ticker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(TICK_SECONDS)
            now = loop.time()
            for listener in self.listeners:
                listener.tick(now)
            if self.channel is None:
                self._warn_if_expiring()  # the supervisor warns for its workers

    def _warn_if_expiring(self) -> None:
        """Warn once per loaded certificate when less than ``EXPIRY_WARNING_FRACTION`` of its life is left."""
        material = self.store.material
        if self._expiry_warned == material.generation:
            return
        ident = material.identity
        lifetime = (ident.not_after - ident.not_before).total_seconds()
        left = (ident.not_after - datetime.now(UTC)).total_seconds()
        if left <= lifetime * EXPIRY_WARNING_FRACTION:
            self._expiry_warned = material.generation
            level = logging.ERROR if left <= 0 else logging.WARNING
            event(
                log,
                level,
                "identity certificate expires soon" if left > 0 else "identity certificate expired",
                serial=ident.serial,
                not_after=ident.not_after.isoformat(),
                seconds_left=round(left),
            )


@contextlib.contextmanager
def _signals(
    loop: asyncio.AbstractEventLoop,
    stop: Callable[[], None],
    force: Callable[[], None],
    reload: Callable[[], None],
    *,
    worker: bool = False,
) -> Iterator[None]:
    """SIGTERM/SIGINT drain; a second SIGINT stops waiting for connections; SIGHUP reloads certificates.

    A worker answers SIGTERM only: its supervisor relays the rest over the control channel.
    """
    interrupted = False

    def on_int() -> None:
        nonlocal interrupted
        if interrupted:
            force()
        interrupted = True
        stop()

    handlers = {signal.SIGTERM: stop}
    if not worker:
        handlers.update({signal.SIGINT: on_int, signal.SIGHUP: reload})
    for sig, fn in handlers.items():
        loop.add_signal_handler(sig, fn)
    try:
        yield
    finally:
        for sig in handlers:
            loop.remove_signal_handler(sig)
