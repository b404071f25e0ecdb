"""Per-request CPU cost of the HTTP/1 paths behind ``client_cert_header: xfcc``, against llhttp and h11.

``python -m bench.http1_parsers [--requests N] [--rounds R]`` prints one markdown table: for each
request shape, microseconds per request (best and median of R rounds of N requests, one process,
one core). Times are the thread's CPU time (``time.thread_time``), so other processes on a busy
machine do not count; cache effects of sharing it still do. Rows:
- ``sidecar rewrite``: ``XfccRewriter.feed`` on the request (validate, strip, add the header)
  plus ``feed_response`` on a small response (the framing the upgrade hand-off needs);
- ``sidecar request only``: ``feed`` alone;
- ``httptools (llhttp)``: parse only, with the header callback uvicorn uses; it rewrites nothing,
  so a design on it would pay this and still have to find and rebuild the head bytes;
- ``h11``: parse only (``receive_data`` + ``next_event`` to the end of the message).
Bounded: R x N requests per row, nothing on the network.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

from sidecar.http1 import XfccRewriter

LINE = (
    b"x-forwarded-client-cert: By=spiffe://mesh.local/orders;Hash="
    + b"ab" * 32
    + (b';Subject="CN=frontend";URI=spiffe://mesh.local/frontend')
)

SHAPES: dict[str, bytes] = {
    "small GET (wrk-like, 4 fields)": (
        b"GET /api/orders/42 HTTP/1.1\r\nHost: orders.mesh.local:8080\r\nUser-Agent: wrk\r\n"
        b"Accept: */*\r\nConnection: keep-alive\r\n\r\n"
    ),
    "POST, Content-Length, 64-byte body": (
        b"POST /api/orders HTTP/1.1\r\nHost: orders.mesh.local\r\nContent-Type: application/json\r\n"
        b"Content-Length: 64\r\n\r\n" + b'{"order":{"id":42,"items":[1,2,3],"note":"' + b"x" * 19 + b'"}}'
    ),
    "browser-like GET (14 fields, 900 bytes)": (
        b"GET /dashboard/orders?page=2&sort=date HTTP/1.1\r\nHost: orders.mesh.local\r\n"
        b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120 Safari/537\r\n"
        b"Accept: text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8\r\n"
        b"Accept-Language: en-GB,en;q=0.9\r\nAccept-Encoding: gzip, deflate, br\r\nConnection: keep-alive\r\n"
        b"Cookie: session=" + b"x" * 200 + b"; theme=dark; consent=1\r\nUpgrade-Insecure-Requests: 1\r\n"
        b"Sec-Fetch-Dest: document\r\nSec-Fetch-Mode: navigate\r\nSec-Fetch-Site: same-origin\r\n"
        b"Sec-Fetch-User: ?1\r\nCache-Control: max-age=0\r\nX-Request-Id: 7d1f0c2e-4b8a-4c1e-9f3a-2b6d8e0a1c55\r\n\r\n"
    ),
    "chunked POST (3 chunks, trailer)": (
        b"POST /upload HTTP/1.1\r\nHost: orders.mesh.local\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"10\r\n0123456789abcdef\r\n10\r\n0123456789abcdef\r\n4\r\nend.\r\n0\r\nChecksum: 42\r\n\r\n"
    ),
}
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"


def sidecar_full(request: bytes, n: int) -> float:
    rw = XfccRewriter(LINE)
    feed, feed_response = rw.feed, rw.feed_response
    start = time.thread_time()
    for _ in range(n):
        feed(request)
        feed_response(RESPONSE)
    return time.thread_time() - start


def sidecar_request(request: bytes, n: int) -> float:
    rw = XfccRewriter(LINE)
    feed = rw.feed
    start = time.thread_time()
    for _ in range(n):
        feed(request)
    return time.thread_time() - start


def httptools_parse(request: bytes, n: int) -> float:
    import httptools

    class Sink:
        def __init__(self) -> None:
            self.headers: list[tuple[bytes, bytes]] = []

        def on_header(self, name: bytes, value: bytes) -> None:
            self.headers.append((name, value))

        def on_headers_complete(self) -> None:
            self.headers = []

        def on_body(self, body: bytes) -> None:
            pass

    parser = httptools.HttpRequestParser(Sink())
    start = time.thread_time()
    for _ in range(n):
        parser.feed_data(request)
    return time.thread_time() - start


def h11_parse(request: bytes, n: int) -> float:
    import h11

    conns = [h11.Connection(h11.SERVER) for _ in range(n)]  # built outside the timed loop
    start = time.thread_time()
    for conn in conns:
        conn.receive_data(request)
        while type(conn.next_event()) is not h11.EndOfMessage:
            pass
    return time.thread_time() - start


ROWS: dict[str, Callable[[bytes, int], float]] = {
    "sidecar rewrite": sidecar_full,
    "sidecar request only": sidecar_request,
    "httptools (llhttp)": httptools_parse,
    "h11": h11_parse,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=5000, help="requests per round (default 5000)")
    ap.add_argument("--rounds", type=int, default=15, help="rounds per row (default 15)")
    args = ap.parse_args(argv)
    print(f"Python {sys.version.split()[0]}; CPU microseconds per request, best / median of {args.rounds} rounds")
    print(f"of {args.requests} requests\n")
    print("| request | " + " | ".join(ROWS) + " |")
    print("| --- |" + " --- |" * len(ROWS))
    for shape, request in SHAPES.items():
        cells = []
        for run in ROWS.values():
            n = args.requests if run is not h11_parse else max(1, args.requests // 4)
            run(request, n)  # warm up: caches, allocator, branch predictors
            times = [run(request, n) / n * 1e6 for _ in range(args.rounds)]
            cells.append(f"{min(times):.2f} / {statistics.median(times):.2f}")
        print(f"| {shape} ({len(request)} B) | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
