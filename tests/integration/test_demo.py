"""`sidecar demo` is the first thing a newcomer runs: it must pass and leave nothing behind."""

from __future__ import annotations

import subprocess
import sys


def _demo_processes() -> list[str]:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if "sidecar-demo-" in line or "sidecar.demo_app" in line]


def test_demo_passes_and_cleans_up() -> None:
    before = _demo_processes()
    result = subprocess.run([sys.executable, "-m", "sidecar", "demo"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "FAIL" not in out
    assert "frontend got HTTP 200" in out
    assert "the orders app read who called: x-forwarded-client-cert URI=spiffe://mesh.local/frontend" in out
    assert "(URI=spiffe://mesh.local/admin) is replaced before the app sees it" in out
    assert "refused spiffe://mesh.local/stranger (outcome denied)" in out
    assert "serial after" in out and "nothing was dropped" in out
    assert len(out.splitlines()) < 40  # a story a newcomer can read
    assert _demo_processes() == before
