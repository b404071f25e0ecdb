"""Awaiting a stream slot from the pool: one future per dial in flight, shared by its waiters.

The asyncio face of ``pool.Pool``: ``acquire`` returns a pooled connection with a slot reserved,
dialling through the given coroutine only when the pool says so. A dial that fails or is
cancelled wakes its waiters, who ask the pool again (and meet the backoff, or dial themselves).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic

from .pool import C, Dial, DialNeeded, Entry, Granted, Pool, PoolKey, Refused, Wait


class PoolRefused(ConnectionError):
    """The upstream is backing off after failed dials; the message says the last failure."""


class Checkout(Generic[C]):
    def __init__(self, pool: Pool[C], close: Callable[[C], None]) -> None:
        self.pool = pool
        self._close = close  # for a connection finished after the material changed
        self._waiting: dict[Dial, asyncio.Future[None]] = {}

    async def acquire(self, key: PoolKey, dial: Callable[[], Awaitable[tuple[C, int]]]) -> Entry[C]:
        """A connection for ``key`` with a stream slot reserved; ``dial`` makes one and returns
        it with the peer's MAX_CONCURRENT_STREAMS. Raises ``PoolRefused`` or what ``dial`` raised."""
        while True:
            got = self.pool.acquire(key)
            if isinstance(got, Granted):
                return got.entry
            if isinstance(got, Refused):
                raise PoolRefused(f"backing off after a failed dial: {got.reason}")
            if isinstance(got, Wait):
                await asyncio.shield(self._future(got.dial))
                continue
            await self._dial(got, dial)

    async def _dial(self, got: DialNeeded, dial: Callable[[], Awaitable[tuple[C, int]]]) -> None:
        done = self._future(got.dial)
        try:
            conn, max_streams = await dial()
        except asyncio.CancelledError:
            self.pool.dial_abandoned(got.dial)
            raise
        except Exception as exc:
            self.pool.dial_failed(got.dial, str(exc) or type(exc).__name__)
            raise
        else:
            if self.pool.dial_succeeded(got.dial, conn, max_streams) is None:
                self._close(conn)
        finally:
            self._waiting.pop(got.dial, None)
            if not done.done():
                done.set_result(None)

    def _future(self, dial: Dial) -> asyncio.Future[None]:
        future = self._waiting.get(dial)
        if future is None:
            future = self._waiting[dial] = asyncio.get_running_loop().create_future()
        return future
