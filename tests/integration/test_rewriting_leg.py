"""The leg to an app whose requests are rewritten (``sidecar.rewriting``), over real sockets on
127.0.0.1 under uvloop: holding pauses the caller, an end of data waits for held bytes, a refusal
waits for the answers owed before it, and a cut request resets the app's connection.

Each test joins a plain caller leg (whose far end is the socket ``caller``) to a ``RewritingLeg``
(whose far end is the socket ``app``) as the connection driver does, and plays the driver: it
records what the legs report and closes as it would.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import uvloop
from support import tcp_pair

from sidecar.errors import HTTPRefusal, PeerError
from sidecar.http1 import XfccRewriter
from sidecar.legs import Leg, TLSLeg
from sidecar.relay import Side
from sidecar.rewriting import RewritingLeg

LIMIT = 10.0
LINE = b"x-forwarded-client-cert: By=spiffe://mesh.local/orders;Hash=ab;URI=spiffe://mesh.local/frontend"
UPGRADE = b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
SWITCHED = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@dataclass
class Driver:
    """Plays the connection driver: records the legs' reports, closes on a refusal as it does."""

    loop: asyncio.AbstractEventLoop
    events: list[tuple[str, Any]] = field(default_factory=list)
    legs: list[Leg] = field(default_factory=list)

    def leg_connected(self, leg: Leg) -> None:
        pass

    def leg_secured(self, leg: TLSLeg) -> None:
        pass

    def leg_failed(self, leg: Leg, error: PeerError) -> None:
        self.events.append(("failed", error))

    def leg_eof(self, leg: Leg) -> None:
        self.events.append(("eof", leg.side))

    def leg_lost(self, leg: Leg, exc: Exception | None) -> None:
        self.events.append(("lost", leg.side))

    def leg_refused(self, leg: Leg, refusal: HTTPRefusal, *, close: bool) -> None:
        self.events.append(("refused", (refusal.reason, close)))
        if close:
            for each in self.legs:
                each.abort() if each is leg and refusal.partial else each.close()


@dataclass
class Rig:
    driver: Driver
    caller_leg: Leg
    app_leg: RewritingLeg
    caller: socket.socket
    app: socket.socket

    async def recv(self, sock: socket.socket, n: int) -> bytes:
        """Exactly ``n`` bytes (fewer only at the end of data)."""
        loop = asyncio.get_running_loop()
        data = b""
        async with asyncio.timeout(LIMIT):
            while len(data) < n:
                chunk = await loop.sock_recv(sock, n - len(data))
                if not chunk:
                    break
                data += chunk
        return data

    async def recv_until(self, sock: socket.socket, end: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        data = b""
        async with asyncio.timeout(LIMIT):
            while not data.endswith(end):
                chunk = await loop.sock_recv(sock, 65536)
                assert chunk, f"end of data after {data!r}"
                data += chunk
        return data

    async def send(self, sock: socket.socket, data: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(sock, data)

    async def until(self, predicate: Callable[[], bool]) -> None:
        async with asyncio.timeout(LIMIT):
            while not predicate():  # noqa: ASYNC110 - polling the legs' own state
                await asyncio.sleep(0.005)

    def caller_reading(self) -> bool:
        transport = self.caller_leg.transport
        return transport is not None and transport.is_reading()


@contextlib.asynccontextmanager
async def rig() -> AsyncIterator[Rig]:
    loop = asyncio.get_running_loop()
    driver = Driver(loop)
    caller_leg = Leg(driver, Side.DOWN)
    app_leg = RewritingLeg(driver, Side.UP, XfccRewriter(LINE))
    driver.legs = [caller_leg, app_leg]
    mine, caller = await tcp_pair()
    await loop.connect_accepted_socket(lambda: caller_leg, mine)
    mine2, app = await tcp_pair()
    await loop.connect_accepted_socket(lambda: app_leg, mine2)
    caller_leg.other, app_leg.other = app_leg, caller_leg
    caller_leg.start_streaming(app_leg)
    app_leg.start_streaming(caller_leg)
    try:
        yield Rig(driver, caller_leg, app_leg, caller, app)
    finally:
        for leg in (caller_leg, app_leg):
            leg.abort()
        caller.close()
        app.close()
        await asyncio.sleep(0)


def under_uvloop(scenario: Callable[[Rig], Awaitable[None]]) -> Callable[[], None]:
    def test() -> None:
        async def run() -> None:
            async with rig() as r:
                await scenario(r)

        uvloop.run(run())

    test.__name__, test.__doc__ = scenario.__name__, scenario.__doc__
    return test


@under_uvloop
async def test_held_bytes_pause_the_caller_until_the_app_switches(r: Rig) -> None:
    await r.send(r.caller, UPGRADE + b"frames, sent early")
    head = await r.recv_until(r.app, b"\r\n\r\n")
    assert head == UPGRADE[:-2] + LINE + b"\r\n\r\n"
    await r.until(lambda: not r.caller_reading())  # the caller's leg stops reading while bytes are held
    await r.send(r.app, SWITCHED)
    assert await r.recv(r.app, 18) == b"frames, sent early"  # released by the 101
    assert await r.recv(r.caller, len(SWITCHED)) == SWITCHED
    await r.until(r.caller_reading)
    await r.send(r.caller, b"x-forwarded-client-cert: raw now\r\n\r\n")
    assert await r.recv(r.app, 36) == b"x-forwarded-client-cert: raw now\r\n\r\n"


@under_uvloop
async def test_a_declined_upgrade_parses_what_was_held(r: Rig) -> None:
    second = b"GET /next HTTP/1.1\r\nHost: a\r\nx-forwarded-client-cert: spoof\r\n\r\n"
    await r.send(r.caller, UPGRADE + second)
    await r.recv_until(r.app, b"\r\n\r\n")
    await r.until(lambda: not r.caller_reading())
    await r.send(r.app, OK)
    assert await r.recv_until(r.app, b"\r\n\r\n") == b"GET /next HTTP/1.1\r\nHost: a\r\n" + LINE + b"\r\n\r\n"
    await r.until(r.caller_reading)


@under_uvloop
async def test_the_callers_end_of_data_waits_behind_held_bytes(r: Rig) -> None:
    await r.send(r.caller, UPGRADE + b"last")
    r.caller.shutdown(socket.SHUT_WR)
    await r.recv_until(r.app, b"\r\n\r\n")
    await r.send(r.app, SWITCHED)
    loop = asyncio.get_running_loop()
    assert await r.recv(r.app, 4) == b"last"
    async with asyncio.timeout(LIMIT):
        assert await loop.sock_recv(r.app, 10) == b""  # then the end of data


@under_uvloop
async def test_a_refusal_waits_for_the_answers_owed_before_it(r: Rig) -> None:
    smuggle = b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    await r.send(r.caller, b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n" + smuggle)
    assert await r.recv_until(r.app, b"\r\n\r\n") == b"GET /a HTTP/1.1\r\nHost: a\r\n" + LINE + b"\r\n\r\n"
    await r.until(lambda: ("refused", ("ambiguous_length", False)) in r.driver.events)
    assert not r.caller_reading()
    await r.send(r.app, OK)  # the answer owed to /a goes out first, then the refusal's
    answer = OK + b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    assert await r.recv(r.caller, len(answer) + 1) == answer  # and the end of data
    assert ("refused", ("ambiguous_length", True)) in r.driver.events
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(LIMIT):
        assert await loop.sock_recv(r.app, 10) == b""  # the app got nothing of the refused request


@under_uvloop
async def test_a_cut_request_resets_the_app(r: Rig) -> None:
    await r.send(r.caller, b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\nZZ\r\n")
    await r.until(lambda: ("refused", ("bad_chunk", True)) in r.driver.events)
    loop = asyncio.get_running_loop()
    received = b""
    async with asyncio.timeout(LIMIT):
        try:
            while chunk := await loop.sock_recv(r.app, 65536):
                received += chunk
            raise AssertionError("the app got a FIN, not a reset")
        except ConnectionResetError:
            pass
    assert b"ZZ" not in received
    assert await r.recv(r.caller, 100) == b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


@under_uvloop
async def test_a_slow_app_pauses_the_caller_and_a_fast_one_resumes_it(r: Rig) -> None:
    head = b"POST /big HTTP/1.1\r\nHost: a\r\nContent-Length: 1000000000\r\n\r\n"
    await r.send(r.caller, head)
    chunk, sent = b"x" * 65536, 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + LIMIT
    while r.caller_reading():  # the app reads nothing: its leg's buffer fills, the caller's leg stops
        assert loop.time() < deadline, "the caller's leg never stopped reading"
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(r.send(r.caller, chunk), 0.5)
            sent += len(chunk)
    assert r.app_leg.transport is not None
    assert r.app_leg.transport.get_write_buffer_size() <= 1024 * 1024
    expected = head[:-2] + LINE + b"\r\n\r\n" + chunk * (sent // len(chunk))
    assert await r.recv(r.app, len(expected)) == expected  # reading resumes, nothing lost
    await r.until(r.caller_reading)
