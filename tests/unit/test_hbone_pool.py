"""The HBONE pool's decisions with an injected clock, and its asyncio face sharing one dial."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.hbone import HboneClient, HboneServer
from sidecar.hbone.checkout import Checkout, PoolRefused
from sidecar.hbone.pool import DialNeeded, Entry, Granted, Pool, PoolKey, PoolSettings, Refused, Wait
from tests.support import TunnelWire

KEY = PoolKey("orders.mesh.local:15008", None, ("spiffe://mesh.local/orders",))
OTHER = PoolKey("orders.mesh.local:15008", None, ("spiffe://mesh.local/billing",))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def pool(**settings: float) -> tuple[Pool[str], Clock]:
    clock = Clock()
    return Pool(PoolSettings(**settings), clock), clock  # type: ignore[arg-type]


def connect(p: Pool[str], key: PoolKey = KEY, name: str = "c1", max_streams: int = 100) -> Entry[str]:
    got = p.acquire(key)
    assert isinstance(got, DialNeeded)
    entry = p.dial_succeeded(got.dial, name, max_streams)
    assert entry is not None
    return entry


def granted(p: Pool[str], key: PoolKey = KEY) -> Entry[str]:
    got = p.acquire(key)
    assert isinstance(got, Granted), got
    return got.entry


def test_concurrent_first_streams_share_one_dial() -> None:
    p, _ = pool()
    first = p.acquire(KEY)
    assert isinstance(first, DialNeeded)
    others = [p.acquire(KEY) for _ in range(20)]
    assert all(isinstance(o, Wait) and o.dial is first.dial for o in others)
    p.dial_succeeded(first.dial, "c1", 100)
    entries = {granted(p).conn for _ in range(21)}
    assert entries == {"c1"} and p.connections() == 1


def test_a_second_connection_only_past_the_peers_stream_limit() -> None:
    p, _ = pool()
    entry = connect(p, max_streams=3)
    for _ in range(3):
        assert granted(p) is entry
    assert isinstance(p.acquire(KEY), DialNeeded)  # full: now, and only now, another


def test_our_own_cap_and_a_lowered_peer_limit() -> None:
    p, _ = pool(max_streams=2)
    entry = connect(p, max_streams=1000)
    assert entry.max_streams == 2
    p.peer_settings(entry, 1)
    granted(p)
    assert isinstance(p.acquire(KEY), DialNeeded)


def test_keys_do_not_share_connections() -> None:
    p, _ = pool()
    connect(p, KEY, "c1")
    assert isinstance(p.acquire(OTHER), DialNeeded)  # other expected identity: its own connection


def test_failed_dials_back_off_exponentially_and_recover() -> None:
    p, clock = pool(backoff_initial=0.1, backoff_max=1.0)
    delays = []
    for _ in range(6):
        got = p.acquire(KEY)
        assert isinstance(got, DialNeeded)
        retry_at = p.dial_failed(got.dial, "connection refused")
        delays.append(round(retry_at - clock.now, 3))
        refused = p.acquire(KEY)
        assert isinstance(refused, Refused) and refused.reason == "connection refused"
        clock.now = retry_at
    assert delays == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    entry = connect(p)  # the peer is back: the next dial pools, the backoff is forgotten
    got = p.acquire(KEY)
    assert isinstance(got, Granted) and got.entry is entry


def test_waiters_of_a_failed_dial_meet_the_backoff() -> None:
    p, _ = pool()
    first = p.acquire(KEY)
    waiter = p.acquire(KEY)
    assert isinstance(first, DialNeeded) and isinstance(waiter, Wait)
    p.dial_failed(first.dial, "handshake failed: untrusted")
    assert waiter.dial.error == "handshake failed: untrusted"
    assert isinstance(p.acquire(KEY), Refused)


def test_a_reload_retires_old_connections_and_live_streams_finish() -> None:
    p, _ = pool()
    old = connect(p, name="old")
    busy = granted(p)
    assert busy is old
    idle = connect(p, OTHER, name="idle")
    to_close = p.material_changed(1)
    assert to_close == [idle]  # nothing on it: closed at once
    assert old.retiring and p.connections() == 1
    got = p.acquire(KEY)
    assert isinstance(got, DialNeeded) and got.dial.generation == 1  # new streams: new material
    new = p.dial_succeeded(got.dial, "new", 100)
    assert new is not None and granted(p) is new
    assert p.release(old) is True  # its last stream ended: close it now
    assert p.connections() == 1


def test_a_dial_under_old_material_is_not_pooled() -> None:
    p, _ = pool()
    got = p.acquire(KEY)
    assert isinstance(got, DialNeeded)
    p.material_changed(7)
    assert p.dial_succeeded(got.dial, "stale", 100) is None
    assert p.connections() == 0
    assert isinstance(p.acquire(KEY), DialNeeded)


def test_goaway_retires_and_idle_connections_expire() -> None:
    p, clock = pool(idle_timeout=60.0)
    entry = connect(p)
    granted(p)
    assert p.retire(entry) is False  # a stream is still on it
    assert isinstance(p.acquire(KEY), DialNeeded)
    assert p.release(entry) is True
    p2, clock2 = pool(idle_timeout=60.0)
    e2 = connect(p2)
    granted(p2)
    p2.release(e2)
    assert p2.next_expiry() == clock2.now + 60.0
    clock2.now += 59.0
    assert p2.expire() == []
    granted(p2)  # used again: no longer idle
    clock2.now += 120.0
    assert p2.expire() == []
    p2.release(e2)
    clock2.now += 60.0
    assert p2.expire() == [e2] and p2.connections() == 0
    assert clock.now == 1000.0


def test_retire_all_closes_the_idle_now_and_the_busy_with_their_last_stream_and_empty_says_when_done() -> None:
    p, _ = pool()
    assert p.empty()
    busy = connect(p, name="busy")
    granted(p)
    idle = connect(p, OTHER, name="idle")
    assert not p.empty()
    assert p.retire_all() == [idle]
    assert busy.retiring and not p.empty()
    assert p.release(busy) is True and p.empty()
    got = p.acquire(KEY)  # asked again after all: a dial of its own, and no longer empty meanwhile
    assert isinstance(got, DialNeeded) and not p.empty()
    p.dial_abandoned(got.dial)
    assert p.empty()


# -- the asyncio face, with real connection objects -------------------------------------------


async def test_checkout_shares_one_handshake_among_concurrent_streams() -> None:
    p: Pool[TunnelWire] = Pool(PoolSettings(), asyncio.get_running_loop().time)
    checkout = Checkout(p, close=lambda w: None)
    dials = 0

    async def dial() -> tuple[TunnelWire, int]:
        nonlocal dials
        dials += 1
        await asyncio.sleep(0.01)  # the handshake takes a while; everyone else arrives meanwhile
        server = HboneServer(now=0)
        w = TunnelWire(HboneClient(now=0.0), server)
        w.pump()
        return w, w.client.peer_max_streams

    entries = await asyncio.gather(*(checkout.acquire(KEY, dial) for _ in range(30)))
    assert dials == 1 and len({id(e) for e in entries}) == 1 and entries[0].streams == 30
    w = entries[0].conn
    ids = [w.client.open_stream("10.0.0.1:80") for _ in range(30)]
    w.pump()
    assert len(ids) == 30 and w.server.open_streams == 30


async def test_checkout_failure_reaches_every_waiter_and_then_backs_off() -> None:
    p: Pool[str] = Pool(PoolSettings(backoff_initial=5.0), asyncio.get_running_loop().time)
    checkout = Checkout(p, close=lambda c: None)

    async def dial() -> tuple[str, int]:
        await asyncio.sleep(0.01)
        raise ConnectionRefusedError("connection refused")

    results = await asyncio.gather(*(checkout.acquire(KEY, dial) for _ in range(5)), return_exceptions=True)
    assert isinstance(results[0], ConnectionRefusedError)
    assert all(isinstance(r, PoolRefused) and "connection refused" in str(r) for r in results[1:])
    with pytest.raises(PoolRefused):
        await checkout.acquire(KEY, dial)


async def test_a_cancelled_dial_lets_a_waiter_dial_instead() -> None:
    p: Pool[str] = Pool(PoolSettings(), asyncio.get_running_loop().time)
    checkout = Checkout(p, close=lambda c: None)
    started = asyncio.Event()

    async def slow() -> tuple[str, int]:
        started.set()
        await asyncio.sleep(30)
        return "never", 100

    async def fast() -> tuple[str, int]:
        return "c2", 100

    first = asyncio.create_task(checkout.acquire(KEY, slow))
    await started.wait()
    second = asyncio.create_task(checkout.acquire(KEY, fast))
    await asyncio.sleep(0)
    first.cancel()
    entry = await asyncio.wait_for(second, 5)
    assert entry.conn == "c2"
