"""The process the operator starts, in its two roles, over what both share (``ControlPlane``).

- ``Standalone`` (``workers: 1``): the control plane and the data plane (``runtime.Runtime``) in
  this one process.
- ``Supervisor`` (``workers: N``): the control plane here, the data plane in N worker processes
  (``supervisor.WorkerPool``, ``worker.py``) that serve the listening sockets bound here.

Start order: load the TLS material (a failure is fatal; from the Workload API: the first SVID
within its deadline, the stream then kept open), start the admin server (so ``/readyz`` can say
"not bound yet"), bind every listener (a failure is fatal and names it), serve (or start the
workers and wait until each is ready), watch the files, log ``ready``. Shutdown order: stop
accepting, let open connections finish for up to ``drain_timeout``, cut the rest, stop the
watcher, the Workload API stream and the admin server, log ``stopped``. Only this process holds
the Workload API stream; workers get each update through ``TLSStore.accept`` and its push.
"""

from __future__ import annotations

import asyncio
import logging
from abc import abstractmethod
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from .admin import AdminServer
from .config import Config, TLSWorkloadAPI
from .errors import SidecarError
from .lifecycle import Role
from .logs import event
from .metrics import Metrics, WorkloadAPIMetrics
from .runtime import Runtime
from .supervisor import WorkerPool
from .tls import Material, TLSStore
from .watch import CertWatcher

if TYPE_CHECKING:
    from .workload_api import Status as SourceStatus
    from .workload_api import WorkloadAPISource

log = logging.getLogger("sidecar")
EXPIRY_CHECK_SECONDS = 1.0
EXPIRY_WARNING_FRACTION = 0.1


class ControlPlane:
    """What the operator's process owns besides proxying: the TLS material (loading, watching the
    files or following the Workload API, reloading, counting reloads, warning before expiry), the
    metrics it serves, the admin server.

    It is the admin server's ``Status``: ``data_plane`` says what keeps the proxying side from
    being ready (listeners not bound, workers not running).
    """

    def __init__(
        self,
        cfg: Config,
        *,
        data_plane: Callable[[], list[str]],
        workers_dir: str | None = None,
        push: Callable[[Material], Awaitable[list[str]]] | None = None,
    ) -> None:
        self.cfg = cfg
        self.metrics = Metrics(workers_dir=workers_dir)
        self.store = TLSStore(cfg.tls, on_reload=self._count_reload, before_publish=push, listeners=cfg.tls_servers())
        self.store.subscribers.append(self._on_material)
        self.source: WorkloadAPISource | None = None
        self.watcher: CertWatcher | None = None
        if isinstance(cfg.tls, TLSWorkloadAPI):
            from .workload_api import WorkloadAPISource  # grpc is imported only when it is used

            observer = WorkloadAPIMetrics(self.metrics.registry)
            self.source = WorkloadAPISource(cfg.tls, self.store.accept, observer=observer)
        else:
            self.watcher = CertWatcher(cfg.tls.paths(), self._reload_quietly)
        self.admin = AdminServer(self, cfg.admin.listen) if cfg.admin is not None else None
        self.draining = False
        self._data_plane = data_plane
        self._expiry_warned: int | None = None

    async def load(self) -> None:
        """The first material: the files, or the first SVID the agent sends within the deadline
        (else ``WorkloadAPIUnavailable`` naming the socket); the stream then stays open."""
        if self.source is not None:
            await self.source.start()
            return
        assert self.watcher is not None
        loaded_fp = await self.watcher.current()
        await self.store.load()
        self.watcher.mark_loaded(loaded_fp)

    def background(self) -> list[Coroutine[Any, Any, None]]:
        """What runs beside serving, for the role to own: the file watcher (files only), the expiry warning."""
        work = [self.warn_before_expiry()]
        if self.watcher is not None:
            work.append(self.watcher.run())
        return work

    async def stop_source(self) -> None:
        if self.source is not None:
            await self.source.stop()

    async def start_admin(self) -> None:
        if self.admin is not None:
            await self.admin.start()

    async def stop_admin(self) -> None:
        if self.admin is not None:
            await self.admin.stop()

    # -- the admin server's Status ----------------------------------------------------------------

    def source_status(self) -> SourceStatus | None:
        """The Workload API stream's state (None: the material comes from files)."""
        return self.source.status() if self.source is not None else None

    def not_ready_reasons(self) -> list[str]:
        reasons: list[str] = ["draining"] if self.draining else []
        reasons.extend(self._data_plane())
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
        done once every worker serves it too (else ``WorkerError`` naming the worker)."""
        return await self.store.reload()

    async def reload_logged(self, why: str) -> None:
        event(log, logging.INFO, "reload requested", by=why)
        await self._reload_quietly()

    # -- background work (owned by the role) ------------------------------------------------------

    async def warn_before_expiry(self) -> None:
        while True:
            await asyncio.sleep(EXPIRY_CHECK_SECONDS)
            self._warn_if_expiring()

    # -- internals --------------------------------------------------------------------------------

    async def _reload_quietly(self) -> bool:
        """Reload; the outcome is logged and counted by ``_count_reload``, not raised."""
        try:
            await self.reload()
        except SidecarError:
            return False
        return True

    def _count_reload(self, ok: bool, error: str | None) -> None:
        self.metrics.cert_reloads.labels(result="ok" if ok else "error").inc()
        if ok:
            event(log, logging.INFO, "certificates reloaded", identity=self.store.material.identity.summary())
        else:
            event(log, logging.ERROR, "certificate reload failed; keeping the material in use", error=error)

    def _on_material(self, material: Material) -> None:
        self.metrics.cert_expiry.labels(cert="identity").set(material.identity.not_after.timestamp())

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


class OperatorProcess(Role):
    """What both roles of the operator's process share: a control plane and a data plane, the
    same start and the same close; ``serve`` is where they differ."""

    cfg: Config
    control: ControlPlane
    runtime: Runtime

    async def start(self) -> None:
        await self.control.load()
        await self.control.start_admin()
        await self.serve()
        for work in self.control.background():
            self.spawn(work)
        ident = self.control.store.material.identity
        bound = self.runtime.bound()
        event(log, logging.INFO, "ready", identity=ident.summary(), listeners=bound, workers=self.cfg.workers)

    @abstractmethod
    async def serve(self) -> None:
        """Bind the listeners and serve them, here or through workers."""

    def request_reload(self) -> None:
        self.spawn(self.control.reload_logged("SIGHUP"))

    async def close(self) -> None:
        await self.stopping("listeners", self.runtime.close())
        await self.cancel_tasks()
        await self.stopping("Workload API stream", self.control.stop_source())
        await self.stopping("admin server", self.control.stop_admin())


class Standalone(OperatorProcess):
    """``workers: 1``: everything in this process."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.control = ControlPlane(cfg, data_plane=lambda: self.runtime.not_ready())
        self.runtime = Runtime(cfg, self.control.store, self.control.metrics)

    async def serve(self) -> None:
        await self.runtime.serve()

    def on_force(self) -> None:
        self.runtime.force()

    async def drain(self) -> None:
        self.control.draining = True
        cut = await self.runtime.drain(self.cfg.limits.drain_timeout)
        await self.close()
        event(log, logging.INFO, "stopped", cut_connections=cut)


class Supervisor(OperatorProcess):
    """``workers: N``: TLS material, admin, watching and the listening sockets here; N workers proxy."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.pool = WorkerPool(cfg)
        self.control = ControlPlane(
            cfg,
            data_plane=lambda: self.runtime.not_ready() + self.pool.not_ready(),
            workers_dir=self.pool.metrics_dir,
            push=self.pool.push,
        )
        self.runtime = Runtime(cfg, self.control.store, self.control.metrics)  # binds; never proxies

    async def serve(self) -> None:
        shares = await self.runtime.bind_shares(self.pool.count)
        await self.pool.start(shares, self.control.store.material)

    def on_force(self) -> None:
        if self.control.draining:
            self.spawn(self.pool.force())

    async def drain(self) -> None:
        self.control.draining = True
        self.runtime.stop_accepting()
        event(log, logging.INFO, "draining", workers=self.pool.count, drain_timeout_s=self.cfg.limits.drain_timeout)
        if self.forced:
            self.spawn(self.pool.force())
        await self.stopping("Workload API stream", self.control.stop_source())  # no pushes to draining workers
        await self.pool.stop(self.cfg.limits.drain_timeout)
        await self.close()
        event(log, logging.INFO, "stopped")

    async def close(self) -> None:
        await super().close()
        await self.stopping("workers", self.pool.close())


def build(cfg: Config) -> Standalone | Supervisor:
    return Supervisor(cfg) if cfg.workers > 1 else Standalone(cfg)
