"""One worker process of a sidecar with ``workers: N`` (started by ``supervisor.WorkerPool``).

``python -m sidecar.worker FD``: FD is this worker's end of the control channel (``control.py``).
The first message (``Start``) carries the config, the TLS material's bytes and the numbers of the
inherited listening sockets; after that the worker proxies like a single sidecar, serves the
material its supervisor pushes (``Apply``, answered with ``Applied``), and drains when told to
stop or when the supervisor goes away.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys

from prometheus_client import CollectorRegistry

from . import heap, logs
from .control import Applied, Apply, Force, Ready, Start, Stop, encode, receive, receive_start
from .errors import CertificateError
from .lifecycle import Role
from .logs import event
from .metrics import DataMetrics
from .runtime import Runtime
from .tls import TLSStore

log = logging.getLogger("sidecar.worker")


class Worker(Role):
    """Proxies on sockets and TLS material handed over by its supervisor."""

    signals_relayed = True

    def __init__(self, start: Start, channel: socket.socket) -> None:
        super().__init__()
        self.cfg = start.config
        self.handed = start
        self.channel = channel
        self.store = TLSStore(self.cfg.tls, listeners=self.cfg.tls_servers())
        # counts go to the supervisor through prometheus_client's multiprocess files
        self.runtime = Runtime(self.cfg, self.store, DataMetrics(CollectorRegistry()))

    async def start(self) -> None:
        await self.store.load(self.handed.bundle, self.handed.ticket_keys)
        sockets = [[socket.socket(fileno=fd) for fd in fds] for fds in self.handed.listen_fds]
        await self.runtime.serve(sockets)
        self.spawn(self._follow())

    def on_force(self) -> None:
        self.runtime.force()

    async def drain(self) -> None:
        cut = await self.runtime.drain(self.cfg.limits.drain_timeout)
        await self.close()
        event(log, logging.INFO, "stopped", cut_connections=cut)

    async def close(self) -> None:
        await self.stopping("listeners", self.runtime.close())
        await self.cancel_tasks()

    async def _follow(self) -> None:
        """Say ready, then follow the supervisor's messages; its going away means stop."""
        reader, writer = await asyncio.open_unix_connection(sock=self.channel)
        writer.write(encode(Ready(os.getpid())))
        while (msg := await receive(reader)) is not None:
            if isinstance(msg, Apply):
                error: str | None = None
                try:
                    await self.store.reload(msg.bundle, msg.ticket_keys)
                except CertificateError as exc:
                    error = str(exc)
                    event(log, logging.ERROR, "certificates from the supervisor refused", error=error)
                writer.write(encode(Applied(msg.number, error)))
            elif isinstance(msg, Stop):
                self.request_stop()
            elif isinstance(msg, Force):
                self.force_stop()
        self.request_stop()


def main(argv: list[str]) -> int:
    channel = socket.socket(fileno=int(argv[0]))
    start = receive_start(channel)
    logs.setup(start.config.log.level, start.config.log.format, worker=start.index)
    heap.hold_steady()
    # The supervisor decides when to stop: a Ctrl-C in a terminal reaches the whole process group.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    import uvloop

    async def serve() -> None:
        await Worker(start, channel).run()

    uvloop.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
