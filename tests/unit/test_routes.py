"""Tests for sidecar.routes: first match wins, IPv4 and IPv6, ports and ``*``, host names resolved
by the system resolver (``localhost``) and re-resolved, failures keeping the last good addresses.

The re-resolution tests give the table a resolver whose answers the test changes: the one stand-in
here, for a DNS server whose records a test cannot change on this machine."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

import pytest

from sidecar.config import Route, parse_destination
from sidecar.routes import RouteTable


def route(to: str, sni: str = "x.mesh") -> Route:
    return Route(to=parse_destination(to, "to", names=True, port_required=True), server_identity=None, sni=sni)


def test_first_match_wins_in_config_order() -> None:
    narrow, wide, other_port = route("10.1.2.3:8080", "a"), route("10.0.0.0/8:*", "b"), route("10.1.2.3:9090", "c")
    table = RouteTable([narrow, wide, other_port])
    assert table.lookup("10.1.2.3", 8080) is narrow
    assert table.lookup("10.1.2.3", 9090) is wide  # the wider route is listed first
    assert table.lookup("10.200.0.1", 1) is wide
    assert table.lookup("11.0.0.1", 8080) is None
    reordered = RouteTable([other_port, wide])
    assert reordered.lookup("10.1.2.3", 9090) is other_port


def test_ports_and_any_port() -> None:
    web, any_port = route("192.0.2.0/24:443"), route("198.51.100.7:*")
    table = RouteTable([web, any_port])
    assert table.lookup("192.0.2.200", 443) is web
    assert table.lookup("192.0.2.200", 444) is None
    assert table.lookup("198.51.100.7", 1) is table.lookup("198.51.100.7", 65535) is any_port
    assert table.lookup("198.51.100.8", 1) is None


def test_cidr_edges() -> None:
    r = route("10.1.0.0/16:80")
    table = RouteTable([r])
    assert table.lookup("10.1.0.0", 80) is r and table.lookup("10.1.255.255", 80) is r
    assert table.lookup("10.0.255.255", 80) is None and table.lookup("10.2.0.0", 80) is None


def test_ipv6_routes_and_versions_never_mix() -> None:
    one, net = route("[fd00::2]:8080"), route("[fd00:1::/64]:*")
    everything_v4 = route("0.0.0.0/0:*")
    table = RouteTable([one, net, everything_v4])
    assert table.lookup("fd00::2", 8080) is one
    assert table.lookup("fd00::2", 8081) is None
    assert table.lookup("fd00:1::ffff:1", 22) is net
    assert table.lookup("fd00:2::1", 22) is None
    assert table.lookup("::a00:1", 22) is None  # the IPv6 address whose low bits are 10.0.0.1 is not IPv4
    assert table.lookup("10.0.0.1", 22) is everything_v4


def test_ipv4_mapped_ipv6_addresses_are_looked_up_as_ipv4() -> None:
    r = route("10.0.0.0/8:8080")
    assert RouteTable([r]).lookup("::ffff:10.9.8.7", 8080) is r


def test_bad_address_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        RouteTable([]).lookup("not-an-ip", 80)


async def test_host_names_resolve_with_the_system_resolver() -> None:
    by_name, later = route("localhost:8080"), route("127.0.0.0/8:*")
    table = RouteTable([by_name, later])
    assert table.lookup("127.0.0.1", 8080) is later  # not resolved yet: the name matches nothing
    await table.start()
    try:
        assert table.addresses("localhost") and "127.0.0.1" in table.addresses("localhost")
        assert table.lookup("127.0.0.1", 8080) is by_name
        assert table.lookup("127.0.0.1", 8081) is later
        assert table._task is not None and not table._task.done()
    finally:
        await table.aclose()
    assert table._task is None


async def test_a_name_that_does_not_resolve_matches_nothing_and_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    table = RouteTable([route("no-such-host.invalid:80")])
    with caplog.at_level(logging.WARNING, logger="sidecar.routes"):
        await table.refresh()
    assert table.addresses("no-such-host.invalid") == ()
    assert table.lookup("127.0.0.1", 80) is None
    assert any(r.getMessage().startswith("route host not resolved") for r in caplog.records)


class Records:
    """What the fake DNS answers; ``None`` makes the next answer fail, ``hang`` never answers."""

    def __init__(self) -> None:
        self.answers: dict[str, list[str] | None] = {}
        self.hang = False
        self.calls = 0

    async def resolve(self, host: str) -> Iterable[str]:
        self.calls += 1
        if self.hang:
            await asyncio.sleep(3600)
        answer = self.answers.get(host)
        if answer is None:
            raise OSError(-2, "Name or service not known")
        return answer


async def test_re_resolution_follows_changes_and_failures_keep_the_last_good_answer() -> None:
    dns = Records()
    orders = route("orders.mesh:8080")
    table = RouteTable([orders], resolver=dns.resolve, resolve_timeout=0.2)
    dns.answers["orders.mesh"] = ["10.0.0.1", "fd00::1", "fe80::1%eth0"]
    await table.refresh()
    assert table.addresses("orders.mesh") == ("10.0.0.1", "fd00::1", "fe80::1")
    assert table.lookup("fd00::1", 8080) is orders and table.lookup("fe80::1", 8080) is orders

    dns.answers["orders.mesh"] = ["10.0.0.2"]  # the peer moved
    await table.refresh()
    assert table.lookup("10.0.0.2", 8080) is orders and table.lookup("10.0.0.1", 8080) is None

    dns.answers["orders.mesh"] = None  # the resolver fails: keep what we had
    await table.refresh()
    assert table.lookup("10.0.0.2", 8080) is orders

    dns.hang = True  # the resolver stalls: the refresh gives up after resolve_timeout, table unchanged
    await asyncio.wait_for(table.refresh(), 5)
    assert table.lookup("10.0.0.2", 8080) is orders

    dns.hang, dns.answers["orders.mesh"] = False, []  # an empty answer is treated as a failure too
    await table.refresh()
    assert table.addresses("orders.mesh") == ("10.0.0.2",)


async def test_the_refresher_task_re_resolves_on_its_interval() -> None:
    dns = Records()
    dns.answers["a.mesh"] = ["10.0.0.1"]
    r = route("a.mesh:*")
    table = RouteTable([r, route("a.mesh:80")], resolver=dns.resolve, refresh_interval=0.05)
    await table.start()
    try:
        assert dns.calls == 1  # one name, resolved once however many routes use it
        dns.answers["a.mesh"] = ["10.0.0.9"]
        for _ in range(100):  # within 5 s
            if table.lookup("10.0.0.9", 1) is r:
                break
            await asyncio.sleep(0.05)
        assert table.lookup("10.0.0.9", 1) is r
    finally:
        await table.aclose()


async def test_no_task_without_host_names() -> None:
    table = RouteTable([route("10.0.0.0/8:*")])
    await table.start()
    assert table._task is None
    await table.aclose()
