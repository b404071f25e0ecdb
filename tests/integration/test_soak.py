"""The soak never rots: a run of under 30 seconds through a real sidecar pair passes and writes its
report; and the verdict's criterion fails a process that leaks and passes one that settles."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench import soakreport  # noqa: E402 - the bench lives at the repository root, not the package
from bench.soak import Sample, SoakRun, SoakSettings  # noqa: E402


def test_a_short_soak_passes_and_reports(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "bench", "soak", "--minutes", "0.35"),
            *("--rotate-every", "6", "--sample-every", "1", "--out", str(tmp_path)),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (md,) = tmp_path.glob("*-soak.md")
    (js,) = tmp_path.glob("*-soak.json")
    (png,) = tmp_path.glob("*-soak.png")
    assert png.read_bytes().startswith(b"\x89PNG")
    assert "PASSED" in md.read_text()
    data = json.loads(js.read_text())
    assert data["passed"] and not data["failures"]
    totals = data["totals"]
    assert totals["errors"] == 0
    assert totals["requests"] > 100 and totals["bulk_bytes"] > 0
    assert totals["rotations"] >= 2
    assert all(r["seen_after_s"] >= 0 for r in data["rotations"])  # every rotation seen by a new handshake
    assert all(n >= totals["rotations"] for n in totals["reloads"].values())  # both sidecars reloaded each
    assert set(data["outcomes"]["server"]) == {"ok"} and set(data["outcomes"]["client"]) == {"ok"}
    assert len(data["samples"]) >= 15
    # 21 s is still warm-up: growth is reported, not judged (the verdict's own tests are below)
    assert not any(t["judged"] for side in data["trends"].values() for t in side.values())


def synthetic(fds: list[int], rss_kib: list[int], fds_after: int | None = None) -> SoakRun:
    """A run whose samples are given (testing the verdict, not a sidecar)."""

    def sample(t: float, fd: int, rss: int) -> Sample:
        return Sample(t, {"client": fd, "server": 20}, {"client": rss, "server": 50_000}, 0, 0, 0, 0, {}, {}, 0)

    run = SoakRun(SoakSettings(minutes=len(fds) / 12))
    run.samples = [sample(i * 5.0, fd, rss) for i, (fd, rss) in enumerate(zip(fds, rss_kib, strict=True))]
    run.baseline = sample(0.0, 20, 40_000)
    run.drained = sample(len(fds) * 5.0, 20 if fds_after is None else fds_after, 50_000)
    run.outcomes = {"client": {"ok": 1}, "server": {"ok": 1}}
    return run


def test_the_verdict_passes_a_process_that_settles() -> None:
    warmup = [40_000 + 500 * i for i in range(60)]  # +30 MiB of warm-up, then a level with noise
    level = [70_000 + (300 if i % 2 else -300) for i in range(60)]
    results = soakreport.build(synthetic([120 + i % 5 for i in range(120)], warmup + level))
    assert results["passed"], results["failures"]


def test_the_verdict_fails_a_leak_of_memory_or_descriptors() -> None:
    steady_fds = [120 + i % 5 for i in range(120)]
    rss_leak = [60_000 + 200 * i for i in range(120)]  # 200 KiB every 5 s: ~12 MiB over the second half
    results = soakreport.build(synthetic(steady_fds, rss_leak))
    assert not results["passed"]
    assert results["failures"] == [results["failures"][0]] and "client rss_kib" in results["failures"][0]
    fd_leak = [120 + i // 2 for i in range(120)]  # one socket every 10 s
    results = soakreport.build(synthetic(fd_leak, [60_000] * 120))
    assert any("client fds" in f for f in results["failures"]), results["failures"]
    results = soakreport.build(synthetic(steady_fds, [60_000] * 120, fds_after=40))  # 20 left open at rest
    assert any("at rest" in f for f in results["failures"]), results["failures"]
