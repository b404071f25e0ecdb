"""A capture listener and a client, run inside test namespaces (``python probe.py ...``).

``listen NAME=HOST:PORT[,dual] ... [--uvloop]`` binds every address (IPv6 ones IPV6_V6ONLY unless
``,dual``), prints ``ready``, and answers each connection with one JSON line: the listener's NAME,
the peer address and ``sidecar.origdst.original_dst`` of the accepted socket (with ``--uvloop``, of
the socket a uvloop transport hands out, as the relay will), then closes it.
``connect HOST PORT`` prints the one line it is answered, or ``{"error": ...}`` and exits 1.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import threading
from typing import cast

from sidecar.origdst import original_dst

TIMEOUT = 5.0


def answer(name: str, sock: object, peer: tuple[str, int]) -> bytes:
    try:
        dst = original_dst(sock)  # type: ignore[arg-type]
    except Exception as exc:  # the test shows it, rather than an empty answer
        return (json.dumps({"listener": name, "error": f"original_dst raised {exc!r}"}) + "\n").encode()
    return (json.dumps({"listener": name, "peer": list(peer[:2]), "original_dst": dst and list(dst)}) + "\n").encode()


def bind(spec: str) -> tuple[str, socket.socket]:
    name, _, where = spec.partition("=")
    where, _, flag = where.partition(",")
    host, _, port = where.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if flag == "dual" else 1)
    sock.bind((host, int(port)))
    sock.listen(64)
    return name, sock


def serve_plain(listeners: list[tuple[str, socket.socket]]) -> None:
    def loop(name: str, sock: socket.socket) -> None:
        while True:
            conn, peer = sock.accept()
            with conn:
                conn.sendall(answer(name, conn, peer))

    threads = [threading.Thread(target=loop, args=pair, daemon=True) for pair in listeners]
    for t in threads:
        t.start()
    print("ready", flush=True)
    for t in threads:
        t.join()


def serve_uvloop(listeners: list[tuple[str, socket.socket]]) -> None:
    import uvloop

    class Answer(asyncio.Protocol):
        def __init__(self, name: str) -> None:
            self.name = name

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            transport = cast(asyncio.Transport, transport)  # uvloop's transports are not its subclasses
            transport.write(answer(self.name, transport.get_extra_info("socket"), transport.get_extra_info("peername")))
            transport.close()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for name, sock in listeners:
            await loop.create_server(lambda name=name: Answer(name), sock=sock)  # type: ignore[misc]
        print("ready", flush=True)
        await asyncio.Event().wait()

    uvloop.run(main())


def connect(host: str, port: int) -> int:
    try:
        with socket.create_connection((host, port), timeout=TIMEOUT) as s:
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
    except OSError as exc:
        print(json.dumps({"error": str(exc)}))
        return 1
    print(data.decode().strip())
    return 0


def main(argv: list[str]) -> int:
    if argv[0] == "connect":
        return connect(argv[1], int(argv[2]))
    specs = [a for a in argv[1:] if not a.startswith("--")]
    listeners = [bind(spec) for spec in specs]
    (serve_uvloop if "--uvloop" in argv else serve_plain)(listeners)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
