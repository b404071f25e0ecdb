"""Noticing that certificate files changed on disk, and asking for a reload.

Changes are seen two ways: inotify events (``watchfiles``) on the folders holding the files, and a
stat poll every ``poll_interval`` as the fallback (network file systems, a watched folder itself
replaced). Either only *suggests* a change; the decision is a fingerprint of every file (real path,
inode, size, mtime, following symlinks), so Kubernetes ``..data`` swaps, rename-into-place and
delete-and-recreate all count, and a burst of writes (cert, then key) settles before one reload.
A fingerprint that failed to load is not retried until the files change again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from .logs import event

log = logging.getLogger("sidecar.watch")

Fingerprint = tuple[tuple[str, int, int, int, int] | None, ...]


def fingerprint(paths: Sequence[Path]) -> Fingerprint:
    """Identity of the files' current content (blocking: stat calls)."""
    out: list[tuple[str, int, int, int, int] | None] = []
    for path in paths:
        try:
            st = os.stat(path)
            out.append((os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append(None)
    return tuple(out)


def changed(paths: Sequence[Path], before: Fingerprint | None, after: Fingerprint) -> list[Path]:
    """The paths whose part of the fingerprint differs (all of them when there was none before)."""
    if before is None or len(before) != len(after):
        return list(paths)
    return [path for path, old, new in zip(paths, before, after, strict=True) if old != new]


class CertWatcher:
    """Calls ``reload`` once per settled change of ``paths``."""

    def __init__(
        self,
        paths: Sequence[Path],
        reload: Callable[[], Awaitable[bool]],
        *,
        poll_interval: float = 1.0,
        settle: float = 0.2,
    ) -> None:
        self.paths = list(paths)
        self._reload = reload
        self.poll_interval = poll_interval
        self.settle = settle
        self._last: Fingerprint | None = None
        self._wake = asyncio.Event()

    async def run(self) -> None:
        """Watch until cancelled."""
        if self._last is None:
            self._last = await self.current()
        inotify = asyncio.ensure_future(self._inotify())
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll_interval)
                self._wake.clear()
                await self.check()
        finally:
            inotify.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await inotify

    def mark_loaded(self, fp: Fingerprint) -> None:
        self._last = fp

    async def current(self) -> Fingerprint:
        return await asyncio.to_thread(fingerprint, self.paths)

    async def check(self) -> None:
        """Reload if the files changed since the last attempt, once they have stopped changing."""
        fp = await self.current()
        if fp == self._last:
            return
        while True:  # settle: a writer may still be swapping the cert, then the key
            await asyncio.sleep(self.settle)
            again = await self.current()
            if again == fp:
                break
            fp = again
        event(
            log, logging.INFO, "certificate files changed", files=[str(p) for p in changed(self.paths, self._last, fp)]
        )
        self._last = fp
        await self._reload()

    async def _inotify(self) -> None:
        try:
            from watchfiles import awatch
        except ImportError:  # pragma: no cover - watchfiles is a dependency; polling still works
            return
        folders = sorted({str(p.parent) for p in self.paths})
        stop = asyncio.Event()  # lets watchfiles' thread end within one step when we are cancelled
        try:
            while True:
                existing = await asyncio.to_thread(lambda: [f for f in folders if os.path.isdir(f)])
                if not existing:
                    await asyncio.sleep(self.poll_interval)
                    continue
                try:
                    async for _changes in awatch(
                        *existing, watch_filter=None, recursive=False, debounce=400, step=50, stop_event=stop
                    ):
                        self._wake.set()
                except (OSError, RuntimeError) as exc:  # a folder vanished: watch again after a pause
                    event(log, logging.DEBUG, "file watch restarting", error=str(exc))
                await asyncio.sleep(self.poll_interval)
        finally:
            stop.set()
