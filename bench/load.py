"""Load generators: wrk and iperf3 when installed, a small asyncio client otherwise, and idle connections.

Every function takes the port to load (a pair's client side, or the backend for ``direct``) and
returns plain numbers; none knows about pairs or CPU. The pure-Python load exists so the quick
mode proves the pairs work on machines without wrk or iperf3 (CI); its numbers measure Python as
much as the pair and are never mixed with the tools' numbers in one report.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from .procs import BenchError, Procs

T = TypeVar("T")


def request(path: str = "/", host: str = "bench", *, close: bool = False) -> bytes:
    extra = "Connection: close\r\n" if close else ""
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


REQUEST = request()

WRK_SCRIPT = """\
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests": %.0f, "duration_us": %.0f, "bytes": %.0f, "connect_errors": %.0f, ' ..
    '"read_errors": %.0f, "write_errors": %.0f, "status_errors": %.0f, "timeouts": %.0f, ' ..
    '"p50_us": %.0f, "p99_us": %.0f, "p999_us": %.0f, "max_us": %.0f}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(99), latency:percentile(99.9), latency.max))
end
"""


@dataclass(frozen=True)
class HTTPResult:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int
    p999_ms: float | None = None  # wrk's; the pure-Python client does not say

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class BulkResult:
    bytes: int
    seconds: float

    @property
    def gbps(self) -> float:
        return self.bytes * 8 / self.seconds / 1e9 if self.seconds > 0 else 0.0


# -- wrk -----------------------------------------------------------------------------------------


def wrk(
    procs: Procs,
    wrk_path: str,
    url: str,
    *,
    threads: int,
    connections: int,
    duration: float,
    close: bool,
    env: dict[str, str],
    headers: tuple[str, ...] = (),
    during: Callable[[], None] | None = None,
    during_at: float = 2 / 3,
    timeout: float = 5.0,
) -> HTTPResult:
    """wrk's figures; ``during`` (if given) is called once, ``during_at`` into the run (a share of
    it), while the connections are open. A response slower than ``timeout`` counts as an error."""
    script = procs.tmp / "wrk-report.lua"
    if not script.exists():
        script.write_text(WRK_SCRIPT)
    argv = [wrk_path, "-t", str(max(1, min(threads, connections))), "-c", str(connections)]
    argv += ["-d", f"{max(1, round(duration))}s", "--timeout", f"{timeout:g}s", "-s", str(script)]
    for header in (*headers, *(("Connection: close",) if close else ())):
        argv += ["-H", header]
    argv.append(url)
    if during is None:
        code, out = procs.run("wrk", argv, timeout=duration + 60, env=env)
        return parse_wrk(out, code)
    proc = procs.start("wrk", argv, env=env)
    try:
        time.sleep(max(1, round(duration)) * during_at)
        if proc.alive():
            during()
        code = proc.popen.wait(duration + 60)
    except subprocess.TimeoutExpired:
        raise BenchError(f"wrk did not finish within {duration + 60:.0f}s:\n{proc.tail()}") from None
    finally:
        procs.stop(proc)
    return parse_wrk(proc.log_text(), code)


def parse_wrk(out: str, code: int = 0) -> HTTPResult:
    m = re.search(r"^BENCH (\{.*\})$", out, re.M)
    if code != 0 or m is None:
        raise BenchError(f"wrk failed (exit {code}):\n{out[-2000:]}")
    rec = json.loads(m.group(1))
    errors = sum(int(rec[k]) for k in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts"))
    return HTTPResult(
        requests=int(rec["requests"]),
        seconds=rec["duration_us"] / 1e6,
        p50_ms=rec["p50_us"] / 1000,
        p99_ms=rec["p99_us"] / 1000,
        errors=errors,
        p999_ms=rec["p999_us"] / 1000 if "p999_us" in rec else None,
    )


# -- iperf3 --------------------------------------------------------------------------------------


def iperf3(
    procs: Procs,
    iperf3_path: str,
    port: int,
    *,
    duration: float,
    reverse: bool,
    env: dict[str, str],
    host: str = "127.0.0.1",
) -> BulkResult:
    argv = [iperf3_path, "-c", host, "-p", str(port), "-t", str(max(1, round(duration))), "-J"]
    if reverse:
        argv.append("-R")
    code, out = procs.run("iperf3", argv, timeout=duration + 60, env=env)
    return parse_iperf3(out, code)


def parse_iperf3(out: str, code: int = 0) -> BulkResult:
    try:
        rec = json.loads(out[out.index("{") :])
    except (ValueError, json.JSONDecodeError):
        raise BenchError(f"iperf3 failed (exit {code}):\n{out[-2000:]}") from None
    if code != 0 or rec.get("error"):
        raise BenchError(f"iperf3 failed (exit {code}): {rec.get('error', out[-2000:])}")
    received = rec["end"]["sum_received"]
    return BulkResult(bytes=int(received["bytes"]), seconds=float(received["seconds"]))


# -- pure Python ---------------------------------------------------------------------------------


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


async def read_response(reader: asyncio.StreamReader, *, until_eof: bool) -> bytes:
    """Read one HTTP/1.1 response (its body by Content-Length or chunks); returns its head."""
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1."):
        raise ConnectionError(f"not an HTTP answer: {head[:40]!r}")
    m = re.search(rb"content-length:\s*(\d+)", head, re.I)
    if m:
        await reader.readexactly(int(m.group(1)))
    elif re.search(rb"transfer-encoding:\s*chunked", head, re.I):
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            await reader.readexactly(size + 2)
        while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers, then the blank line
            pass
    if until_eof:
        await reader.read()
    return head


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


async def _http(
    port: int, connections: int, duration: float, close: bool, host: str, path: str, host_header: str
) -> HTTPResult:
    loop = asyncio.get_running_loop()
    req = request(path, host_header, close=close)
    latencies: list[float] = []
    errors = 0
    deadline = loop.time() + duration

    async def worker() -> None:
        nonlocal errors
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        while loop.time() < deadline:
            started = time.perf_counter()
            try:
                if conn is None:
                    conn = await asyncio.open_connection(host, port)
                reader, writer = conn
                writer.write(req)
                await read_response(reader, until_eof=close)
                latencies.append(time.perf_counter() - started)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                errors += 1
                close_now = True
            else:
                close_now = close
            if close_now and conn is not None:
                conn[1].close()
                conn = None
        if conn is not None:
            conn[1].close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(connections)))
    elapsed = time.perf_counter() - started
    return HTTPResult(
        len(latencies), elapsed, _percentile(latencies, 50) * 1000, _percentile(latencies, 99) * 1000, errors
    )


def py_http(
    port: int,
    *,
    connections: int,
    duration: float,
    close: bool,
    host: str = "127.0.0.1",
    path: str = "/",
    host_header: str = "bench",
) -> HTTPResult:
    return run_async(_http(port, connections, duration, close, host, path, host_header))


async def bulk_transfer(port: int, size: int, reverse: bool, host: str = "127.0.0.1") -> BulkResult:
    reader, writer = await asyncio.open_connection(host, port)
    started = time.perf_counter()
    try:
        writer.write((b"D" if reverse else b"U") + size.to_bytes(8, "big"))
        if reverse:
            got = 0
            while got < size:
                data = await reader.read(1 << 20)
                if not data:
                    break
                got += len(data)
        else:
            chunk = memoryview(bytes(256 * 1024))
            left = size
            while left > 0:
                n = min(len(chunk), left)
                writer.write(chunk[:n])
                left -= n
                await writer.drain()
            got = size if await reader.read(1) == b"K" else 0
    finally:
        writer.close()
    if got < size:
        raise BenchError(f"bulk transfer stopped after {got} of {size} bytes")
    return BulkResult(got, time.perf_counter() - started)


def py_bulk(port: int, *, size: int, reverse: bool, host: str = "127.0.0.1") -> BulkResult:
    return run_async(bulk_transfer(port, size, reverse, host))


# -- idle connections ----------------------------------------------------------------------------


@dataclass(frozen=True)
class IdleResult:
    connections: int
    failed: int
    rss_before_kib: int
    rss_after_kib: int

    @property
    def kib_per_connection(self) -> float:
        return (self.rss_after_kib - self.rss_before_kib) / self.connections if self.connections else 0.0


async def _idle(port: int, n: int, rss: Callable[[], int], settle: float, host: str) -> IdleResult:
    before = rss()
    writers: list[asyncio.StreamWriter] = []
    gate = asyncio.Semaphore(50)

    async def one() -> None:
        async with gate:
            reader, writer = await asyncio.open_connection(host, port)
            writers.append(writer)
            writer.write(REQUEST)
            await asyncio.wait_for(read_response(reader, until_eof=False), 10)

    try:
        outcomes = await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)
        failed = sum(1 for o in outcomes if isinstance(o, BaseException))
        await asyncio.sleep(settle)
        after = rss()
    finally:
        for writer in writers:
            writer.close()
    return IdleResult(n - failed, failed, before, after)


def idle(
    port: int, *, connections: int, rss: Callable[[], int], settle: float = 1.0, host: str = "127.0.0.1"
) -> IdleResult:
    """Open ``connections`` through the pair, one request each so every hop is up, hold, measure, close."""
    return run_async(_idle(port, connections, rss, settle, host))
