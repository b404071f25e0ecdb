"""``python -m bench`` and ``python -m bench soak``: the only place that parses options, prints the
summary and picks exit codes.

Exit 0: every pair passed its checks and every workload ran (soak: no failed connection, no
unbounded growth). 1: a pair failed, or the soak did (the report is still written, naming it).
2: a usage error or a missing tool. 130: interrupted (everything started is stopped and the
temporary folder removed first).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, replace
from datetime import date
from pathlib import Path

from . import report, tools
from .pairs import FORWARDING, PAIRS, Baseline
from .procs import BenchError, Procs, sigterm_as_interrupt
from .runner import ALL_WORKLOADS, WORKLOADS, Bench, Settings, require_tools
from .transparent import SidecarTransparent

RESULTS = Path(__file__).resolve().parent / "results"
ALL_PAIRS = ("direct", "sidecar", "sidecar-hbone", "stunnel", "haproxy", "nginx")
OPT_IN = ("sidecar-transparent",)  # named in --pairs only: it needs a network namespace of its own
PAIRS[SidecarTransparent.name] = SidecarTransparent()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="What mTLS costs: direct vs our sidecar pair vs stunnel, HAProxy and nginx pairs on loopback.",
        epilog="Full run: `make bench-deps && make bench`. Results go to bench/results/<date>.{md,json,png}.",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="seconds, one repetition: proves every pair works")
    mode.add_argument("--target", metavar="HOST:PORT", help="measure your own HTTP service behind a sidecar pair")
    mode.add_argument(
        "--profile",
        action="store_true",
        help="py-spy on our sidecar pair under each workload: where its CPU goes (<date>-profile.md)",
    )
    p.add_argument(
        "--pairs",
        help=f"comma-separated subset of {','.join(ALL_PAIRS + OPT_IN)} (default: all installed but {OPT_IN[0]})",
    )
    p.add_argument(
        "--baseline",
        metavar="REV",
        help="also measure our sidecar pair as of git revision REV (pair 'baseline'), interleaved in the same run",
    )
    p.add_argument(
        "--forwarding",
        action="store_true",
        help="also measure our pair with client_cert_header: xfcc and with proxy_protocol: tls-full on its server "
        "side (pairs sidecar-xfcc, sidecar-proxy; keep-alive only), interleaved in the same run",
    )
    p.add_argument("--reps", type=int, help="repetitions (default 5; quick 1)")
    p.add_argument("--duration", type=float, help="seconds per workload (default 3; quick 0.3)")
    p.add_argument(
        "--load",
        choices=("auto", "tools", "python"),
        default="auto",
        help="wrk + iperf3, or the pure-Python client (auto: tools, except python for --quick)",
    )
    p.add_argument("--no-resume", action="store_true", help="skip the peers' resumption-on variants")
    p.add_argument(
        "--fresh",
        action="store_true",
        help="start every pair anew for each workload (default: one pair per repetition, workloads in turn)",
    )
    p.add_argument(
        "--workloads",
        help=f"comma-separated subset of {','.join(ALL_WORKLOADS)} (default: all but scaling, which takes minutes)",
    )
    p.add_argument(
        "--scaling",
        metavar="N,N,...",
        help="connections per level of the scaling workload (default 100,1000,5000,10000)",
    )
    p.add_argument("--threads", type=int, help="wrk threads (default 1)")
    p.add_argument("--connections", type=int, help="keep-alive connections (default 32)")
    p.add_argument("--new-connections", type=int, help="concurrent connections for the new-connection load (16)")
    p.add_argument(
        "--workers", type=int, help="workers per proxy process: sidecar, nginx and HAProxy alike (default 1)"
    )
    p.add_argument("--idle", type=int, help="idle connections for the memory figure (default 1000)")
    p.add_argument("--path", default="/", help="--target: the request path (default /)")
    p.add_argument("--out", type=Path, help="output folder (default bench/results; quick and target: .../tmp)")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temporary folder (configs, logs)")
    p.add_argument("--render", type=Path, metavar="JSON", help="only rewrite the .md and .png of a results .json")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    soak = argv[:1] == ["soak"]
    args = build_soak_parser().parse_args(argv[1:]) if soak else build_parser().parse_args(argv)
    try:
        with sigterm_as_interrupt():
            if soak:
                return run_soak(args)
            if args.render:
                return render(args.render)
            if args.target:
                from . import target

                return target.main(args)
            if args.profile:
                from . import profile

                return profile.run(args, settings_from(args))
            return run(args)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted; everything it started is stopped", file=sys.stderr)
        return 130


def build_soak_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench soak",
        description="Churn, keep-alive, bulk and idle connections plus certificate rotations through our "
        "sidecar pair; fails on any failed connection or unbounded growth of descriptors or memory.",
        epilog="Results go to bench/results/<date>-soak.{md,json,png}; `make soak SOAK_MINUTES=N`.",
    )
    p.add_argument("--minutes", type=float, default=30.0, help="how long the load runs (default 30)")
    p.add_argument("--rotate-every", type=float, default=60.0, help="seconds between rotations (default 60)")
    p.add_argument("--sample-every", type=float, default=5.0, help="seconds between samples (default 5)")
    p.add_argument("--workers", type=int, default=1, help="workers per sidecar (default 1)")
    p.add_argument("--out", type=Path, default=RESULTS, help="report folder (default bench/results)")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temporary folder (configs, logs)")
    return p


def run_soak(args: argparse.Namespace) -> int:
    """Exit 0: no failed connection and no unbounded growth; 1: either (the report says which)."""
    from . import soakreport
    from .soak import Soak, SoakSettings

    if args.minutes <= 0 or args.rotate_every <= 0 or args.sample_every <= 0 or args.workers < 1:
        raise BenchError("--minutes, --rotate-every, --sample-every and --workers must be positive")
    settings = SoakSettings(
        minutes=args.minutes, rotate_every=args.rotate_every, sample_every=args.sample_every, workers=args.workers
    )
    if settings.seconds < 120:  # a short run (a test): idle holds and bulk spacing shrink with it
        quarter = settings.seconds / 4
        settings = replace(settings, idle_hold=(quarter / 4, quarter), bulk_every=quarter, bulk_mb=8)
    with Procs(keep_tmp=args.keep_tmp) as procs:
        run = Soak(settings, procs).run()
    results = soakreport.build(run)
    for path in soakreport.write(results, args.out, f"{date.today().isoformat()}-soak"):
        print(f"bench: wrote {path}", file=sys.stderr)
    print(soakreport.markdown(results))
    return 0 if results["passed"] else 1


def settings_from(args: argparse.Namespace) -> Settings:
    load = ("python" if args.quick else "tools") if args.load == "auto" else args.load
    pairs = tuple(ALL_PAIRS if not args.pairs else [x.strip() for x in args.pairs.split(",") if x.strip()])
    known = ALL_PAIRS + OPT_IN + FORWARDING
    unknown = [x for x in pairs if x not in known]
    if unknown:
        raise BenchError(f"--pairs: unknown {', '.join(unknown)} (known: {', '.join(known)})")
    if getattr(args, "forwarding", False) and "sidecar" in pairs:
        at = pairs.index("sidecar") + 1
        pairs = (*pairs[:at], *(x for x in FORWARDING if x not in pairs), *pairs[at:])
    if getattr(args, "baseline", None) and "sidecar" in pairs:
        at = pairs.index("sidecar") + 1
        pairs = (*pairs[:at], "baseline", *pairs[at:])
    workloads = WORKLOADS
    if getattr(args, "workloads", None):
        workloads = tuple(x.strip() for x in args.workloads.split(",") if x.strip())
        if unknown := [x for x in workloads if x not in ALL_WORKLOADS]:
            raise BenchError(f"--workloads: unknown {', '.join(unknown)} (known: {', '.join(ALL_WORKLOADS)})")
    s = Settings(
        pairs=pairs,
        load=load,
        resume=not args.no_resume,
        quick=args.quick,
        fresh=getattr(args, "fresh", False),
        workloads=workloads,
    )
    if args.quick:
        s = replace(
            s,
            reps=1,
            duration=1.0 if load == "tools" else 0.3,
            threads=1,
            ka_connections=8,
            nc_connections=4,
            idle_connections=20,
            bulk_mb=16,
            settle=0.1,
            idle_hold=0.2,
        )
    overrides = {
        "reps": args.reps,
        "duration": args.duration,
        "threads": args.threads,
        "ka_connections": args.connections,
        "nc_connections": args.new_connections,
        "idle_connections": args.idle,
        "workers": args.workers,
    }
    s = replace(s, **{k: v for k, v in overrides.items() if v is not None})
    if getattr(args, "scaling", None):
        try:
            levels = tuple(int(x) for x in args.scaling.split(",") if x.strip())
        except ValueError:
            raise BenchError(f"--scaling: not a list of numbers: {args.scaling}") from None
        if not levels or min(levels) < 1:
            raise BenchError("--scaling: give one or more positive numbers of connections")
        s = replace(s, scaling=levels)
    if s.reps < 1 or s.duration <= 0 or s.workers < 1:
        raise BenchError("--reps, --duration and --workers must be positive")
    return s


def run(args: argparse.Namespace) -> int:
    found = tools.find()
    settings = settings_from(args)
    if settings.load == "tools":
        require_tools(found)
    mode = "quick" if args.quick else "full"
    out = args.out or (RESULTS / "tmp" if args.quick else RESULTS)
    with Procs(keep_tmp=args.keep_tmp) as procs:
        if "baseline" in settings.pairs:
            PAIRS["baseline"] = Baseline(export_sidecar(args.baseline, procs.folder("baseline-code")))
        bench = Bench(settings, procs, found)
        bench.run()
    notes = list(found.notes)
    if settings.load == "python":
        notes.append("load from the pure-Python client: its numbers measure Python as much as the pairs")
    used = {k: v for k, v in found.versions().items() if k in _used_tools(settings)}
    results = report.build(
        mode=mode,
        settings=asdict(settings),
        samples=bench.samples,
        info=bench.info,
        versions=used,
        backends=bench.backends,
        failures=bench.failures,
        notes=notes,
        pair_order=settings.pairs,
        background=bench.background,
    )
    stem = date.today().isoformat() + (f"-workers{settings.workers}" if settings.workers > 1 else "")
    written = report.write(results, out, stem)
    print(report.markdown(results, None))
    for path in written:
        print(f"bench: wrote {path}", file=sys.stderr)
    return 1 if bench.failures else 0


def render(path: Path) -> int:
    """Re-render a run's markdown and chart from its JSON (after a change to the report's layout)."""
    import json

    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BenchError(f"--render: cannot read {path}: {exc}") from None
    results["ratios"] = report.ratios(results["summary"])
    for path_written in report.write(results, path.parent, path.stem):
        print(f"bench: wrote {path_written}", file=sys.stderr)
    return 0


def export_sidecar(rev: str, into: Path) -> Path:
    """The ``sidecar`` package as of git revision ``rev``, written under ``into``."""
    import subprocess

    repo = Path(__file__).resolve().parent.parent
    try:
        archive = subprocess.run(
            ["git", "-C", str(repo), "archive", rev, "sidecar"], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = exc.stderr.decode(errors="replace").strip() if isinstance(exc, subprocess.CalledProcessError) else exc
        raise BenchError(f"--baseline {rev}: cannot export the sidecar package from git: {detail}") from None
    return into


def _used_tools(settings: Settings) -> set[str]:
    used = {"nginx"} | set(settings.pairs)  # nginx is also the HTTP backend when installed
    if settings.load == "tools":
        used |= {"wrk", "iperf3"}
    return used
