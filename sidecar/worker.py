"""One worker process of a sidecar with ``workers: N`` (started by ``workers.WorkerPool``).

``python -m sidecar.worker FD``: FD is this worker's end of the control channel. The first
message carries the config, the TLS files' bytes and the numbers of the inherited listening
sockets; after that the worker proxies like a single sidecar, reloads when the supervisor pushes
new material, and drains when told to stop or when the supervisor goes away.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from collections.abc import Mapping
from pathlib import Path

from . import logs
from .config import Config
from .errors import CertificateError
from .logs import event
from .server import Sidecar
from .workers import encode, receive, receive_blocking

log = logging.getLogger("sidecar.worker")


class WorkerChannel:
    """The worker's end of the control channel, and what the supervisor handed over at start."""

    def __init__(
        self,
        sock: socket.socket,
        index: int,
        source: Mapping[Path, bytes],
        ticket_keys: bytes,
        listen_fds: list[list[int]],
    ) -> None:
        self.sock = sock
        self.index = index
        self.source = source
        self.ticket_keys = ticket_keys
        self.listen_fds = listen_fds
        self._writer: asyncio.StreamWriter | None = None

    def sockets(self, listener_index: int) -> list[socket.socket]:
        return [socket.socket(fileno=fd) for fd in self.listen_fds[listener_index]]

    async def serve(self, sidecar: Sidecar) -> None:
        """Say ready, then follow the supervisor's messages; its going away means stop."""
        reader, self._writer = await asyncio.open_unix_connection(sock=self.sock)
        self._writer.write(encode(("ready", os.getpid())))
        while (msg := await receive(reader)) is not None:
            if msg[0] == "tls":
                _, source, ticket_keys, number = msg
                error: str | None = None
                try:
                    await sidecar.store.reload(source, ticket_keys)
                except CertificateError as exc:
                    error = str(exc)
                    event(log, logging.ERROR, "certificates from the supervisor refused", error=error)
                self._writer.write(encode(("tls", number, error)))
            elif msg[0] == "stop":
                sidecar.request_stop()
            elif msg[0] == "force":
                sidecar.force_stop()
        sidecar.request_stop()


def main(argv: list[str]) -> int:
    sock = socket.socket(fileno=int(argv[0]))
    kind, index, cfg, source, ticket_keys, listen_fds = receive_blocking(sock)
    assert kind == "start" and isinstance(cfg, Config)
    logs.setup(cfg.log.level, cfg.log.format, worker=index)
    # The supervisor decides when to stop: a Ctrl-C in a terminal reaches the whole process group.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    import uvloop

    channel = WorkerChannel(sock, index, source, ticket_keys, listen_fds)

    async def serve() -> None:
        await Sidecar(cfg, channel=channel).run()

    uvloop.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
