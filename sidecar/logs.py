"""Structured logging to stderr: JSON lines by default, ``key=value`` text optionally.

Callers pass fields with ``extra={"fields": {...}}``. Nothing here ever receives key material or
payload; access records carry only what contract section 6 lists.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

ACCESS = logging.getLogger("sidecar.access")


class _Formatter(logging.Formatter):
    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.extra: dict[str, Any] = {} if worker is None else {"worker": worker}

    def fields(self, record: logging.LogRecord) -> dict[str, Any]:
        return {**self.extra, **getattr(record, "fields", {})}


class JSONFormatter(_Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(self.fields(record))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, separators=(",", ":"))


class TextFormatter(_Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        fields = " ".join(f"{k}={_text(v)}" for k, v in self.fields(record).items())
        line = f"{ts} {record.levelname.lower():7} {record.name}: {record.getMessage()}"
        if fields:
            line += " " + fields
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _text(value: Any) -> str:
    s = str(value)
    return json.dumps(s) if (" " in s or not s) else s


def setup(level: str = "info", fmt: str = "json", *, worker: int | None = None) -> None:
    """Log to stderr; in a worker process of ``workers: N`` every line carries ``worker``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter(worker) if fmt == "json" else TextFormatter(worker))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # watchfiles says "N changes detected" at info for every event in a watched folder; our
    # watcher logs the changes that matter. Left at info, a log file written into the folder of a
    # watched file (the CA bundle's, say) fed itself: each line was a change, each change a line.
    logging.getLogger("watchfiles").setLevel(logging.WARNING)
    # HTTP/2 and HPACK trace every frame and header at debug: a flood, with header values in it
    for library in ("h2", "hpack"):
        logging.getLogger(library).setLevel(logging.WARNING)


def event(logger: logging.Logger, level: int, msg: str, **fields: Any) -> None:
    if logger.isEnabledFor(level):
        logger.log(level, msg, extra={"fields": fields})
