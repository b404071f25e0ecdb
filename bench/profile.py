"""``python -m bench --profile``: where our sidecar pair's CPU goes, workload by workload.

Starts the backends and a sidecar pair (client-side resumption on, as it ships), checks it like
the bench does, then for each workload records both sidecar processes with py-spy while the load
runs. For each process it reports the user/system split of its CPU (from /proc: system time is the
kernel's work for our syscalls), the functions where samples end (*self*: for a C call such as
``SSLObject.do_handshake`` or ``transport.write`` that is time inside OpenSSL or uvloop), and the
frames samples pass through (*total*). py-spy leaves out samples where the process sleeps in
``epoll_wait``, so shares are of busy time.

Writes ``<date>-profile.md`` and, per workload and side, the collapsed stacks
``<date>-profile/<workload>-<side>.txt`` (flamegraph.pl, inferno or speedscope draw them).
"""

from __future__ import annotations

import argparse
import math
import re
import shutil
import sys
from collections import Counter
from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path

from . import checks, tools
from .pairs import PAIRS
from .procs import BenchError, Procs, cpu_split
from .runner import Bench, Settings, require_tools

WORKLOADS = ("keepalive", "newconn", "bulk_up", "bulk_down")
SIDES = ("client", "server")
RATE = 250  # samples a second: enough for 1% resolution in a few seconds, light on the target
TOP = 12
TRUNK = 0.9  # a frame on this share of the stacks is the trunk, left out of *total*
PROFILE_SECONDS = 5.0  # per workload: 1,250 samples a process
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


@dataclass
class Profile:
    """One process under one workload."""

    workload: str
    side: str
    stacks: Counter[tuple[str, ...]]  # collapsed stacks, frames outermost first, line numbers dropped
    user_s: float
    system_s: float

    @property
    def samples(self) -> int:
        return sum(self.stacks.values())

    def self_share(self) -> list[tuple[str, float]]:
        leaves: Counter[str] = Counter()
        for stack, n in self.stacks.items():
            leaves[stack[-1]] += n
        return _shares(leaves, self.samples)

    def total_share(self) -> list[tuple[str, float]]:
        """Frames below the trunk: those on nearly every stack (main, the loop's run) say nothing."""
        through: Counter[str] = Counter()
        for stack, n in self.stacks.items():
            for frame in set(stack):  # a recursive frame counts once per sample
                through[frame] += n
        branches = Counter({f: n for f, n in through.items() if n < TRUNK * self.samples})
        return _shares(branches, self.samples)


def parse_collapsed(text: str) -> Counter[tuple[str, ...]]:
    """py-spy's ``--format raw``: ``frame;frame;... COUNT`` a line, frame ``func (file:line)``."""
    stacks: Counter[tuple[str, ...]] = Counter()
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        # --subprocesses puts a "process PID:CMDLINE" frame on top: the file already says which process
        frames = [_frame_name(f) for f in stack.split(";") if f and not f.startswith("process ")]
        if frames:
            stacks[tuple(frames)] += int(count)
    return stacks


def _frame_name(frame: str) -> str:
    """``Leg.send (sidecar/pump.py:120)`` -> ``Leg.send (pump.py)``: lines of one function merge."""
    m = _FRAME.match(frame)
    if m is None:
        return frame
    return f"{m['func']} ({Path(m['file']).name})"


def _shares(counts: Counter[str], total: int) -> list[tuple[str, float]]:
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:TOP]  # ties by name: stable output
    return [(name, 100.0 * n / total) for name, n in ranked] if total else []


def find_py_spy() -> str:
    beside = Path(sys.executable).with_name("py-spy")
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if not found:
        raise BenchError("py-spy not installed: `make venv` installs it (the bench extra), or `pip install py-spy`")
    return found


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.duration is None:
        settings = replace(settings, duration=PROFILE_SECONDS)
    found = tools.find()
    if settings.load == "tools":
        require_tools(found)
    py_spy = find_py_spy()
    pair = settings.pairs[0] if args.pairs else "sidecar"
    if pair not in ("sidecar", "sidecar-hbone"):
        raise BenchError(f"--profile profiles one of our pairs: sidecar or sidecar-hbone, not {pair}")
    out = args.out or Path(__file__).resolve().parent / "results"
    profiles: list[Profile] = []
    with Procs(keep_tmp=args.keep_tmp) as procs:
        bench = Bench(settings, procs, found)
        ctx = bench.setup()
        running = PAIRS[pair].start(ctx, resume=settings.resume)
        checks.check(running, ctx.certs)
        sides = dict(zip(SIDES, running.procs, strict=True))  # Running.procs is (client, server)
        for workload in WORKLOADS:
            spies = {}
            for side, proc in sides.items():
                raw = procs.folder("profile") / f"{workload}-{side}.txt"
                argv = [py_spy, "record", "--pid", str(proc.pid), "--rate", str(RATE), "--format", "raw"]
                argv += ["--nonblocking", "--subprocesses", "--duration", str(math.ceil(settings.duration) + 1)]
                spies[side] = (procs.start(f"py-spy-{side}", [*argv, "-o", str(raw)], env=ctx.env), raw)
            for spy, _ in spies.values():
                spy.wait_for(lambda text: "Sampling process" in text, "py-spy attached")
            before = {side: cpu_split(proc.pids()) for side, proc in sides.items()}
            values = bench.measure(ctx, running, workload, {"notes": []})
            for side, proc in sides.items():
                spy, raw = spies[side]
                spy.wait_for(lambda text: "Wrote raw" in text, "py-spy's samples", timeout=settings.duration + 30)
                (u1, s1), (u0, s0) = cpu_split(proc.pids()), before[side]
                profiles.append(Profile(workload, side, parse_collapsed(raw.read_text()), u1 - u0, s1 - s0))
                procs.stop(spy)
            shown = ", ".join(f"{k}={v:,.3g}" for k, v in values.items())
            print(f"bench: profiled {workload}: {shown}", file=sys.stderr, flush=True)
        suffix = "" if pair == "sidecar" else f"-{pair}"
        stem = f"{date.today().isoformat()}-profile{suffix}"
        written = write(profiles, out, stem, procs.tmp / "profile", settings, pair)
    for path in written:
        print(f"bench: wrote {path}", file=sys.stderr)
    return 0


def write(
    profiles: list[Profile], out: Path, stem: str, raw_dir: Path, settings: Settings, pair: str = "sidecar"
) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    stacks = out / stem
    stacks.mkdir(exist_ok=True)
    written = []
    for raw in sorted(raw_dir.glob("*.txt")):
        written.append(shutil.copy(raw, stacks / raw.name))
    md = out / f"{stem}.md"
    md.write_text(markdown(profiles, settings, pair))
    return [md, *map(Path, written)]


def markdown(profiles: list[Profile], settings: Settings, pair: str = "sidecar") -> str:
    lines = [
        f"# Where the `{pair}` pair's CPU goes ({date.today().isoformat()})",
        "",
        f"`python -m bench --profile`: py-spy at {RATE} Hz (`--nonblocking`) on the client-side and the",
        f"server-side sidecar ({settings.workers} worker(s) each), {settings.duration:g} s per workload, load from",
        f"{'wrk and iperf3' if settings.load == 'tools' else 'the pure-Python client'}, client-side resumption"
        f" {'on' if settings.resume else 'off'}. *self*: samples that end in the function (a C call's time",
        "is its caller's self time: OpenSSL under `do_handshake`/`read`/`write`, uvloop's own loop (epoll,",
        "recv, callbacks' C parts) under `Runner.run`, the send system call under the callers of",
        "`transport.write`); *total*: samples that pass through it, leaving out the trunk every stack shares.",
        "Shares are of busy samples; user/system is the process's CPU from /proc over the same interval.",
    ]
    for p in profiles:
        cpu = p.user_s + p.system_s
        system_pct = 100.0 * p.system_s / cpu if cpu else 0.0
        lines += [
            "",
            f"## {p.workload}, {p.side} side",
            "",
            f"{p.samples} busy samples; CPU {cpu:.2f} s, {system_pct:.0f}% of it in the kernel (system time).",
            "",
            "| self % | function | | total % | function |",
            "| ---: | --- | --- | ---: | --- |",
        ]
        selfs, totals = p.self_share(), p.total_share()
        for i in range(max(len(selfs), len(totals))):
            a = selfs[i] if i < len(selfs) else ("", None)
            b = totals[i] if i < len(totals) else ("", None)
            lines.append(f"| {_pct(a[1])} | `{a[0]}` | | {_pct(b[1])} | `{b[0]}` |".replace("``", ""))
    return "\n".join(lines) + "\n"


def _pct(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"
