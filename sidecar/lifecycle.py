"""The life every sidecar process shares: start, serve until asked to stop, drain, close.

A ``Role`` (``server.Standalone``, ``server.Supervisor``, ``worker.Worker``) says how it starts,
drains and closes; this module runs it under its signal handlers and owns the background tasks it
spawns: each is cancelled on the way out, and one that failed is logged, never swallowed.
Signals: SIGTERM/SIGINT drain; a second SIGINT stops waiting for open connections; SIGHUP reloads
the certificates. A worker answers SIGTERM only: its supervisor relays the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterator

from . import openssl_conf_in_effect
from .logs import event

log = logging.getLogger("sidecar")


class Role(ABC):
    """One process's part; ``run`` is its whole life."""

    signals_relayed = False  # a worker: SIGINT and SIGHUP reach it through its supervisor

    def __init__(self) -> None:
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self.forced = False

    @abstractmethod
    async def start(self) -> None:
        """Get ready to serve; on failure ``run`` calls ``close`` and re-raises."""

    @abstractmethod
    async def drain(self) -> None:
        """Stop accepting, let open connections finish (within ``drain_timeout``), then ``close``."""

    @abstractmethod
    async def close(self) -> None:
        """Release everything ``start`` took; safe after a partial start."""

    def on_force(self) -> None:  # noqa: B027 - optional
        """A second SIGINT: stop waiting for open connections."""

    def request_reload(self) -> None:  # noqa: B027 - optional
        """SIGHUP."""

    async def run(self) -> None:
        if not openssl_conf_in_effect():
            event(
                log,
                logging.WARNING,
                "the sidecar's OpenSSL settings are not in effect "
                "(OPENSSL_CONF set by the operator, or ssl imported first): TLS 1.3 groups are OpenSSL's defaults",
            )
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        # What start-up made (modules, classes, TLS material, listeners) lives as long as the
        # process: out of the collector's sight, collections walk only what connections made.
        gc.freeze()
        loop = asyncio.get_running_loop()
        with _signals(loop, self.request_stop, self.force_stop, self.request_reload, relayed=self.signals_relayed):
            await self._stop.wait()
            await self.drain()

    def request_stop(self) -> None:
        self._stop.set()

    def force_stop(self) -> None:
        self.forced = True
        self._stop.set()
        self.on_force()

    def spawn(self, coro: Awaitable[None]) -> None:
        """Run ``coro`` as a task this role owns until ``cancel_tasks``."""
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def cancel_tasks(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:
                log.exception("a background task failed", extra={"fields": {"task": task.get_name()}})

    @staticmethod
    async def stopping(what: str, step: Awaitable[None]) -> None:
        """Run one step of a shutdown; a failure is logged, and the shutdown goes on."""
        try:
            await step
        except Exception:
            log.exception("a shutdown step failed", extra={"fields": {"step": what}})


@contextlib.contextmanager
def _signals(
    loop: asyncio.AbstractEventLoop,
    stop: Callable[[], None],
    force: Callable[[], None],
    reload: Callable[[], None],
    *,
    relayed: bool,
) -> Iterator[None]:
    interrupted = False

    def on_int() -> None:
        nonlocal interrupted
        if interrupted:
            force()
        interrupted = True
        stop()

    handlers = {signal.SIGTERM: stop}
    if not relayed:
        handlers.update({signal.SIGINT: on_int, signal.SIGHUP: reload})
    for sig, fn in handlers.items():
        loop.add_signal_handler(sig, fn)
    try:
        yield
    finally:
        for sig in handlers:
            loop.remove_signal_handler(sig)
