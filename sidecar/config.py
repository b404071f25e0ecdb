"""Configuration: YAML in, typed frozen objects out, validated once before anything listens.

Rules of this module: every error is a ``ConfigError`` whose message starts with the YAML path of
the offending key (``inbound[0].allow[2]``); unknown keys are errors; nothing here opens a socket
or reads a certificate (``sidecar check`` and the TLS owner do that).
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .identity import Pattern, parse_pattern
from .proxy_protocol import Mode as ProxyProtocolMode

DEFAULT_CONFIG = Path("config/sidecar.yaml")
MAX_WORKERS = 64
UNIX_PATH_MAX = 107  # sun_path holds 108 bytes, the last one a NUL
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_HOST_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")
TRANSPARENT_INBOUND = "transparent-inbound"  # the listener label of transparent inbound capture
MAX_UID = 2**32 - 2  # (uid_t)-1 means "no uid" to the kernel


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class TLSFiles:
    """The ``tls`` section: the watched files, and whether TLS 1.3 sessions may be resumed."""

    cert: Path
    key: Path
    ca: Path
    crl: Path | None = None
    session_resumption: bool = True
    session_lifetime: float = 3600.0

    def paths(self) -> tuple[Path, ...]:
        return tuple(p for p in (self.cert, self.key, self.ca, self.crl) if p is not None)


@dataclass(frozen=True)
class TLSWorkloadAPI:
    """The ``tls`` section with ``workload_api``: identity and trust streamed by a SPIFFE agent."""

    address: str  # as written: ``unix:///run/spire/sockets/agent.sock``
    socket: Path  # the unix socket it names
    session_resumption: bool = True
    session_lifetime: float = 3600.0

    def paths(self) -> tuple[Path, ...]:
        return ()  # nothing on disk to watch: the agent pushes every change


TLSSettings = TLSFiles | TLSWorkloadAPI


@dataclass(frozen=True)
class Inbound:
    name: str
    listen: Address
    forward: Address
    allow: tuple[Pattern, ...]
    proxy_protocol: ProxyProtocolMode | None = None  # contract section 9: a PROXY v2 header first
    client_cert_header: str | None = None  # "xfcc": each HTTP/1.x request gets x-forwarded-client-cert


@dataclass(frozen=True)
class Tunnel:
    """``outbound[].tunnel`` or ``transparent.outbound.routes[].tunnel``: each app connection
    becomes a CONNECT stream on a pooled connection to the upstream's HBONE listener (contract
    section 11)."""

    protocol: str  # only "hbone"
    target_port: int | None  # the port CONNECT asks for; outbound listeners only (a route's is the original one)
    max_streams: int = 100  # per pooled connection; the peer's MAX_CONCURRENT_STREAMS may lower it
    idle_timeout: float = 300.0  # a pooled connection without streams for this long is closed


@dataclass(frozen=True)
class Outbound:
    name: str
    listen: Address
    upstream: Address
    server_identity: tuple[Pattern, ...] | None
    sni: str | None
    tunnel: Tunnel | None = None


@dataclass(frozen=True)
class HbonePort:
    """One CONNECT target of the ``hbone`` listener: ``127.0.0.1:port``, for whom."""

    port: int
    allow: tuple[Pattern, ...]


@dataclass(frozen=True)
class Hbone:
    """The ``hbone`` section: accept HTTP/2 CONNECT streams over mTLS (ALPN h2)."""

    listen: Address
    ports: tuple[HbonePort, ...]
    name: str = "hbone"


@dataclass(frozen=True)
class Admin:
    listen: Address


@dataclass(frozen=True)
class Limits:
    handshake_timeout: float = 10.0
    connect_timeout: float = 5.0
    idle_timeout: float = 300.0
    max_connections: int = 10000
    drain_timeout: float = 15.0


@dataclass(frozen=True)
class Log:
    level: str = "info"
    format: str = "json"


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Destination:
    """A route's ``to`` or an ``exclude`` entry: a network (an IP is a /32 or /128) or a host name,
    and one port or any port (``None``, written ``*``)."""

    network: Network | None
    host: str | None
    port: int | None

    def __str__(self) -> str:
        where = self.host if self.host is not None else str(self.network)
        if self.network is not None and self.network.version == 6:
            where = f"[{where}]"
        return f"{where}:{'*' if self.port is None else self.port}"


@dataclass(frozen=True)
class Route:
    """One ``transparent.outbound.routes`` entry: where it applies and who must answer there."""

    to: Destination
    server_identity: tuple[Pattern, ...] | None  # None: hostname verification of ``server_name``
    sni: str | None
    tunnel: Tunnel | None = None  # CONNECT <original destination> to port 15008 of its address

    @property
    def server_name(self) -> str | None:
        """The name sent as SNI and, without ``server_identity``, verified: ``sni``, else the host
        name of ``to`` (an IP or CIDR route without either has ``server_identity``, by validation)."""
        return self.sni if self.sni is not None else self.to.host


class Unmatched(StrEnum):
    """What transparent outbound does with a destination no route matches."""

    PASSTHROUGH = "passthrough"  # plain TCP to the original destination
    DENY = "deny"  # close the app's connection


class InboundMode(StrEnum):
    STRICT = "strict"  # mTLS only
    PERMISSIVE = "permissive"  # a connection that does not open with a TLS ClientHello reaches the app as is


@dataclass(frozen=True)
class TransparentOutbound:
    listen: Address
    routes: tuple[Route, ...] = ()
    unmatched: Unmatched = Unmatched.PASSTHROUGH
    exclude: tuple[Destination, ...] = ()  # networks only (never host names); never captured


@dataclass(frozen=True)
class TransparentPort:
    """One captured app port: after mTLS and ``allow``, forwarded to ``127.0.0.1:<port>``, telling
    the app who is calling as an inbound listener does (contract section 9)."""

    port: int
    allow: tuple[Pattern, ...]
    proxy_protocol: ProxyProtocolMode | None = None
    client_cert_header: str | None = None


@dataclass(frozen=True)
class TransparentInbound:
    listen: Address
    ports: tuple[TransparentPort, ...]
    mode: InboundMode = InboundMode.STRICT

    def port(self, number: int) -> TransparentPort | None:
        """The entry for an original destination port, or None when that port is not captured."""
        return next((p for p in self.ports if p.port == number), None)


@dataclass(frozen=True)
class Transparent:
    """The ``transparent`` section (contract section 8); ``sidecar iptables`` turns it into rules."""

    uid: int
    outbound: TransparentOutbound | None = None
    inbound: TransparentInbound | None = None


@dataclass(frozen=True)
class Config:
    tls: TLSSettings
    inbound: tuple[Inbound, ...] = ()
    outbound: tuple[Outbound, ...] = ()
    admin: Admin | None = None
    hbone: Hbone | None = None
    limits: Limits = field(default_factory=Limits)
    log: Log = field(default_factory=Log)
    workers: int = 1  # processes serving the listeners; ``auto`` in YAML is the number of cores
    path: Path | None = None  # the file it was loaded from
    transparent: Transparent | None = None

    def tls_servers(self) -> tuple[str, ...]:
        """The listeners that terminate TLS: each gets a server context (and sessions) of its own."""
        names = [i.name for i in self.inbound]
        if self.transparent is not None and self.transparent.inbound is not None:
            names.append(TRANSPARENT_INBOUND)
        return tuple(names)


def resolve_path(explicit: str | None) -> Path:
    """The config file to use: ``-c``, else ``$SIDECAR_CONFIG``, else ``config/sidecar.yaml``."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("SIDECAR_CONFIG")
    return Path(env) if env else DEFAULT_CONFIG


def load(path: Path) -> Config:
    """Read and validate ``path``; relative file names inside it resolve against its folder."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"config file '{path}': {exc.strerror or exc}") from None
    return loads(raw, base_dir=path.parent, path=path)


def loads(raw: bytes, *, base_dir: Path, path: Path | None = None) -> Config:
    """``load`` without the disk: the bytes of a config file (the fuzzer's entry point)."""
    source = f"config file '{path}'" if path is not None else "config"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: not UTF-8 text (a bad byte at offset {exc.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(f"{source}: not valid YAML{where}: {_one_line(problem)}") from None
    except ValueError as exc:  # a value YAML parsed but Python could not build, e.g. the date 2001-13-01
        raise ConfigError(f"{source}: not valid YAML: {_one_line(str(exc))}") from None
    except RecursionError:
        raise ConfigError(f"{source}: not valid YAML: nested too deeply") from None
    return parse(data, base_dir=base_dir, path=path)


def parse(data: Any, *, base_dir: Path, path: Path | None = None) -> Config:
    top = _mapping(
        data,
        "",
        required={"tls"},
        optional={"inbound", "outbound", "admin", "hbone", "limits", "log", "workers", "transparent"},
    )
    cfg = Config(
        tls=_tls(top["tls"], "tls", base_dir),
        inbound=tuple(_inbound(v, f"inbound[{i}]") for i, v in enumerate(_list(top.get("inbound", []), "inbound"))),
        outbound=tuple(
            _outbound(v, f"outbound[{i}]") for i, v in enumerate(_list(top.get("outbound", []), "outbound"))
        ),
        admin=_admin(top["admin"], "admin") if top.get("admin") is not None else None,
        hbone=_hbone(top["hbone"], "hbone") if top.get("hbone") is not None else None,
        limits=_limits(top.get("limits") or {}, "limits"),
        log=_log(top.get("log") or {}, "log"),
        workers=_workers(top.get("workers", 1), "workers"),
        path=path,
        transparent=_transparent(top["transparent"], "transparent") if top.get("transparent") is not None else None,
    )
    if not cfg.inbound and not cfg.outbound and cfg.hbone is None and cfg.transparent is None:
        raise ConfigError("inbound/outbound/hbone: at least one listener is required (or a transparent section)")
    _check_unique_names(cfg)
    if cfg.transparent is not None:
        _check_transparent_ports(cfg.transparent, cfg.admin)
    return cfg


def parse_duration(value: Any, where: str) -> float:
    """``10s``, ``250ms``, ``5m``, ``1h`` (or a bare number of seconds) to seconds."""
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected a duration like 10s, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value).strip())
        if not match:
            raise ConfigError(f"{where}: expected a duration like 250ms, 10s, 5m or 1h, got {value!r}")
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds < 0:
        raise ConfigError(f"{where}: must not be negative")
    if not math.isfinite(seconds):
        raise ConfigError(f"{where}: must be a finite duration, got {value!r}")
    return seconds


def parse_address(value: Any, where: str) -> Address:
    """``host:port`` or ``[v6]:port``; port 0 asks the kernel for a free port."""
    if not isinstance(value, str):
        raise ConfigError(f'{where}: expected "host:port", got {value!r}')
    text = value.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ConfigError(f'{where}: expected "[ipv6]:port", got {value!r}')
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"{where}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port = text.rpartition(":")
        if not sep or not host:
            raise ConfigError(f'{where}: expected "host:port", got {value!r}')
        if ":" in host:
            raise ConfigError(f"{where}: write IPv6 addresses in brackets, as [::1]:8443, got {value!r}")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{where}: port must be a number from 0 to 65535, got {port!r}")
    return Address(host, int(port))


# -- sections ---------------------------------------------------------------------------------


_SESSION_KEYS = frozenset({"session_resumption", "session_lifetime"})
_FILE_KEYS = ("cert", "key", "ca", "crl")


def _tls(value: Any, where: str, base_dir: Path) -> TLSSettings:
    if isinstance(value, Mapping) and "workload_api" in value:
        return _tls_workload_api(value, where)
    m = _mapping(value, where, required={"cert", "key", "ca"}, optional={"crl", *_SESSION_KEYS})

    def path(key: str) -> Path:
        raw = m[key]
        if not isinstance(raw, str) or not raw.strip() or "\0" in raw:
            raise ConfigError(f"{where}.{key}: expected a file path, got {raw!r}")
        try:
            p = Path(raw).expanduser()
        except RuntimeError:  # "~user" of a user this machine does not know
            raise ConfigError(f"{where}.{key}: cannot expand the home folder in {raw!r}") from None
        return p if p.is_absolute() else base_dir / p

    resumption, lifetime = _sessions(m, where)
    return TLSFiles(
        cert=path("cert"),
        key=path("key"),
        ca=path("ca"),
        crl=path("crl") if m.get("crl") is not None else None,
        session_resumption=resumption,
        session_lifetime=lifetime,
    )


def _tls_workload_api(value: Mapping[str, Any], where: str) -> TLSWorkloadAPI:
    both = [f"{where}.{key}" for key in _FILE_KEYS if key in value]
    if both:
        raise ConfigError(
            f"{where}.workload_api: cannot be combined with {', '.join(both)} "
            "(certificates come from the Workload API or from files, not both)"
        )
    m = _mapping(value, where, required={"workload_api"}, optional=_SESSION_KEYS)
    address = m["workload_api"]
    resumption, lifetime = _sessions(m, where)
    return TLSWorkloadAPI(
        address=address,
        socket=parse_unix_address(address, f"{where}.workload_api"),
        session_resumption=resumption,
        session_lifetime=lifetime,
    )


def _sessions(m: Mapping[str, Any], where: str) -> tuple[bool, float]:
    resumption = m.get("session_resumption", True)
    if not isinstance(resumption, bool):
        raise ConfigError(f"{where}.session_resumption: expected true or false, got {resumption!r}")
    lifetime = parse_duration(m.get("session_lifetime", "1h"), f"{where}.session_lifetime")
    if lifetime <= 0 or lifetime > 7 * 86400:
        raise ConfigError(f"{where}.session_lifetime: must be more than 0 and at most 7 days (RFC 8446 4.6.1)")
    return resumption, lifetime


def parse_unix_address(value: Any, where: str) -> Path:
    """``unix:///absolute/path`` to the socket's path; nothing else (no TCP, no relative path)."""
    if not isinstance(value, str) or not value.startswith("unix://"):
        raise ConfigError(f'{where}: expected "unix:///path/to/agent.sock", got {value!r}')
    raw = value.removeprefix("unix://")
    if not raw.startswith("/"):
        raise ConfigError(f'{where}: the socket path must be absolute ("unix:///path", three slashes), got {value!r}')
    if "\0" in raw or raw.endswith("/"):
        raise ConfigError(f"{where}: not a socket path: {value!r}")
    if len(raw.encode()) > UNIX_PATH_MAX:
        raise ConfigError(f"{where}: socket path longer than {UNIX_PATH_MAX} bytes, the limit of a unix socket")
    return Path(raw)


def _inbound(value: Any, where: str) -> Inbound:
    m = _mapping(value, where, required={"name", "listen", "forward", "allow"}, optional=_CALLER_IDENTITY_KEYS)
    allow = _list(m["allow"], f"{where}.allow")
    if not allow:
        raise ConfigError(f'{where}.allow: must list at least one identity (write "*" to allow any verified peer)')
    return Inbound(
        name=_name(m["name"], f"{where}.name"),
        listen=parse_address(m["listen"], f"{where}.listen"),
        forward=_dialable(m["forward"], f"{where}.forward"),
        allow=tuple(_pattern(p, f"{where}.allow[{i}]") for i, p in enumerate(allow)),
        **_caller_identity(m, where),
    )


def _caller_identity(m: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``proxy_protocol`` and ``client_cert_header`` (contract section 9), for any inbound place."""
    out: dict[str, Any] = {}
    if m.get("proxy_protocol") is not None:
        modes = tuple(mode.value for mode in ProxyProtocolMode)
        out["proxy_protocol"] = ProxyProtocolMode(_choice(m["proxy_protocol"], f"{where}.proxy_protocol", modes))
    if m.get("client_cert_header") is not None:
        out["client_cert_header"] = _choice(m["client_cert_header"], f"{where}.client_cert_header", ("xfcc",))
    return out


def _outbound(value: Any, where: str) -> Outbound:
    m = _mapping(value, where, required={"name", "listen", "upstream"}, optional={"server_identity", "sni", "tunnel"})
    upstream = _dialable(m["upstream"], f"{where}.upstream")
    server_identity, sni = _server_check(m, where, "upstream", named=not is_ip(upstream.host))
    return Outbound(
        name=_name(m["name"], f"{where}.name"),
        listen=parse_address(m["listen"], f"{where}.listen"),
        upstream=upstream,
        server_identity=server_identity,
        sni=sni,
        tunnel=_tunnel(m["tunnel"], f"{where}.tunnel", route=False) if m.get("tunnel") is not None else None,
    )


def _server_check(
    m: Mapping[str, Any], where: str, target: str, *, named: bool
) -> tuple[tuple[Pattern, ...] | None, str | None]:
    """``server_identity`` and ``sni`` of an outbound listener or a transparent route. Without
    ``server_identity`` the upstream's host name is verified, so an unnamed ``target`` needs one of them."""
    server_identity: tuple[Pattern, ...] | None = None
    if m.get("server_identity") is not None:
        items = _list(m["server_identity"], f"{where}.server_identity")
        if not items:
            raise ConfigError(f"{where}.server_identity: must not be empty (omit it for hostname verification)")
        server_identity = tuple(_pattern(p, f"{where}.server_identity[{i}]") for i, p in enumerate(items))
    sni = m.get("sni")
    if sni is not None and (not isinstance(sni, str) or not sni.strip()):
        raise ConfigError(f"{where}.sni: expected a host name, got {sni!r}")
    if server_identity is None and not named and sni is None:
        raise ConfigError(
            f"{where}.server_identity: required when {target} is an IP address "
            "(hostname verification needs a name; or set sni to the name the upstream's cert carries)"
        )
    return server_identity, sni.strip() if isinstance(sni, str) else None


def _tunnel(value: Any, where: str, *, route: bool) -> Tunnel:
    """An outbound listener's tunnel names the port it CONNECTs to; a transparent route's does not
    (the original destination's port is the target)."""
    example = "{protocol: hbone}" if route else "{protocol: hbone, target_port: 8080}"
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping like {example}, got {value!r}")
    if route and "target_port" in value:
        raise ConfigError(f"{where}.target_port: not on a route: CONNECT asks for the original destination's port")
    required = {"protocol"} if route else {"protocol", "target_port"}
    m = _mapping(value, where, required=required, optional={"max_streams", "idle_timeout"})
    protocol = _choice(m["protocol"], f"{where}.protocol", ("hbone",))
    d = Tunnel(protocol, None)
    idle = parse_duration(m.get("idle_timeout", d.idle_timeout), f"{where}.idle_timeout")
    if idle == 0:
        raise ConfigError(f"{where}.idle_timeout: must be greater than 0")
    return Tunnel(
        protocol=protocol,
        target_port=None if route else _port(m["target_port"], f"{where}.target_port"),
        max_streams=_whole(m.get("max_streams", d.max_streams), f"{where}.max_streams", 1, 1000),
        idle_timeout=idle,
    )


def _hbone(value: Any, where: str) -> Hbone:
    m = _mapping(value, where, required={"listen", "ports"}, optional={"name"})
    items = _list(m["ports"], f"{where}.ports")
    if not items:
        raise ConfigError(f"{where}.ports: must list at least one port peers may reach")
    ports: dict[int, str] = {}
    parsed = []
    for i, item in enumerate(items):
        at = f"{where}.ports[{i}]"
        pm = _mapping(item, at, required={"port", "allow"})
        port = _port(pm["port"], f"{at}.port")
        if port in ports:
            raise ConfigError(f"{at}.port: {port} is already listed at {ports[port]}")
        ports[port] = at
        allow = _list(pm["allow"], f"{at}.allow")
        if not allow:
            raise ConfigError(f'{at}.allow: must list at least one identity (write "*" to allow any verified peer)')
        parsed.append(HbonePort(port, tuple(_pattern(p, f"{at}.allow[{j}]") for j, p in enumerate(allow))))
    return Hbone(
        listen=parse_address(m["listen"], f"{where}.listen"),
        ports=tuple(parsed),
        name=_name(m.get("name", "hbone"), f"{where}.name"),
    )


# -- transparent mode (contract section 8) ----------------------------------------------------


def _transparent(value: Any, where: str) -> Transparent:
    m = _mapping(value, where, required={"uid"}, optional={"outbound", "inbound"})
    uid = m["uid"]
    if isinstance(uid, bool) or not isinstance(uid, int) or not 1 <= uid <= MAX_UID:
        raise ConfigError(
            f"{where}.uid: expected the sidecar's own non-root uid (1 to {MAX_UID}), got {uid!r} "
            "(with 0, every root process would bypass capture)"
        )
    out = _transparent_outbound(m["outbound"], f"{where}.outbound") if m.get("outbound") is not None else None
    inb = _transparent_inbound(m["inbound"], f"{where}.inbound") if m.get("inbound") is not None else None
    if out is None and inb is None:
        raise ConfigError(f"{where}: give inbound, outbound or both")
    return Transparent(uid=uid, outbound=out, inbound=inb)


def _transparent_outbound(value: Any, where: str) -> TransparentOutbound:
    m = _mapping(value, where, required={"listen"}, optional={"routes", "unmatched", "exclude"})
    listen = _capture_listen(m["listen"], f"{where}.listen", ("127.0.0.1", "0.0.0.0", "::1", "::"))
    routes = tuple(_route(v, f"{where}.routes[{i}]") for i, v in enumerate(_list(m.get("routes"), f"{where}.routes")))
    exclude = tuple(
        parse_destination(v, f"{where}.exclude[{i}]", names=False, port_required=False)
        for i, v in enumerate(_list(m.get("exclude"), f"{where}.exclude"))
    )
    unmatched = _choice(m.get("unmatched", "passthrough"), f"{where}.unmatched", tuple(Unmatched))
    return TransparentOutbound(listen=listen, routes=routes, unmatched=Unmatched(unmatched), exclude=exclude)


def _route(value: Any, where: str) -> Route:
    m = _mapping(value, where, required={"to"}, optional={"server_identity", "sni", "tunnel"})
    to = parse_destination(m["to"], f"{where}.to", names=True, port_required=True)
    server_identity, sni = _server_check(m, where, "to", named=to.host is not None)
    tunnel = _tunnel(m["tunnel"], f"{where}.tunnel", route=True) if m.get("tunnel") is not None else None
    return Route(to=to, server_identity=server_identity, sni=sni, tunnel=tunnel)


# The keys of one ``transparent.inbound.ports`` entry; section 9's options for the app join here.
_PORT_KEYS = frozenset({"port", "allow"})
_CALLER_IDENTITY_KEYS = frozenset({"proxy_protocol", "client_cert_header"})


def _transparent_inbound(value: Any, where: str) -> TransparentInbound:
    m = _mapping(value, where, required={"listen", "ports"}, optional={"mode"})
    listen = _capture_listen(m["listen"], f"{where}.listen", ("0.0.0.0", "::"))
    items = _list(m["ports"], f"{where}.ports")
    if not items:
        raise ConfigError(f"{where}.ports: must list at least one app port to capture")
    ports: list[TransparentPort] = []
    for i, item in enumerate(items):
        pw = f"{where}.ports[{i}]"
        pm = _mapping(item, pw, required=_PORT_KEYS, optional=_CALLER_IDENTITY_KEYS)
        number = _port(pm["port"], f"{pw}.port")
        if any(p.port == number for p in ports):
            raise ConfigError(f"{pw}.port: {number} is listed twice")
        allow = _list(pm["allow"], f"{pw}.allow")
        if not allow:
            raise ConfigError(f'{pw}.allow: must list at least one identity (write "*" to allow any verified peer)')
        patterns = tuple(_pattern(p, f"{pw}.allow[{j}]") for j, p in enumerate(allow))
        ports.append(TransparentPort(number, patterns, **_caller_identity(pm, pw)))
    mode = _choice(m.get("mode", "strict"), f"{where}.mode", tuple(InboundMode))
    return TransparentInbound(listen=listen, ports=tuple(ports), mode=InboundMode(mode))


def _capture_listen(value: Any, where: str, hosts: tuple[str, ...]) -> Address:
    """A capture port: fixed (the nat rules name it) and bound where REDIRECT delivers: loopback for
    the app's outgoing connections, the wildcard for incoming ones (the receiving interface's address)."""
    addr = parse_address(value, where)
    if addr.port == 0:
        raise ConfigError(f"{where}: the capture port must be fixed (the nat rules redirect to it), not 0")
    if addr.host not in hosts:
        shown = ", ".join(str(Address(h, addr.port)) for h in hosts)
        raise ConfigError(f"{where}: REDIRECT delivers captured connections to {shown}; got {addr.host!r}")
    return addr


def _check_transparent_ports(t: Transparent, admin: Admin | None) -> None:
    """The capture ports, the admin port and the captured app ports are all different ports."""
    taken: dict[int, str] = {}
    if admin is not None and admin.listen.port:
        taken[admin.listen.port] = "admin.listen"
    for where, listen in (("transparent.outbound.listen", t.outbound), ("transparent.inbound.listen", t.inbound)):
        if listen is None:
            continue
        port = listen.listen.port
        if port in taken:
            raise ConfigError(f"{where}: port {port} is already {taken[port]}'s")
        taken[port] = where
    for i, p in enumerate(t.inbound.ports if t.inbound is not None else ()):
        if p.port in taken:
            raise ConfigError(f"transparent.inbound.ports[{i}].port: {p.port} is {taken[p.port]}'s port")


def parse_destination(value: Any, where: str, *, names: bool, port_required: bool) -> Destination:
    """A route's ``to`` (``names``: a host name may stand for the address; ``port_required``) or an
    ``exclude`` entry: ``10.0.0.0/8:8080``, ``10.1.2.3:*``, ``orders.mesh.local:8080``,
    ``[fd00::/64]:*``; without a port (where allowed) any port, and a bare IPv6 CIDR is accepted."""
    forms = '"ip:port", "cidr:port", ' + ('"name:port", ' if names else "") + '"[ipv6]:port" or ":*" for any port'
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: expected {forms}, got {value!r}")
    text = value.strip()
    port_text: str | None = None
    if text.startswith("["):
        body, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ConfigError(f"{where}: expected {forms}, got {value!r}")
        if rest:
            port_text = rest[1:]
        if ":" not in body:
            raise ConfigError(f"{where}: brackets are for IPv6 only, got {value!r}")
    elif text.count(":") > 1:  # a bare IPv6 address or CIDR: only where the port is optional
        body = text
        if port_required:
            raise ConfigError(f'{where}: write IPv6 in brackets with a port, like "[{text}]:8080" or "[{text}]:*"')
    else:
        body, sep, port_text_or_empty = text.partition(":")
        port_text = port_text_or_empty if sep else None
    if port_text is None and port_required:
        raise ConfigError(f'{where}: add the port, or ":*" for any port: {value!r}')
    port = None if port_text in (None, "*") else _port(int(port_text) if port_text.isdigit() else port_text, where)
    if "/" in body or is_ip(body) or body.replace(".", "").isdigit():
        return Destination(network=_network(body, where, bracketed=text.startswith("[")), host=None, port=port)
    if not names:
        raise ConfigError(f"{where}: expected an IP address or CIDR, got {body!r} (host names are not allowed here)")
    host = body.lower().rstrip(".")
    if len(host) > 253 or not all(_HOST_LABEL.match(label) for label in host.split(".")):
        raise ConfigError(f"{where}: {body!r} is neither an IP address, a CIDR nor a host name")
    return Destination(network=None, host=host, port=port)


def _network(text: str, where: str, *, bracketed: bool) -> Network:
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        if "has host bits set" in str(exc):
            loose = ipaddress.ip_network(text, strict=False)
            raise ConfigError(f"{where}: {text} has host bits set; did you mean {loose}?") from None
        raise ConfigError(f"{where}: {text!r} is not an IP address or CIDR") from None
    if bracketed and net.version != 6:
        raise ConfigError(f"{where}: brackets are for IPv6 only, got {text!r}")
    return net


def _admin(value: Any, where: str) -> Admin:
    m = _mapping(value, where, required={"listen"})
    return Admin(listen=parse_address(m["listen"], f"{where}.listen"))


def _limits(value: Any, where: str) -> Limits:
    d = Limits()
    m = _mapping(
        value,
        where,
        optional={"handshake_timeout", "connect_timeout", "idle_timeout", "max_connections", "drain_timeout"},
    )

    def dur(key: str, default: float, *, zero_ok: bool = False) -> float:
        if key not in m:
            return default
        seconds = parse_duration(m[key], f"{where}.{key}")
        if seconds == 0 and not zero_ok:
            raise ConfigError(f"{where}.{key}: must be greater than 0")
        return seconds

    max_conn = m.get("max_connections", d.max_connections)
    if isinstance(max_conn, bool) or not isinstance(max_conn, int) or max_conn < 1:
        raise ConfigError(f"{where}.max_connections: expected a whole number >= 1, got {max_conn!r}")
    return Limits(
        handshake_timeout=dur("handshake_timeout", d.handshake_timeout),
        connect_timeout=dur("connect_timeout", d.connect_timeout),
        idle_timeout=dur("idle_timeout", d.idle_timeout, zero_ok=True),
        max_connections=max_conn,
        drain_timeout=dur("drain_timeout", d.drain_timeout, zero_ok=True),
    )


def _workers(value: Any, where: str) -> int:
    if value == "auto":
        return max(1, min(os.cpu_count() or 1, MAX_WORKERS))
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WORKERS:
        raise ConfigError(f"{where}: expected a whole number from 1 to {MAX_WORKERS} or 'auto', got {value!r}")
    return value


def _log(value: Any, where: str) -> Log:
    m = _mapping(value, where, optional={"level", "format"})
    level = _choice(m.get("level", "info"), f"{where}.level", ("debug", "info", "warning", "error"))
    fmt = _choice(m.get("format", "json"), f"{where}.format", ("json", "text"))
    return Log(level=level, format=fmt)


# -- small validators -------------------------------------------------------------------------


def _mapping(
    value: Any, where: str, *, required: AbstractSet[str] = frozenset(), optional: AbstractSet[str] = frozenset()
) -> Mapping[str, Any]:
    label = where or "the config file"
    if not isinstance(value, Mapping):
        raise ConfigError(f"{label}: expected a mapping of keys, got {type(value).__name__}")
    prefix = f"{where}." if where else ""
    for key in value:
        if key not in required and key not in optional:
            known = ", ".join(sorted(required | optional))
            shown = key if isinstance(key, str) and key.isprintable() else repr(key)
            raise ConfigError(f"{prefix}{shown}: unknown key (known here: {known})")
    for key in sorted(required):
        if key not in value or value[key] is None:
            raise ConfigError(f"{prefix}{key}: required")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
    return value


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise ConfigError(f"{where}: expected a short name of letters, digits, '.', '_' or '-', got {value!r}")
    return value


def _whole(value: Any, where: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{where}: expected a whole number from {low} to {high}, got {value!r}")
    return value


def _port(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ConfigError(f"{where}: expected a port from 1 to 65535, got {value!r}")
    return value


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "?"


def _choice(value: Any, where: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"{where}: expected one of {'|'.join(choices)}, got {value!r}")
    return str(value)


def _pattern(value: Any, where: str) -> Pattern:
    try:
        return parse_pattern(value)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _dialable(value: Any, where: str) -> Address:
    addr = parse_address(value, where)
    if addr.port == 0:
        raise ConfigError(f"{where}: port 0 cannot be dialed")
    return addr


def is_ip(host: str) -> bool:
    """Whether ``host`` is an IPv4 or IPv6 address rather than a name."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _check_unique_names(cfg: Config) -> None:
    seen: dict[str, str] = {}
    names = [(f"inbound[{i}].name", x.name) for i, x in enumerate(cfg.inbound)]
    names += [(f"outbound[{i}].name", x.name) for i, x in enumerate(cfg.outbound)]
    if cfg.hbone is not None:
        names.append(("hbone.name", cfg.hbone.name))
    for where, name in names:
        if name in seen:
            raise ConfigError(f"{where}: {name!r} is already the name of {seen[name]}")
        seen[name] = where
