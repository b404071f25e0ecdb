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
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .identity import Pattern, parse_pattern

DEFAULT_CONFIG = Path("config/sidecar.yaml")
MAX_WORKERS = 64
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


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
class Inbound:
    name: str
    listen: Address
    forward: Address
    allow: tuple[Pattern, ...]


@dataclass(frozen=True)
class Outbound:
    name: str
    listen: Address
    upstream: Address
    server_identity: tuple[Pattern, ...] | None
    sni: str | None


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


@dataclass(frozen=True)
class Config:
    tls: TLSFiles
    inbound: tuple[Inbound, ...] = ()
    outbound: tuple[Outbound, ...] = ()
    admin: Admin | None = None
    limits: Limits = field(default_factory=Limits)
    log: Log = field(default_factory=Log)
    workers: int = 1  # processes serving the listeners; ``auto`` in YAML is the number of cores
    path: Path | None = None  # the file it was loaded from


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
    top = _mapping(data, "", required={"tls"}, optional={"inbound", "outbound", "admin", "limits", "log", "workers"})
    cfg = Config(
        tls=_tls(top["tls"], "tls", base_dir),
        inbound=tuple(_inbound(v, f"inbound[{i}]") for i, v in enumerate(_list(top.get("inbound", []), "inbound"))),
        outbound=tuple(
            _outbound(v, f"outbound[{i}]") for i, v in enumerate(_list(top.get("outbound", []), "outbound"))
        ),
        admin=_admin(top["admin"], "admin") if top.get("admin") is not None else None,
        limits=_limits(top.get("limits") or {}, "limits"),
        log=_log(top.get("log") or {}, "log"),
        workers=_workers(top.get("workers", 1), "workers"),
        path=path,
    )
    if not cfg.inbound and not cfg.outbound:
        raise ConfigError("inbound/outbound: at least one listener is required")
    _check_unique_names(cfg)
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


def _tls(value: Any, where: str, base_dir: Path) -> TLSFiles:
    m = _mapping(
        value, where, required={"cert", "key", "ca"}, optional={"crl", "session_resumption", "session_lifetime"}
    )

    def path(key: str) -> Path:
        raw = m[key]
        if not isinstance(raw, str) or not raw.strip() or "\0" in raw:
            raise ConfigError(f"{where}.{key}: expected a file path, got {raw!r}")
        try:
            p = Path(raw).expanduser()
        except RuntimeError:  # "~user" of a user this machine does not know
            raise ConfigError(f"{where}.{key}: cannot expand the home folder in {raw!r}") from None
        return p if p.is_absolute() else base_dir / p

    resumption = m.get("session_resumption", True)
    if not isinstance(resumption, bool):
        raise ConfigError(f"{where}.session_resumption: expected true or false, got {resumption!r}")
    lifetime = parse_duration(m.get("session_lifetime", "1h"), f"{where}.session_lifetime")
    if lifetime <= 0 or lifetime > 7 * 86400:
        raise ConfigError(f"{where}.session_lifetime: must be more than 0 and at most 7 days (RFC 8446 4.6.1)")
    return TLSFiles(
        cert=path("cert"),
        key=path("key"),
        ca=path("ca"),
        crl=path("crl") if m.get("crl") is not None else None,
        session_resumption=resumption,
        session_lifetime=lifetime,
    )


def _inbound(value: Any, where: str) -> Inbound:
    m = _mapping(value, where, required={"name", "listen", "forward", "allow"})
    allow = _list(m["allow"], f"{where}.allow")
    if not allow:
        raise ConfigError(f'{where}.allow: must list at least one identity (write "*" to allow any verified peer)')
    return Inbound(
        name=_name(m["name"], f"{where}.name"),
        listen=parse_address(m["listen"], f"{where}.listen"),
        forward=_dialable(m["forward"], f"{where}.forward"),
        allow=tuple(_pattern(p, f"{where}.allow[{i}]") for i, p in enumerate(allow)),
    )


def _outbound(value: Any, where: str) -> Outbound:
    m = _mapping(value, where, required={"name", "listen", "upstream"}, optional={"server_identity", "sni"})
    upstream = _dialable(m["upstream"], f"{where}.upstream")
    server_identity: tuple[Pattern, ...] | None = None
    if m.get("server_identity") is not None:
        items = _list(m["server_identity"], f"{where}.server_identity")
        if not items:
            raise ConfigError(f"{where}.server_identity: must not be empty (omit it for hostname verification)")
        server_identity = tuple(_pattern(p, f"{where}.server_identity[{i}]") for i, p in enumerate(items))
    sni = m.get("sni")
    if sni is not None and (not isinstance(sni, str) or not sni.strip()):
        raise ConfigError(f"{where}.sni: expected a host name, got {sni!r}")
    if server_identity is None and is_ip(upstream.host) and sni is None:
        raise ConfigError(
            f"{where}.server_identity: required when upstream is an IP address "
            "(hostname verification needs a name; or set sni to the name the upstream's cert carries)"
        )
    return Outbound(
        name=_name(m["name"], f"{where}.name"),
        listen=parse_address(m["listen"], f"{where}.listen"),
        upstream=upstream,
        server_identity=server_identity,
        sni=sni.strip() if isinstance(sni, str) else None,
    )


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
    for where, name in names:
        if name in seen:
            raise ConfigError(f"{where}: {name!r} is already the name of {seen[name]}")
        seen[name] = where
