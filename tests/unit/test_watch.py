"""sidecar.watch: a change of some watched files reloads once and logs exactly the files that changed.

Real files in a temporary folder, a real watcher task (inotify and the poll); only the reload it
calls is a counter here.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest

from sidecar import pki
from sidecar.watch import CertWatcher, changed, fingerprint


def write(path: Path, data: bytes) -> None:
    pki.write_atomic(path, data)  # rename into place, as a rotation does


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    paths = [tmp_path / name for name in ("cert.pem", "key.pem", "ca.pem")]
    for p in paths:
        write(p, b"first " + p.name.encode())
    return paths


def changed_logs(caplog: pytest.LogCaptureFixture) -> list[list[str]]:
    return [
        r.fields["files"]  # type: ignore[attr-defined]
        for r in caplog.records
        if r.name == "sidecar.watch" and r.getMessage() == "certificate files changed"
    ]


async def test_one_changed_file_is_the_only_one_logged(files: list[Path], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sidecar.watch")
    reloads: asyncio.Queue[None] = asyncio.Queue()

    async def reload() -> bool:
        reloads.put_nowait(None)
        return True

    async def next_reload() -> None:
        await asyncio.wait_for(reloads.get(), 10)  # a generous liveness bound

    watcher = CertWatcher(files, reload, poll_interval=0.1, settle=0.05)
    watcher.mark_loaded(fingerprint(files))
    task = asyncio.create_task(watcher.run())
    try:
        write(files[1], b"second key")
        await next_reload()
        assert changed_logs(caplog) == [[str(files[1])]]
        write(files[0], b"second cert")
        write(files[2], b"second ca")
        await next_reload()
        await asyncio.sleep(0.3)  # a third reload would show here
        logged = changed_logs(caplog)
        # the two writes may settle as one change or two; either way, never the key again
        assert sorted(f for entry in logged[1:] for f in entry) == sorted([str(files[0]), str(files[2])])
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def test_changed_compares_file_by_file(files: list[Path]) -> None:
    before = fingerprint(files)
    assert changed(files, before, before) == []
    write(files[2], b"new ca")
    assert changed(files, before, fingerprint(files)) == [files[2]]
    os.unlink(files[0])  # a deleted file changed too
    assert changed(files, before, fingerprint(files)) == [files[0], files[2]]
    assert changed(files, None, before) == files  # nothing known before: all of them
