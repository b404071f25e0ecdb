"""``python -m bench --target HOST:PORT``: what putting a sidecar pair in front of your HTTP service costs.

The pair is the real topology (client-side sidecar -> mTLS -> server-side sidecar -> your service,
a throwaway CA); the load is wrk (or the pure-Python client without it), alternating ``direct``
(straight to HOST:PORT) and ``sidecar`` within each repetition. Reported: keep-alive and
new-connection rates and latencies both ways, the latency the pair adds, the share of throughput
it keeps, and the CPU its two processes used per request and per connection.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import date, datetime
from pathlib import Path
from typing import Any

from . import load, report, tools
from .backends import Backends
from .certs import make as make_certs
from .checks import CheckFailed, check
from .pairs import Ctx, Running, Sidecar
from .procs import BenchError, Procs, cpu_seconds, raise_fd_limit
from .runner import MAX_ERROR_FRACTION, require_tools


def parse_target(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BenchError(f"--target: expected HOST:PORT (IPv6 as [::1]:PORT), got {text!r}")
    return host, int(port)


def main(args: argparse.Namespace) -> int:
    host, port = parse_target(args.target)
    found = tools.find()
    use_tools = args.load == "tools" or (args.load == "auto" and found.has("wrk"))
    if use_tools:
        require_tools_wrk(found)
    reps = args.reps or 3
    duration = args.duration or 5.0
    ka_conns = args.connections or 32
    nc_conns = args.new_connections or 16
    threads = args.threads or 1
    host_header = args.target
    request = load.request(args.path, host_header)
    samples: dict[str, dict[str, list[float]]] = {"direct": {}, "sidecar": {}}
    checks_seen: dict[str, Any] = {}
    with Procs(keep_tmp=args.keep_tmp) as procs:
        from .runner import Bench, Settings

        env = Bench(Settings(pairs=()), procs, found).env()
        fd_limit = raise_fd_limit()
        certs = make_certs(procs.folder("pki"))
        backends = Backends(port, port, "target", "target", host)
        ctx = Ctx(procs, found, certs, backends, env, fd_limit)
        direct = Running("direct", False, port, port, host=host)
        pair = Sidecar().start(ctx, resume=False)
        try:
            checks_seen["direct"] = check(direct, certs, request=request, expect=b"HTTP/1.")
            status = checks_seen["direct"]["request"].split(" ")[1:2]
            checks_seen["sidecar"] = check(pair, certs, request=request, expect=b"HTTP/1.")
            if checks_seen["sidecar"]["request"].split(" ")[1:2] != status:
                raise CheckFailed(
                    f"direct answered {checks_seen['direct']['request']!r} but through the pair "
                    f"{checks_seen['sidecar']['request']!r}"
                )
        except (CheckFailed, OSError) as exc:
            raise BenchError(f"--target {args.target}: {exc}") from None
        for rep in range(reps):
            for run in [direct, pair] if rep % 2 == 0 else [pair, direct]:
                for close in (False, True):
                    conns = nc_conns if close else ka_conns
                    cpu0 = cpu_seconds(run.pids())
                    if use_tools:
                        url = f"http://{_url_host(run.host)}:{run.http_port}{args.path}"
                        res = load.wrk(
                            procs,
                            found.path("wrk"),
                            url,
                            threads=threads,
                            connections=conns,
                            duration=duration,
                            close=close,
                            env=env,
                            headers=(f"Host: {host_header}",),
                        )
                    else:
                        res = load.py_http(
                            run.http_port,
                            connections=conns,
                            duration=duration,
                            close=close,
                            host=run.host,
                            path=args.path,
                            host_header=host_header,
                        )
                    cpu = cpu_seconds(run.pids()) - cpu0
                    if res.requests == 0 or res.errors > MAX_ERROR_FRACTION * res.requests:
                        raise BenchError(f"{run.pair}: {res.errors} errors in {res.requests} requests")
                    p = "nc" if close else "ka"
                    values = {f"{p}_rate": res.rate, f"{p}_p50_ms": res.p50_ms, f"{p}_p99_ms": res.p99_ms}
                    if run.procs:
                        values[f"{p}_cpu"] = cpu / res.requests * (1e3 if close else 1e6)
                    for k, v in values.items():
                        samples[run.pair].setdefault(k, []).append(v)
                    shown = ", ".join(f"{k}={v:,.3g}" for k, v in values.items())
                    print(f"bench: [{rep + 1}/{reps}] {run.pair:<8} {shown}", file=sys.stderr, flush=True)
    results = {
        "date": datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "mode": "target",
        "target": args.target,
        "path": args.path,
        "settings": {
            "reps": reps,
            "duration": duration,
            "load": "wrk" if use_tools else "python",
            "threads": threads,
            "ka_connections": ka_conns,
            "nc_connections": nc_conns,
        },
        "machine": report.machine(),
        "sidecar_version": report.sidecar_version(),
        "checks": checks_seen,
        "summary": report.summarize(samples),
    }
    text = markdown(results)
    out = args.out or Path(__file__).resolve().parent / "results" / "tmp"
    out.mkdir(parents=True, exist_ok=True)
    stem = f"target-{date.today().isoformat()}"
    (out / f"{stem}.md").write_text(text)
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(text)
    print(f"bench: wrote {out / stem}.md and .json", file=sys.stderr)
    return 0


def require_tools_wrk(found: tools.Tools) -> None:
    if not found.has("wrk"):
        require_tools(found)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


ROWS = [
    ("ka_rate", "keep-alive requests/s", "ratio"),
    ("ka_p50_ms", "keep-alive p50 latency, ms", "added"),
    ("ka_p99_ms", "keep-alive p99 latency, ms", "added"),
    ("nc_rate", "new connections/s (one request each)", "ratio"),
    ("nc_p50_ms", "new-connection p50 latency, ms", "added"),
    ("nc_p99_ms", "new-connection p99 latency, ms", "added"),
    ("ka_cpu", "pair CPU per keep-alive request, µs", "cost"),
    ("nc_cpu", "pair CPU per new connection (full mTLS handshake), ms", "cost"),
]


def markdown(results: dict[str, Any]) -> str:
    s = results["summary"]
    m = results["machine"]
    st = results["settings"]
    lines = [
        f"# {results['target']} behind a sidecar pair ({results['date']})",
        "",
        f"Load: {st['load']}, {st['ka_connections']} keep-alive connections, {st['nc_connections']} "
        f"connections with `Connection: close` for new connections, `GET {results['path']}`; "
        f"{st['reps']} repetitions x {st['duration']:g} s, direct and through the pair alternating. "
        f"Machine: {m['cpu']}, {m['cores']} cores shared by the load generator, both sidecars "
        "(and your service, if it runs here). Median (min-max).",
        "",
        "| | direct | through the sidecar pair | cost of the pair |",
        "|---|--:|--:|--:|",
    ]
    for key, title, kind in ROWS:
        d, p = s.get("direct", {}).get(key), s.get("sidecar", {}).get(key)
        if kind == "ratio" and d and p:
            cost = f"keeps {p['median'] / d['median']:.0%}"
        elif kind == "added" and d and p:
            cost = f"+{p['median'] - d['median']:.2f} ms"
        else:
            cost = ""
        lines.append(f"| {title} | {report.cell(d)} | {report.cell(p)} | {cost} |")
    neg = (results["checks"].get("sidecar", {}).get("negotiated") or {}).get("suite")
    lines += ["", f"Middle hop: {neg or 'unknown'}. sidecar {results['sidecar_version']}."]
    return "\n".join(lines) + "\n"
