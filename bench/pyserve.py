"""Pure-Python backends, for machines without nginx or iperf3 (CI): run as ``python -m bench.pyserve``.

HTTP: answers every request (headers only, no body expected) with ``200 ok``; honours
``Connection: close``. Bulk: the first byte says the direction and eight more the size: ``U`` +
size reads that many bytes then answers ``K``; ``D`` + size sends that many bytes. Prints
``ready HTTP_PORT BULK_PORT`` once both listen on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nok\n"
RESPONSE_CLOSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n"
CHUNK = 256 * 1024


async def http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            if b"connection: close" in head.lower():
                writer.write(RESPONSE_CLOSE)
                await writer.drain()
                break
            writer.write(RESPONSE)
            await writer.drain()
    writer.close()


async def bulk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
        mode = await reader.readexactly(1)
        remaining = int.from_bytes(await reader.readexactly(8), "big")
        if mode == b"U":
            while remaining > 0:
                data = await reader.read(min(CHUNK * 4, remaining))
                if not data:
                    break
                remaining -= len(data)
            writer.write(b"K")
        elif mode == b"D":
            chunk = memoryview(bytes(CHUNK))
            while remaining > 0:
                n = min(CHUNK, remaining)
                writer.write(chunk[:n])
                remaining -= n
                await writer.drain()
        await writer.drain()
    writer.close()


async def main() -> None:
    h = await asyncio.start_server(http, "127.0.0.1", 0, backlog=4096)
    b = await asyncio.start_server(bulk, "127.0.0.1", 0, backlog=4096)
    print(f"ready {h.sockets[0].getsockname()[1]} {b.sockets[0].getsockname()[1]}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
