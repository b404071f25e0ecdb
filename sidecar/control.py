"""The control channel between a supervisor and each of its worker processes: typed messages over
a private socket pair, length-prefixed pickles (both ends are this program).

Supervisor -> worker: ``Start`` (once, first), ``Apply`` (new TLS material), ``Stop``, ``Force``.
Worker -> supervisor: ``Ready`` (once, serving), ``Applied`` (the answer to one ``Apply``).
A message of another type, or one over ``MAX_MESSAGE``, means the channel is not ours: it is
treated as gone.
"""

from __future__ import annotations

import asyncio
import pickle
import socket
import struct
from dataclasses import dataclass, field

from .config import Config
from .tls import PemBundle

_HEADER = struct.Struct("!I")
MAX_MESSAGE = 16 * 1024 * 1024


@dataclass(frozen=True)
class Start:
    """What a worker runs: its index, its config, the TLS material's bytes, the session-ticket keys
    and the numbers of the listening sockets it inherited (per listener, in config order)."""

    index: int
    config: Config
    bundle: PemBundle = field(repr=False)  # holds the private key: never in a repr
    ticket_keys: bytes = field(repr=False)
    listen_fds: list[list[int]] = field(default_factory=list)


@dataclass(frozen=True)
class Ready:
    pid: int


@dataclass(frozen=True)
class Apply:
    """Serve this material from now on; answer with ``Applied(number, ...)``."""

    number: int
    bundle: PemBundle = field(repr=False)
    ticket_keys: bytes = field(repr=False)


@dataclass(frozen=True)
class Applied:
    number: int
    error: str | None  # None: the worker serves the material of push ``number``


@dataclass(frozen=True)
class Stop:
    """Drain, as on SIGTERM."""


@dataclass(frozen=True)
class Force:
    """Stop waiting for open connections (a second SIGINT)."""


Message = Start | Ready | Apply | Applied | Stop | Force
_TYPES = (Start, Ready, Apply, Applied, Stop, Force)


def encode(msg: Message) -> bytes:
    body = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(body)) + body


async def receive(reader: asyncio.StreamReader) -> Message | None:
    """The next message, or None once the other side has gone."""
    try:
        (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
        if size > MAX_MESSAGE:
            return None
        msg = pickle.loads(await reader.readexactly(size))
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    return msg if isinstance(msg, _TYPES) else None


def receive_start(sock: socket.socket) -> Start:
    """The first message, read before the worker's event loop exists."""
    (size,) = _HEADER.unpack(_recv_exactly(sock, _HEADER.size))
    if size > MAX_MESSAGE:
        raise ConnectionError("the control channel does not speak this program's protocol")
    msg = pickle.loads(_recv_exactly(sock, size))
    if not isinstance(msg, Start):
        raise ConnectionError(f"expected Start on the control channel, got {type(msg).__name__}")
    return msg


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    buf = bytearray()
    while len(buf) < size:
        chunk = sock.recv(size - len(buf))
        if not chunk:
            raise ConnectionError("the supervisor closed the control channel")
        buf += chunk
    return bytes(buf)
