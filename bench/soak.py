"""``python -m bench soak --minutes N``: a long, ordinary life through our sidecar pair, watched for leaks.

One pair (``pairs.Sidecar``, the bench's certificates and backends, started through
``Bench.setup`` as every bench run is) carries a bounded mix at once: connection churn (one
request per connection), keep-alive requests, a bulk transfer now and then, idle connections
held open and then used, and a certificate rotation (both leaves re-issued on disk) every
``--rotate-every`` seconds, each one proven by the next handshake presenting the new serial.
Every ``--sample-every`` seconds it reads both sidecar processes' open descriptors and RSS, the
load's counts and errors, and the access records that did not end ``ok``. ``soakreport`` judges
the trends and writes the report; this module only runs and samples.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import ssl
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509

from . import certs as certs_mod
from . import load, tools
from .pairs import PAIRS, Ctx, Running
from .procs import BenchError, Proc, Procs, rss_kib
from .runner import Bench, Settings

OP_TIMEOUT = 30.0  # one request, connection or probe; a bulk transfer gets BULK_TIMEOUT
BULK_TIMEOUT = 120.0
ROTATION_DEADLINE = 10.0  # the contract says 2 s; more is an error, not a wait
MAX_ERRORS_KEPT = 20
LOAD_ERRORS = (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError)
DRAIN_SETTLE = 2.0  # after the load: time for both sidecars to close what it closed


@dataclass(frozen=True)
class SoakSettings:
    minutes: float
    rotate_every: float = 60.0
    sample_every: float = 5.0
    workers: int = 1
    churn_workers: int = 4  # each: connect, one request with Connection: close, repeat
    churn_pause: float = 0.02
    keepalive_connections: int = 4  # each: one connection for the whole run, a request every pause
    keepalive_pause: float = 0.01
    idle_connections: int = 50  # each: connect, one request, hold idle, one more request, close, repeat
    idle_hold: tuple[float, float] = (20.0, 90.0)
    bulk_every: float = 20.0  # a transfer of bulk_mb, alternately up and down
    bulk_mb: int = 32
    max_rate: float = 2000.0  # hard bound on load operations per second, whatever the pauses allow

    @property
    def seconds(self) -> float:
        return self.minutes * 60.0


@dataclass
class Sample:
    t: float  # seconds since the load started
    fds: dict[str, int]  # side (client, server) -> open descriptors of its processes
    rss_kib: dict[str, int]
    requests: int  # cumulative, every kind
    connections: int
    bulk_bytes: int
    errors: int
    not_ok: dict[str, int]  # side -> access records so far whose outcome was not ok
    reloads: dict[str, int]  # side -> "certificates reloaded" lines so far
    open_connections: int  # the load's own, now


@dataclass
class SoakRun:
    settings: SoakSettings
    samples: list[Sample] = field(default_factory=list)  # while the load runs
    baseline: Sample | None = None  # the pair up, before any load
    drained: Sample | None = None  # DRAIN_SETTLE after the load stopped and closed every connection
    rotations: list[dict[str, float]] = field(default_factory=list)  # t, seen_after_s
    errors: list[str] = field(default_factory=list)  # the first MAX_ERRORS_KEPT, with their time
    error_count: int = 0
    outcomes: dict[str, dict[str, int]] = field(default_factory=dict)  # side -> outcome -> count
    info: dict[str, Any] = field(default_factory=dict)


class _LogTally:
    """Reads a sidecar's log as it grows: outcomes of access records, reloads."""

    def __init__(self, proc: Proc) -> None:
        self.proc = proc
        self.offset = 0
        self.partial = ""
        self.outcomes: dict[str, int] = {}
        self.reloads = 0

    def read(self) -> None:
        text = self.proc.log_text(self.offset)
        self.offset += len(text.encode())
        lines = (self.partial + text).split("\n")
        self.partial = lines.pop()
        for line in lines:
            if '"sidecar.access"' in line:
                outcome = json.loads(line).get("outcome", "?")
                self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
            elif '"certificates reloaded"' in line:
                self.reloads += 1

    @property
    def not_ok(self) -> int:
        return sum(n for outcome, n in self.outcomes.items() if outcome != "ok")


class Soak:
    def __init__(self, settings: SoakSettings, procs: Procs) -> None:
        self.s = settings
        self.procs = procs
        self.result = SoakRun(settings)
        self.requests = 0
        self.connections = 0
        self.bulk_bytes = 0
        self.open_now = 0
        self.ops = 0
        self.started = 0.0
        self.deadline = 0.0

    def run(self) -> SoakRun:
        found = tools.find()
        bench = Bench(Settings(pairs=("sidecar",), load="python", workers=self.s.workers), self.procs, found)
        ctx = bench.setup()
        pair = PAIRS["sidecar"].start(ctx, resume=True)
        sides = dict(zip(("client", "server"), pair.procs, strict=True))
        tallies = {side: _LogTally(proc) for side, proc in sides.items()}
        self.result.info = {
            "backends": bench.backends,
            "workers": self.s.workers,
            "python": sys.version.split()[0],
            "cores": os.cpu_count(),
        }
        load.run_async(self._main(ctx, pair, sides, tallies))
        for side, tally in tallies.items():
            tally.read()
            self.result.outcomes[side] = dict(sorted(tally.outcomes.items()))
        if dead := pair.dead():
            raise BenchError("; ".join(dead))
        return self.result

    # -- the run -------------------------------------------------------------------------------

    async def _main(self, ctx: Ctx, pair: Running, sides: dict[str, Proc], tallies: dict[str, _LogTally]) -> None:
        loop = asyncio.get_running_loop()
        self.started = loop.time()
        self.deadline = self.started + self.s.seconds
        self.result.baseline = self._sample_now(sides, tallies)
        tasks = [
            *(self._churn(pair.http_port) for _ in range(self.s.churn_workers)),
            *(self._keepalive(pair.http_port) for _ in range(self.s.keepalive_connections)),
            *(self._idle(pair.http_port, i) for i in range(self.s.idle_connections)),
            self._bulk(pair.bulk_port),
            self._rotate(ctx, pair),
            self._sample(sides, tallies),
        ]
        await asyncio.gather(*tasks)
        await asyncio.sleep(DRAIN_SETTLE)
        self.result.drained = self._sample_now(sides, tallies)

    def _left(self) -> float:
        return self.deadline - asyncio.get_running_loop().time()

    def _elapsed(self) -> float:
        return asyncio.get_running_loop().time() - self.started

    async def _paced(self, pause: float) -> bool:
        """Sleep ``pause`` (at least what ``max_rate`` allows); False once the run is over."""
        self.ops += 1
        floor = self.ops / self.s.max_rate - self._elapsed()
        await asyncio.sleep(max(pause, floor, 0.0))
        return self._left() > 0

    def _error(self, what: str, exc: BaseException | str) -> None:
        self.result.error_count += 1
        if len(self.result.errors) < MAX_ERRORS_KEPT:
            detail = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
            self.result.errors.append(f"{self._elapsed():.1f}s {what}: {detail}")

    async def _connect(self, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        conn = await asyncio.open_connection("127.0.0.1", port)
        self.connections += 1
        self.open_now += 1
        return conn

    def _close(self, writer: asyncio.StreamWriter) -> None:
        writer.close()
        self.open_now -= 1

    async def _request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, close: bool) -> None:
        writer.write(load.request(close=close))
        head = await load.read_response(reader, until_eof=close)
        status = head.split(b"\r\n", 1)[0]
        if not status.startswith((b"HTTP/1.1 200 ", b"HTTP/1.0 200 ")):
            raise ConnectionError(f"answer {status!r}")
        self.requests += 1

    @contextlib.asynccontextmanager
    async def _connection(self, port: int) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
        async with asyncio.timeout(OP_TIMEOUT):
            reader, writer = await self._connect(port)
        try:
            yield reader, writer
        finally:
            self._close(writer)

    async def _churn(self, port: int) -> None:
        while self._left() > 0:
            try:
                async with self._connection(port) as conn, asyncio.timeout(OP_TIMEOUT):
                    await self._request(*conn, close=True)
            except LOAD_ERRORS as exc:
                self._error("churn request", exc)
            if not await self._paced(self.s.churn_pause):
                break

    async def _keepalive(self, port: int) -> None:
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            while self._left() > 0:
                try:
                    async with asyncio.timeout(OP_TIMEOUT):
                        if conn is None:
                            conn = await self._connect(port)
                        await self._request(*conn, close=False)
                except LOAD_ERRORS as exc:
                    self._error("keep-alive request", exc)  # an established connection was cut: a failure
                    if conn is not None:
                        self._close(conn[1])
                    conn = None
                if not await self._paced(self.s.keepalive_pause):
                    break
        finally:
            if conn is not None:
                self._close(conn[1])

    async def _idle(self, port: int, index: int) -> None:
        rng = random.Random(index)
        low, high = self.s.idle_hold
        await asyncio.sleep(min(self._left(), rng.uniform(0, low)))  # spread the first opens
        while self._left() > 1:
            try:
                async with self._connection(port) as conn:
                    async with asyncio.timeout(OP_TIMEOUT):
                        await self._request(*conn, close=False)
                    await asyncio.sleep(max(0.0, min(rng.uniform(low, high), self._left() - 1)))
                    async with asyncio.timeout(OP_TIMEOUT):
                        await self._request(*conn, close=False)  # still good after the idle time
            except LOAD_ERRORS as exc:
                self._error("idle connection", exc)

    async def _bulk(self, port: int) -> None:
        reverse = False
        while self._left() > self.s.bulk_every:
            await asyncio.sleep(self.s.bulk_every)
            self.open_now += 1
            try:
                async with asyncio.timeout(BULK_TIMEOUT):
                    done = await load.bulk_transfer(port, self.s.bulk_mb << 20, reverse)
                self.bulk_bytes += done.bytes
                self.connections += 1
            except (OSError, TimeoutError, asyncio.IncompleteReadError, BenchError) as exc:
                self._error("bulk " + ("down" if reverse else "up"), exc)
            finally:
                self.open_now -= 1
            reverse = not reverse

    async def _rotate(self, ctx: Ctx, pair: Running) -> None:
        certs = ctx.certs
        assert certs.issuer is not None and pair.tls_port is not None
        while self._left() > self.s.rotate_every:
            await asyncio.sleep(self.s.rotate_every)
            folder = certs.server.cert.parent
            written_at = self._elapsed()
            server = await asyncio.to_thread(certs_mod.write_leaf, certs.issuer, folder, "server", certs_mod.SERVER_ID)
            await asyncio.to_thread(certs_mod.write_leaf, certs.issuer, folder, "client", certs_mod.CLIENT_ID)
            seen_after = await self._until_served(pair.tls_port, certs, server.serial)
            if seen_after is None:
                self._error("rotation", f"the server still presented the old serial {ROTATION_DEADLINE:.0f}s later")
            self.result.rotations.append({"t": written_at, "seen_after_s": seen_after if seen_after else -1.0})

    async def _until_served(self, port: int, certs: certs_mod.Certs, serial: int) -> float | None:
        """Seconds until a new handshake on the server side presents ``serial``, None past the deadline."""
        started = time.monotonic()
        while time.monotonic() - started < ROTATION_DEADLINE:
            try:
                async with asyncio.timeout(OP_TIMEOUT):
                    if await self._served_serial(port, certs) == serial:
                        return time.monotonic() - started
            except (OSError, TimeoutError, ssl.SSLError) as exc:
                self._error("rotation probe", exc)
            await asyncio.sleep(0.2)
        return None

    async def _served_serial(self, port: int, certs: certs_mod.Certs) -> int:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(certs.ca)
        ctx.load_cert_chain(certs.client.cert, certs.client.key)
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=certs_mod.SERVER_NAME)
        try:
            der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        finally:
            writer.close()
        return x509.load_der_x509_certificate(der).serial_number

    async def _sample(self, sides: dict[str, Proc], tallies: dict[str, _LogTally]) -> None:
        while self._left() > 0:
            self._take_sample(sides, tallies)
            await asyncio.sleep(min(self.s.sample_every, max(self._left(), 0.0)))

    def _take_sample(self, sides: dict[str, Proc], tallies: dict[str, _LogTally]) -> None:
        self.result.samples.append(self._sample_now(sides, tallies))

    def _sample_now(self, sides: dict[str, Proc], tallies: dict[str, _LogTally]) -> Sample:
        for tally in tallies.values():
            tally.read()
        return Sample(
            t=round(self._elapsed(), 3),
            fds={side: open_fds(proc.pids()) for side, proc in sides.items()},
            rss_kib={side: rss_kib(proc.pids()) for side, proc in sides.items()},
            requests=self.requests,
            connections=self.connections,
            bulk_bytes=self.bulk_bytes,
            errors=self.result.error_count,
            not_ok={side: tally.not_ok for side, tally in tallies.items()},
            reloads={side: tally.reloads for side, tally in tallies.items()},
            open_connections=self.open_now,
        )


def open_fds(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):  # it exited meanwhile
            total += len(os.listdir(f"/proc/{pid}/fd"))
    return total
