"""The bench never rots: its quick mode runs every installed pair end to end and writes the report.

``python -m bench --quick`` uses the pure-Python load, so this passes where wrk and iperf3 are
missing (CI); peers (stunnel, HAProxy, nginx) are measured when installed and skipped otherwise.
The parsers of the tools' output are checked on recorded samples, and an interrupted run must
leave no process and no temporary folder behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench import load, pairs, profile  # noqa: E402 - the bench lives at the repository root, not the package
from bench.procs import BenchError  # noqa: E402

METRICS = ("ka_rate", "ka_p99_ms", "nc_rate", "up_gbps", "down_gbps")
PROXY_METRICS = ("idle_kb", "ka_cpu", "nc_cpu", "up_cpu", "down_cpu")


def run_bench(out: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def results(out: Path) -> tuple[str, dict[str, Any]]:
    (md,) = out.glob("*.md")
    (js,) = out.glob("*.json")
    return md.read_text(), json.loads(js.read_text())


def assert_measured(data: dict[str, Any], text: str, pair: str) -> None:
    p = data["pairs"][pair]
    assert p["status"] == "measured", p
    assert f"`{pair}`" in text
    summary = p["summary"]
    for key in METRICS + (PROXY_METRICS if pair != "direct" else ()):
        assert summary[key]["median"] > 0, (pair, key, summary.get(key))
    if pair != "direct":
        check = p["checks"][0]
        assert {"refused_no_client_cert", "refused_unknown_ca", "refused_tls12"} <= set(check), check
        assert p["negotiated"]["suite"].startswith("TLSv1.3 "), p["negotiated"]


def test_quick_mode_measures_direct_sidecar_and_installed_peers(tmp_path: Path) -> None:
    started = time.monotonic()
    proc = run_bench(tmp_path, "--forwarding")
    assert proc.returncode == 0, proc.stderr[-5000:]
    text, data = results(tmp_path)
    assert data["mode"] == "quick"
    assert "quick mode" in text
    for pair in ("direct", "sidecar"):
        assert_measured(data, text, pair)
    # Our sidecar resumes too: its resumed variant is measured, and really resumed.
    sidecar = data["pairs"]["sidecar"]
    assert sidecar["resume_status"] == "measured"
    assert sidecar["summary"]["rs_nc_rate"]["median"] > 0
    assert sidecar["summary"]["nc_resumed_pct"]["median"] == 0  # off means off
    assert sidecar["summary"]["rs_nc_resumed_pct"]["median"] > 50  # on means on
    for peer in pairs.PEERS:
        if data["pairs"][peer]["status"] == "skipped":
            continue
        assert_measured(data, text, peer)
        assert data["pairs"][peer]["summary"]["rs_nc_rate"]["median"] > 0
        assert data["pairs"][peer]["summary"]["nc_resumed_pct"]["median"] == 0  # off means off
    assert data["ratios"]["vs_direct"]["sidecar"]["ka_rate"] > 0
    # --forwarding: our pair with client_cert_header and with proxy_protocol, keep-alive only
    forwarding = [p for p in pairs.FORWARDING if data["pairs"][p]["status"] != "skipped"]
    assert "sidecar-xfcc" in forwarding  # needs no tool; sidecar-proxy needs nginx's proxy_protocol port
    for pair in forwarding:
        p = data["pairs"][pair]
        assert p["status"] == "measured", p
        assert p["summary"]["ka_rate"]["median"] > 0 and p["summary"]["ka_cpu"]["median"] > 0
        assert {"refused_no_client_cert", "refused_unknown_ca", "refused_tls12"} <= set(p["checks"][0])
        assert "nc_rate" not in p["summary"] and "resume_status" not in p
        assert f"*{pair} ÷ sidecar*" in text
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pass
    else:
        (png,) = tmp_path.glob("*.png")
        assert png.read_bytes().startswith(b"\x89PNG")
    print(f"quick mode took {time.monotonic() - started:.1f}s")


@pytest.mark.skipif(not (shutil.which("wrk") and shutil.which("iperf3")), reason="wrk and iperf3 not installed")
def test_quick_mode_with_wrk_and_iperf3(tmp_path: Path) -> None:
    proc = run_bench(tmp_path, "--load", "tools", "--pairs", "direct,sidecar", "--no-resume")
    assert proc.returncode == 0, proc.stderr[-5000:]
    text, data = results(tmp_path)
    assert data["backends"]["bulk"] == "iperf3"
    for pair in ("direct", "sidecar"):
        assert_measured(data, text, pair)


@pytest.mark.skipif(not (shutil.which("wrk") and shutil.which("iperf3")), reason="wrk and iperf3 not installed")
def test_profile_mode_says_where_the_pair_spends(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--profile", "--duration", "1", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    (md,) = tmp_path.glob("*-profile.md")
    text = md.read_text()
    for workload in profile.WORKLOADS:
        for side in profile.SIDES:
            assert f"## {workload}, {side} side" in text
            stacks = profile.parse_collapsed((tmp_path / md.stem / f"{workload}-{side}.txt").read_text())
            assert sum(stacks.values()) > 0, (workload, side)
    # the sidecar's own code shows up: the legs under keep-alive, OpenSSL's handshake under new connections
    keepalive = text.split("## keepalive, server side")[1].split("##")[0]
    assert "(legs.py)" in keepalive
    newconn = text.split("## newconn, server side")[1].split("##")[0]
    assert "do_handshake" in newconn


def test_interrupted_run_leaves_nothing_behind(tmp_path: Path) -> None:
    bench = subprocess.Popen(
        [sys.executable, "-m", "bench", "--quick", "--pairs", "sidecar", "--out", str(tmp_path)],
        cwd=ROOT,
        # a shell without job control starts background jobs with SIGINT ignored, and children
        # inherit that: give the bench the default disposition so it sees the interrupt
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen: set[int] = set()
    tmp_dirs: set[str] = set()
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and bench.poll() is None:
            for pid in _descendants(bench.pid):
                seen.add(pid)
                tmp_dirs |= set(re.findall(r"/\S*sidecar-bench-[^/\s]+", _cmdline(pid)))
            if any("-m sidecar run" in _cmdline(pid) for pid in seen):
                break
            time.sleep(0.05)
        assert tmp_dirs, "the bench never started a sidecar"
        bench.send_signal(signal.SIGINT)
        _, err = bench.communicate(timeout=60)
    finally:
        if bench.poll() is None:
            bench.kill()
    assert bench.returncode == 130, err[-3000:]
    assert "interrupted" in err
    alive = [pid for pid in seen if _alive(pid)]
    assert not alive, [(_cmdline(pid), pid) for pid in alive]
    assert not [d for d in tmp_dirs if Path(d).exists()]
    assert not list(tmp_path.glob("*.md"))  # no half report


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat[stat.rfind(")") + 2 :].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rfind(")") + 2] != "Z"


# -- the parsers, on recorded output -------------------------------------------------------------

WRK_OUT = """Running 1s test @ http://127.0.0.1:8080/
  1 threads and 8 connections
BENCH {"requests": 12345, "duration_us": 1000000, "bytes": 1, "connect_errors": 0, "read_errors": 2, \
"write_errors": 0, "status_errors": 0, "timeouts": 1, "p50_us": 250, "p99_us": 1500, "max_us": 9000}
"""


def test_parse_wrk() -> None:
    r = load.parse_wrk(WRK_OUT)
    assert (r.requests, r.rate, r.p50_ms, r.p99_ms, r.errors) == (12345, 12345.0, 0.25, 1.5, 3)
    with pytest.raises(BenchError):
        load.parse_wrk("unable to connect to 127.0.0.1:1 Connection refused", 1)


def test_parse_iperf3() -> None:
    out = json.dumps({"end": {"sum_received": {"bytes": 1_000_000_000, "seconds": 2.0}}})
    assert load.parse_iperf3(out).gbps == 4.0
    with pytest.raises(BenchError):
        load.parse_iperf3(json.dumps({"error": "unable to connect to server"}), 1)


PY_SPY_RAW = """\
process 7:"python -m sidecar run";<module> (sidecar/__main__.py:4);run (asyncio/runners.py:190);\
Runner.run (asyncio/runners.py:118) 60
process 7:"python -m sidecar run";<module> (sidecar/__main__.py:4);run (asyncio/runners.py:190);\
Runner.run (asyncio/runners.py:118);Leg.data_received (sidecar/pump.py:201);Leg.send (sidecar/pump.py:120) 30
process 7:"python -m sidecar run";<module> (sidecar/__main__.py:4);run (asyncio/runners.py:190);\
Runner.run (asyncio/runners.py:118);Leg.data_received (sidecar/pump.py:205);Leg.send (sidecar/pump.py:124) 10
not a stack line
"""


def test_parse_py_spy() -> None:
    stacks = profile.parse_collapsed(PY_SPY_RAW)
    assert sum(stacks.values()) == 100
    p = profile.Profile("keepalive", "server", stacks, 1.0, 3.0)
    # lines of one function merge; the process frame is dropped
    assert p.self_share() == [("Runner.run (runners.py)", 60.0), ("Leg.send (pump.py)", 40.0)]
    # the trunk (on every stack) is left out of total
    assert p.total_share() == [("Leg.data_received (pump.py)", 40.0), ("Leg.send (pump.py)", 40.0)]
    text = profile.markdown([p], profile_settings())
    assert "CPU 4.00 s, 75% of it in the kernel" in text


def profile_settings() -> Any:
    from bench.runner import Settings

    return Settings(pairs=("sidecar",))


def test_parse_server_logs() -> None:
    sidecar = (
        '{"logger":"sidecar.access","direction":"inbound","outcome":"ok","tls_version":"TLSv1.3",'
        '"cipher":"TLS_AES_128_GCM_SHA256"}\n'
        '{"logger":"sidecar.access","direction":"inbound","outcome":"tls_error"}\n'
    )
    assert pairs.parse_sidecar(sidecar) == [pairs.Handshake("TLSv1.3", "TLS_AES_128_GCM_SHA256", None)]
    haproxy = "bench TLSv1.3 TLS_AES_128_GCM_SHA256 1\nbench TLSv1.3 TLS_AES_128_GCM_SHA256 0\n"
    assert [h.resumed for h in pairs.parse_haproxy(haproxy)] == [True, False]
    nginx = "bench TLSv1.3 TLS_AES_128_GCM_SHA256 r\nbench TLSv1.3 TLS_AES_128_GCM_SHA256 .\nbench   .\n"
    assert [h.resumed for h in pairs.parse_nginx(nginx)] == [True, False]
    stunnel = """\
2026.01.01 00:00:00 LOG5[0]: Service [http] accepted connection from 127.0.0.1:1
2026.01.01 00:00:00 LOG5[0]: Certificate accepted at depth=0: CN=client
2026.01.01 00:00:00 LOG5[0]: Connection closed: 810 byte(s) sent to TLS, 79 byte(s) sent to socket
2026.01.01 00:00:00 LOG5[1]: Service [http] accepted connection from 127.0.0.1:2
2026.01.01 00:00:00 LOG5[1]: Connection closed: 810 byte(s) sent to TLS, 79 byte(s) sent to socket
2026.01.01 00:00:00 LOG5[2]: Service [http] accepted connection from 127.0.0.1:3
2026.01.01 00:00:00 LOG3[2]: SSL_accept: peer did not return a certificate
2026.01.01 00:00:00 LOG5[2]: Connection reset/closed: 0 byte(s) sent to TLS, 0 byte(s) sent to socket
2026.01.01 00:00:00 LOG6[3]: TLS accepted: previous session reused
2026.01.01 00:00:00 LOG6[3]: TLSv1.3 ciphersuite: TLS_AES_128_GCM_SHA256 (128-bit encryption)
2026.01.01 00:00:00 LOG5[3]: Connection closed: 810 byte(s) sent to TLS, 79 byte(s) sent to socket
"""
    assert pairs.parse_stunnel(stunnel) == [
        pairs.Handshake(None, None, False),
        pairs.Handshake(None, None, True),
        pairs.Handshake("TLSv1.3", "TLS_AES_128_GCM_SHA256", True),
    ]


def imported_from(env: dict[str, str], cwd: Path) -> Path:
    """Where ``python -m``'s process started with this environment and folder imports sidecar from."""
    out = subprocess.run(
        [sys.executable, "-c", "import sidecar; print(sidecar.__file__)"],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()
    return Path(out).resolve()


def test_baseline_pair_runs_the_exported_code_not_the_working_tree(tmp_path: Path) -> None:
    # started from the repository (as `python -m bench` is), `python -m` would put the working tree
    # first on the path: the baseline must import the package exported from git
    from bench.cli import export_sidecar

    code = export_sidecar("HEAD", tmp_path)
    base = pairs.Baseline(code)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    assert imported_from(base.env_for(env), base.cwd() or ROOT).is_relative_to(code.resolve())
    plain = pairs.Sidecar()
    here = imported_from(env, plain.cwd() or ROOT)
    assert here.is_relative_to(ROOT), here


def test_fresh_mode_starts_a_pair_per_workload_and_shows_every_sample(tmp_path: Path) -> None:
    args = ("--pairs", "sidecar", "--fresh", "--workloads", "bulk_up,bulk_down", "--reps", "2", "--keep-tmp")
    proc = run_bench(tmp_path, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text, data = results(tmp_path)
    summary = data["pairs"]["sidecar"]["summary"]
    assert set(summary) == {"up_gbps", "down_gbps", "up_cpu", "down_cpu"}, summary.keys()
    assert len(summary["up_gbps"]["samples"]) == 2
    assert "each workload on a pair started for it alone" in text
    row = next(line for line in text.splitlines() if line.startswith("| `sidecar` | bulk → Gbit/s |"))
    assert len(row.split("|")[3].split()) == 2, row  # both samples, not only their median
    # a pair per workload and repetition: each started pair has its own folder of configurations
    kept = Path(re.search(r"bench: kept (\S+)", proc.stderr)[1])  # type: ignore[index]
    try:
        assert len(list(kept.glob("sidecar-*/server.yaml"))) == 4
    finally:
        shutil.rmtree(kept, ignore_errors=True)
