"""The data plane of one process: its listeners, the connections open on them, the once-a-second
tick (byte counters, idle deadlines) and the drain. A single sidecar and each worker serve with one;
a supervisor uses one only to bind the listening sockets its workers serve.

Drain order: stop accepting on every listener at once, let open connections finish for up to
``drain_timeout`` (or until ``force``), cut what is left and say how many were cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable
from typing import TypeVar

from .config import Config
from .errors import SidecarError
from .hbone.inbound import HboneListener
from .hbone.outbound import tunnel_listener
from .listeners import BaseListener, Listener
from .logs import event
from .metrics import DataMetrics
from .policies import InboundPolicy, OutboundPolicy
from .tls import TLSStore
from .transparent import capture_listeners

log = logging.getLogger("sidecar")
T = TypeVar("T")
SAMPLE_SECONDS = 1.0  # how often the bytes of open connections are added to the byte counters


class Runtime:
    """Every listener of the config, serving (or bound for workers) with the store's material."""

    def __init__(self, cfg: Config, store: TLSStore, metrics: DataMetrics) -> None:
        self.limits = cfg.limits
        self._closed = asyncio.Event()  # set whenever a connection ends
        self._forced = False
        self._sampler: asyncio.Task[None] | None = None
        self.listeners: list[BaseListener] = []
        self._where: list[str] = []  # each listener's YAML path, for errors
        for i, inbound in enumerate(cfg.inbound):
            policy = InboundPolicy(inbound, store)
            self._add(Listener(policy, inbound.listen, cfg.limits, metrics.for_listener(inbound.name, "inbound")))
            self._where.append(f"inbound[{i}].listen")
        for i, outbound in enumerate(cfg.outbound):
            lm = metrics.for_listener(outbound.name, "outbound")
            if outbound.tunnel is not None:
                gauge = metrics.hbone_pool_connections.labels(listener=outbound.name)
                self._add(tunnel_listener(outbound, store, cfg.limits, lm, gauge))
            else:
                self._add(Listener(OutboundPolicy(outbound, store), outbound.listen, cfg.limits, lm))
            self._where.append(f"outbound[{i}].listen")
        if cfg.hbone is not None:
            hbone = cfg.hbone
            self._add(HboneListener(hbone, store, cfg.limits, metrics.for_listener(hbone.name, "inbound")))
            self._where.append("hbone.listen")
        for where, capture in capture_listeners(cfg, store, metrics):
            self._add(capture)
            self._where.append(where)

    # -- start ------------------------------------------------------------------------------------

    async def serve(self, sockets: list[list[socket.socket]] | None = None) -> None:
        """Listen on every listener's address, or serve ``sockets`` (per listener) bound by a
        supervisor; a failure names the listener's YAML path."""
        for index, listener in enumerate(self.listeners):
            await self._binding(index, listener.start(None if sockets is None else sockets[index]))
        self._sampler = asyncio.ensure_future(self._sample())

    async def bind_shares(self, count: int) -> list[list[list[socket.socket]]]:
        """A supervisor's: ``count`` shares of every listener, ``[listener][worker] -> sockets``."""
        return [await self._binding(i, lst.bind_shares(count)) for i, lst in enumerate(self.listeners)]

    # -- state ------------------------------------------------------------------------------------

    def active_connections(self) -> int:
        return sum(len(listener.active) for listener in self.listeners)

    def bound(self) -> dict[str, str]:
        return {listener.name: str(listener.bound) for listener in self.listeners}

    def not_ready(self) -> list[str]:
        return [f"listener {lst.name} is not bound" for lst in self.listeners if lst.bound is None]

    # -- stop -------------------------------------------------------------------------------------

    def stop_accepting(self) -> None:
        for listener in self.listeners:
            listener.stop_accepting()

    def force(self) -> None:
        """Stop waiting for open connections (a second SIGINT)."""
        self._forced = True
        self._closed.set()

    async def drain(self, deadline: float) -> int:
        """Stop accepting; wait up to ``deadline`` seconds for open connections; cut the rest; how many
        were cut."""
        self.stop_accepting()
        event(log, logging.INFO, "draining", open_connections=self.active_connections(), drain_timeout_s=deadline)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._all_closed(), deadline)
        left = [conn for listener in self.listeners for conn in list(listener.active)]
        for conn in left:
            conn.cut("drain_timeout")
        await asyncio.sleep(0)  # let aborted transports report connection_lost
        return len(left)

    async def close(self) -> None:
        """Stop accepting and the sampler; wait (briefly) for the servers to close."""
        self.stop_accepting()
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
            self._sampler = None
        for listener in self.listeners:
            listener.publish_bytes()
            try:
                await asyncio.wait_for(listener.wait_closed(), 1.0)
            except (TimeoutError, OSError) as exc:
                event(log, logging.WARNING, "listener did not close in time", listener=listener.name, error=repr(exc))

    # -- internals --------------------------------------------------------------------------------

    def _add(self, listener: BaseListener) -> None:
        listener.on_closed = self._closed.set
        self.listeners.append(listener)

    async def _binding(self, index: int, bind: Awaitable[T]) -> T:
        try:
            return await bind
        except OSError as exc:
            where, listen = self._where[index], self.listeners[index].listen
            raise SidecarError(f"{where}: cannot listen on {listen}: {exc.strerror or exc}") from None

    async def _all_closed(self) -> None:
        while self.active_connections() and not self._forced:
            self._closed.clear()
            await self._closed.wait()

    async def _sample(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(SAMPLE_SECONDS)
            now = loop.time()
            for listener in self.listeners:
                listener.tick(now)
