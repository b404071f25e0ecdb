"""Several worker processes behind one sidecar (``workers: N``): the supervisor's pool of them.

The supervisor (the process the operator started) loads the TLS material, runs the admin server,
watches the certificate files and binds every listener ``N`` times with SO_REUSEPORT, so that the
kernel spreads new connections over the workers. Each worker is a fresh interpreter
(``python -m sidecar.worker``) that inherits its share of the listening sockets and one end of a
socket pair, the control channel, over which it receives its config and the very bytes of the
TLS files the supervisor validated: every process serves the same generation. A reload in the
supervisor is pushed to every worker before it counts as done.

Workers write their data-path metrics through prometheus_client's multiprocess mode into a
private folder; the supervisor's ``/metrics`` reads the sum. A worker that dies is restarted on
the same sockets (connections the kernel queued for it meanwhile wait in its backlog); a worker
whose supervisor dies sees its control channel close and drains. Stopping: the supervisor closes
its copies of the listening sockets and tells each worker to drain; each worker drains as a
single sidecar would, within ``drain_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import socket
import sys
import tempfile

from prometheus_client import multiprocess

from .config import Config
from .control import Applied, Apply, Force, Message, Ready, Start, Stop, encode, receive
from .errors import SidecarError
from .logs import event
from .tickets import new_keys
from .tls import Material, PemBundle

log = logging.getLogger("sidecar.workers")

START_TIMEOUT = 30.0  # a worker must report ready within this
# a worker must apply pushed TLS material within this (the environment variable is for tests)
PUSH_TIMEOUT = float(os.environ.get("SIDECAR_WORKER_PUSH_TIMEOUT", "10"))
STOP_MARGIN = 5.0  # beyond drain_timeout, before a worker that has not exited is killed
RESTART_DELAY = 1.0


def worker_config(cfg: Config, workers: int) -> Config:
    """What a worker runs: no admin server of its own; ``max_connections`` split evenly (rounded up)."""
    share = -(-cfg.limits.max_connections // workers)
    return dataclasses.replace(
        cfg, admin=None, workers=1, limits=dataclasses.replace(cfg.limits, max_connections=share)
    )


# -- the supervisor's side -----------------------------------------------------------------------


@dataclasses.dataclass
class _Slot:
    index: int
    ready: bool = False
    writer: asyncio.StreamWriter | None = None
    replies: asyncio.Queue[Applied] = dataclasses.field(default_factory=asyncio.Queue)
    process: asyncio.subprocess.Process | None = None


class WorkerPool:
    """Starts, feeds, restarts and stops the worker processes of one supervisor."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.count = cfg.workers
        try:
            self.metrics_dir = tempfile.mkdtemp(prefix="sidecar-metrics-")
        except OSError as exc:
            raise SidecarError(
                f"workers: {cfg.workers} workers need a writable folder for their metrics "
                f"(TMPDIR, now {tempfile.gettempdir()}): {exc.strerror or exc}"
            ) from None
        self._slots = [_Slot(i) for i in range(self.count)]
        self._shares: list[list[list[socket.socket]]] = []  # [listener][worker] -> sockets
        self._material: Material | None = None
        self._ticket_keys = new_keys()  # one set per generation, for every worker (tickets.py)
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._started = asyncio.Event()
        self._ready_changed = asyncio.Event()
        self._start_failure: str | None = None
        self._pushes = 0  # numbers each push, so an answer is matched to its own push

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self, shares: list[list[list[socket.socket]]], material: Material) -> None:
        """Spawn every worker and wait until each has reported ready; a failure is fatal."""
        self._shares, self._material = shares, material
        for slot in self._slots:
            self._tasks.append(asyncio.ensure_future(self._keep_running(slot)))
        try:
            await asyncio.wait_for(self._all_ready(), START_TIMEOUT)
        except TimeoutError:
            raise SidecarError(f"workers: not every worker was ready within {START_TIMEOUT:.0f} s") from None
        if self._start_failure is not None:
            raise SidecarError(self._start_failure)
        self._started.set()

    async def stop(self, drain_timeout: float) -> None:
        """Tell every worker to drain; wait for them to exit (killing any that overstays)."""
        self._stopping = True
        await self._broadcast(Stop())
        procs = [slot.process for slot in self._slots if slot.process is not None]
        waits = [asyncio.ensure_future(p.wait()) for p in procs]
        if waits:
            _, late = await asyncio.wait(waits, timeout=drain_timeout + STOP_MARGIN)
            for proc in procs:
                if proc.returncode is None:
                    event(log, logging.ERROR, "worker did not stop in time; killing it", pid=proc.pid)
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
            if late:
                await asyncio.wait(late)
        await self.close()

    async def force(self) -> None:
        """A second SIGINT: workers stop waiting for their open connections."""
        await self._broadcast(Force())

    async def close(self) -> None:
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for slot in self._slots:
            if slot.process is not None and slot.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    slot.process.kill()
                await slot.process.wait()
        shutil.rmtree(self.metrics_dir, ignore_errors=True)

    # -- state and reloads ---------------------------------------------------------------------

    def not_ready(self) -> list[str]:
        return [f"worker {slot.index} is not running" for slot in self._slots if not slot.ready]

    async def push(self, material: Material) -> list[str]:
        """Hand ``material`` to every running worker; the problems, one per worker that failed. A
        worker that failed is restarted, and takes ``material`` as it starts again."""
        self._material, self._ticket_keys = material, new_keys()  # a reload voids every ticket issued before
        self._pushes += 1
        pushes = (self._push_one(slot, material.bundle, self._pushes) for slot in self._slots)
        results = await asyncio.gather(*pushes)
        return [problem for problem in results if problem]

    async def _push_one(self, slot: _Slot, bundle: PemBundle, number: int) -> str | None:
        if slot.writer is None:
            return None  # not started yet: it takes the newest material when it (re)starts
        # A worker still starting was sent its Start already, maybe with the previous material: it
        # reads this Apply once it serves, and the push waits for its answer like any other.
        try:
            slot.writer.write(encode(Apply(number, bundle, self._ticket_keys)))
            async with asyncio.timeout(PUSH_TIMEOUT):
                while (reply := await slot.replies.get()).number != number:
                    pass  # the late answer to an earlier push that timed out
        except (TimeoutError, ConnectionError) as exc:
            problem: str | None = f"worker {slot.index}: no answer to the reload within {PUSH_TIMEOUT:g} s"
            if not isinstance(exc, TimeoutError):
                problem = f"worker {slot.index}: the control channel failed during the reload"
        else:
            problem = None if reply.error is None else f"worker {slot.index}: {reply.error}"
        if problem is not None:
            event(log, logging.ERROR, "worker did not take the new certificates; restarting it", problem=problem)
            self._restart(slot)
        return problem

    def _restart(self, slot: _Slot) -> None:
        """Kill the worker of ``slot``; ``_keep_running`` starts it again with the newest material."""
        if slot.process is not None and slot.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                slot.process.kill()

    # -- internals ------------------------------------------------------------------------------

    async def _all_ready(self) -> None:
        while not all(slot.ready for slot in self._slots) and self._start_failure is None:
            self._ready_changed.clear()
            await self._ready_changed.wait()

    async def _broadcast(self, msg: Message) -> None:
        data = encode(msg)
        for slot in self._slots:
            if slot.writer is not None and not slot.writer.is_closing():
                with contextlib.suppress(ConnectionError):
                    slot.writer.write(data)
                    await slot.writer.drain()

    async def _keep_running(self, slot: _Slot) -> None:
        """Run the worker of ``slot``; restart it when it dies, unless the sidecar is stopping."""
        while True:
            code = await self._run_once(slot)
            if self._stopping:
                return
            if not self._started.is_set():
                self._start_failure = f"workers: worker {slot.index} exited with code {code} while starting"
                self._ready_changed.set()
                return
            event(log, logging.ERROR, "worker exited; restarting it", worker=slot.index, exit_code=code)
            await asyncio.sleep(RESTART_DELAY)

    async def _run_once(self, slot: _Slot) -> int:
        assert self._material is not None
        parent, child = socket.socketpair()
        listen_fds = [[s.fileno() for s in share[slot.index]] for share in self._shares]
        env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=self.metrics_dir)
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "sidecar.worker",
                str(child.fileno()),
                pass_fds=[child.fileno(), *(fd for fds in listen_fds for fd in fds)],
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
            )
        finally:
            child.close()
        slot.process = proc
        reader, writer = await asyncio.open_unix_connection(sock=parent)
        slot.writer = writer
        slot.replies = asyncio.Queue()
        try:
            cfg = worker_config(self.cfg, self.count)
            writer.write(encode(Start(slot.index, cfg, self._material.bundle, self._ticket_keys, listen_fds)))
            while (msg := await receive(reader)) is not None:
                if isinstance(msg, Ready):
                    slot.ready = True
                    self._ready_changed.set()
                    event(log, logging.DEBUG, "worker ready", worker=slot.index, pid=proc.pid)
                elif isinstance(msg, Applied):
                    slot.replies.put_nowait(msg)
            return await proc.wait()
        finally:
            slot.ready = False
            slot.writer = None
            writer.close()
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
            # a dead worker's live gauges (open connections) no longer count; its counters stay
            multiprocess.mark_process_dead(proc.pid, self.metrics_dir)  # type: ignore[no-untyped-call]
