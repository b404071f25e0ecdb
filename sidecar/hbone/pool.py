"""Which pooled HBONE connection a new stream goes on; when to dial, wait, retire or expire one.

Pure bookkeeping with an injected clock: no sockets, no tasks. Per ``PoolKey`` (upstream, SNI,
expected server identity) it keeps the connections made with the current TLS material: one
connection until it is full, another only past the peer's MAX_CONCURRENT_STREAMS. One dial per
key is in flight at a time, and everyone else who wants that key waits for it, so concurrent
first streams share one handshake. A material reload retires every older connection: no new
stream goes on it, its open streams finish, and it is closed when the last one ends. A failed
dial makes the key back off (exponentially) before the next.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

C = TypeVar("C")


@dataclass(frozen=True)
class PoolKey:
    """Connections are shared only between streams that would verify the upstream the same way."""

    upstream: str  # host:port of the peer's HBONE listener
    sni: str | None
    server_identity: tuple[str, ...] | None  # the patterns as written; None: hostname verification


@dataclass(frozen=True)
class PoolSettings:
    max_streams: int = 100  # per connection; the peer's MAX_CONCURRENT_STREAMS may lower it
    idle_timeout: float = 300.0  # a connection with no stream for this long is closed
    backoff_initial: float = 0.1  # after a failed dial; doubles per failure in a row
    backoff_max: float = 10.0


@dataclass(eq=False)
class Entry(Generic[C]):
    """One pooled connection and its stream count."""

    conn: C
    key: PoolKey
    generation: int  # the TLS material generation it was made with
    max_streams: int
    streams: int = 0
    idle_since: float | None = None
    retiring: bool = False  # no new streams; closed when the last one ends


@dataclass(eq=False)
class Dial:
    """A handshake in flight for ``key``; whoever got ``DialNeeded`` reports how it ended."""

    key: PoolKey
    generation: int
    error: str | None = None


@dataclass(frozen=True)
class Granted(Generic[C]):
    """A stream slot on ``entry`` is reserved: open the stream, and ``release`` it at the end."""

    entry: Entry[C]


@dataclass(frozen=True)
class DialNeeded:
    """Make a connection (TCP, TLS with ALPN h2, identity check), then report it."""

    dial: Dial


@dataclass(frozen=True)
class Wait:
    """Someone else's dial for this key is in flight: wait for it, then ``acquire`` again."""

    dial: Dial


@dataclass(frozen=True)
class Refused:
    """The key is backing off after failed dials; the app connection fails at once."""

    reason: str
    retry_at: float


Acquired = Granted[C] | DialNeeded | Wait | Refused


@dataclass
class _Backoff:
    failures: int
    retry_at: float
    reason: str


@dataclass
class Pool(Generic[C]):
    settings: PoolSettings
    clock: Callable[[], float]
    generation: int = 0
    _entries: dict[PoolKey, list[Entry[C]]] = field(default_factory=dict)
    _dials: dict[PoolKey, Dial] = field(default_factory=dict)
    _backoff: dict[PoolKey, _Backoff] = field(default_factory=dict)

    def acquire(self, key: PoolKey) -> Acquired[C]:
        """A stream slot for ``key``, or what to do to get one."""
        for entry in self._entries.get(key, ()):
            if not entry.retiring and entry.streams < entry.max_streams:
                entry.streams += 1
                entry.idle_since = None
                return Granted(entry)
        dial = self._dials.get(key)
        if dial is not None:
            return Wait(dial)
        backoff = self._backoff.get(key)
        if backoff is not None and self.clock() < backoff.retry_at:
            return Refused(backoff.reason, backoff.retry_at)
        dial = self._dials[key] = Dial(key, self.generation)
        return DialNeeded(dial)

    def dial_succeeded(self, dial: Dial, conn: C, max_streams: int) -> Entry[C] | None:
        """Pool ``conn``; None when the material changed during the dial (close ``conn``)."""
        self._dials.pop(dial.key, None)
        self._backoff.pop(dial.key, None)
        if dial.generation != self.generation:
            return None
        entry = Entry(conn, dial.key, dial.generation, self._cap(max_streams), idle_since=self.clock())
        self._entries.setdefault(dial.key, []).append(entry)
        return entry

    def dial_failed(self, dial: Dial, reason: str) -> float:
        """Back off this key; returns when the next dial may start."""
        self._dials.pop(dial.key, None)
        dial.error = reason
        failures = self._backoff[dial.key].failures + 1 if dial.key in self._backoff else 1
        delay = min(self.settings.backoff_max, self.settings.backoff_initial * 2.0 ** min(failures - 1, 30))
        retry_at = self.clock() + delay
        self._backoff[dial.key] = _Backoff(failures, retry_at, reason)
        return retry_at

    def dial_abandoned(self, dial: Dial) -> None:
        """The dialer gave up for its own reasons (cancelled): no backoff, the next may dial."""
        if self._dials.get(dial.key) is dial:
            del self._dials[dial.key]

    def release(self, entry: Entry[C]) -> bool:
        """A stream on ``entry`` ended; True: the connection is done, close it now."""
        entry.streams -= 1
        if entry.streams > 0:
            return False
        if entry.retiring:
            self._remove(entry)
            return True
        entry.idle_since = self.clock()
        return False

    def peer_settings(self, entry: Entry[C], max_streams: int) -> None:
        entry.max_streams = self._cap(max_streams)

    def retire(self, entry: Entry[C]) -> bool:
        """No new streams on ``entry`` (the peer sent GOAWAY); True: close it now."""
        entry.retiring = True
        if entry.streams == 0:
            self._remove(entry)
            return True
        return False

    def lost(self, entry: Entry[C]) -> None:
        """The connection died; its streams were reset with it."""
        self._remove(entry)

    def material_changed(self, generation: int) -> list[Entry[C]]:
        """New TLS material: every older connection retires. Returns those to close now."""
        self.generation = generation
        self._dials.clear()  # a dial under the old material is pooled by nobody
        self._backoff.clear()  # new material may be what the failures needed
        return self.retire_all()

    def retire_all(self) -> list[Entry[C]]:
        """Every connection retires; returns those to close now (no stream open)."""
        return [e for entries in list(self._entries.values()) for e in list(entries) if self.retire(e)]

    def expire(self) -> list[Entry[C]]:
        """Connections idle past ``idle_timeout``, removed from the pool: close them."""
        deadline = self.clock() - self.settings.idle_timeout
        idle = [e for entries in self._entries.values() for e in entries if e.idle_since is not None]
        expired = [e for e in idle if e.idle_since is not None and e.idle_since <= deadline]
        for entry in expired:
            self._remove(entry)
        return expired

    def next_expiry(self) -> float | None:
        """When ``expire`` next has something to do, if ever."""
        times = [e.idle_since for entries in self._entries.values() for e in entries if e.idle_since is not None]
        return min(times) + self.settings.idle_timeout if times else None

    def clear(self) -> list[Entry[C]]:
        """Shutting down: every pooled connection, removed from the pool: close them."""
        entries = [e for entries in self._entries.values() for e in entries]
        self._entries.clear()
        self._dials.clear()
        return entries

    def empty(self) -> bool:
        """No connection pooled and no dial in flight."""
        return not self._entries and not self._dials

    def connections(self) -> int:
        """Pooled connections, retiring ones included: the pool gauge."""
        return sum(len(entries) for entries in self._entries.values())

    def _cap(self, peer_max: int) -> int:
        return max(0, min(self.settings.max_streams, peer_max))

    def _remove(self, entry: Entry[C]) -> None:
        entries = self._entries.get(entry.key, [])
        if entry in entries:
            entries.remove(entry)
        if not entries:
            self._entries.pop(entry.key, None)
