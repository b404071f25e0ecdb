"""The transparent outbound route table: which route, if any, a captured connection's original
destination takes (contract section 8, ``transparent.outbound.routes``).

First match wins, in config order. IP and CIDR routes are fixed; a host-name route matches the
addresses its name resolves to. Names are resolved off the event loop (``loop.getaddrinfo``, which
runs in the default executor) before the first lookup and every ``REFRESH_INTERVAL`` seconds after;
a failed or timed-out resolution keeps the last good addresses. A lookup parses the address once
and scans integer ranges built at each refresh: no ``ipaddress`` containment checks, no awaiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

from .config import Route

log = logging.getLogger("sidecar.routes")

# Envoy's default DNS refresh rate for STRICT_DNS clusters. Between a peer's address changing and the
# next refresh, the app's connections to the new address match no host-name route (so `unmatched`
# applies to them): CIDR routes, or `unmatched: deny`, close that window.
REFRESH_INTERVAL = 5.0
RESOLVE_TIMEOUT = 5.0

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str], Awaitable[Iterable[str]]]


@dataclass(frozen=True)
class _Range:
    first: int
    last: int
    port: int | None
    route: Route


def _ranges(routes: Sequence[Route], resolved: dict[str, tuple[IPAddress, ...]]) -> tuple[tuple[_Range, ...], ...]:
    """The routes as integer ranges, per IP version (index 0: IPv4, 1: IPv6), in config order."""
    by_version: tuple[list[_Range], list[_Range]] = ([], [])
    for route in routes:
        to = route.to
        if to.network is not None:
            net = to.network
            by_version[net.version == 6].append(
                _Range(int(net.network_address), int(net.broadcast_address), to.port, route)
            )
        elif to.host is not None:
            for addr in resolved.get(to.host, ()):
                by_version[addr.version == 6].append(_Range(int(addr), int(addr), to.port, route))
    return tuple(by_version[0]), tuple(by_version[1])


async def resolve_host(host: str) -> list[str]:
    """The addresses ``host`` resolves to, from the system resolver, off the event loop."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos if info[0] in (socket.AF_INET, socket.AF_INET6)]


class RouteTable:
    """The routes of ``transparent.outbound``; ``lookup`` is what a captured connection calls.

    Life cycle: ``await start()`` resolves every host name once, then keeps them fresh in a task it
    owns; ``await aclose()`` cancels that task. Without host-name routes no task is started."""

    def __init__(
        self,
        routes: Sequence[Route],
        *,
        refresh_interval: float = REFRESH_INTERVAL,
        resolve_timeout: float = RESOLVE_TIMEOUT,
        resolver: Resolver = resolve_host,
    ) -> None:
        self.routes = tuple(routes)
        self.hosts = tuple(dict.fromkeys(r.to.host for r in self.routes if r.to.host is not None))
        self.refresh_interval = refresh_interval
        self._resolve_timeout = resolve_timeout
        self._resolver = resolver
        self._resolved: dict[str, tuple[IPAddress, ...]] = {}
        self._by_version = _ranges(self.routes, self._resolved)
        self._task: asyncio.Task[None] | None = None

    def lookup(self, ip: str | IPAddress, port: int) -> Route | None:
        """The first route whose destination holds ``ip`` and ``port``, or None (``unmatched``)."""
        addr = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        n = int(addr)
        for r in self._by_version[addr.version == 6]:
            if r.first <= n <= r.last and (r.port is None or r.port == port):
                return r.route
        return None

    def addresses(self, host: str) -> tuple[str, ...]:
        """What ``host`` resolved to last (empty before the first success), for logs and debugging."""
        return tuple(str(a) for a in self._resolved.get(host, ()))

    async def refresh(self) -> None:
        """Resolve every host name now (concurrently) and swap in the new table at once."""
        if not self.hosts:
            return
        results = await asyncio.gather(*(self._resolve(h) for h in self.hosts))
        resolved = dict(self._resolved)
        for host, addrs in zip(self.hosts, results, strict=True):
            if addrs is not None:
                if addrs != resolved.get(host):
                    log.info(
                        "route host resolved",
                        extra={"fields": {"host": host, "addresses": [str(a) for a in addrs]}},
                    )
                resolved[host] = addrs
        self._resolved = resolved
        self._by_version = _ranges(self.routes, resolved)

    async def _resolve(self, host: str) -> tuple[IPAddress, ...] | None:
        try:
            async with asyncio.timeout(self._resolve_timeout):
                found = await self._resolver(host)
            addrs = tuple(sorted({ipaddress.ip_address(a.partition("%")[0]) for a in found}, key=_sort_key))
        except (OSError, TimeoutError, ValueError) as exc:
            kept = [str(a) for a in self._resolved.get(host, ())]
            log.warning(
                "route host not resolved; keeping the last addresses",
                extra={"fields": {"host": host, "error": str(exc) or type(exc).__name__, "kept": kept}},
            )
            return None
        if not addrs:
            log.warning("route host resolved to no address; keeping the last ones", extra={"fields": {"host": host}})
            return None
        return addrs

    async def start(self) -> None:
        """Resolve once (so the first connection already sees host-name routes), then keep fresh."""
        await self.refresh()
        if self.hosts and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._keep_fresh(), name="route-refresh")

    async def _keep_fresh(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_interval)
            await self.refresh()

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _sort_key(addr: IPAddress) -> tuple[int, int]:
    return addr.version, int(addr)
