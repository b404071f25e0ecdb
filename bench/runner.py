"""One bench run: backends up, then repetitions; in each, every variant in rotated order is started,
checked, measured workload by workload, and stopped.

A variant is a pair with client-side resumption off (all workloads) or on (new connections only:
resumption changes nothing else). With ``fresh`` every workload of a variant gets a pair started for
it alone (checked the first time), so no workload runs on processes another one warmed: a state a
process falls into (its heap, its caches) shows as a spread of samples instead of hiding in a
median. Samples land in ``samples[pair][metric]``, one value per
repetition; resumed-variant metrics carry the ``rs_`` prefix. CPU is the pair's processes'
user + system time over the workload, divided by what the workload moved.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import ORIGINAL_OPENSSL_CONF, backends, checks, load
from . import certs as certs_mod
from .checks import CheckFailed
from .pairs import PAIRS, Ctx, Pair, Running
from .procs import BackgroundMeter, BenchError, Procs, cpu_seconds, raise_fd_limit, rss_kib
from .tools import DEB_PACKAGES, Tools

WORKLOADS = ("idle", "keepalive", "newconn", "bulk_up", "bulk_down")
# Not in a default run (a few minutes per pair): keep-alive load at growing numbers of connections.
ALL_WORKLOADS = (*WORKLOADS, "scaling")
SCALING = (100, 1000, 5000, 10000)
SCALING_TIMEOUT = 30.0  # seconds: a connection's first response waits for the pair's queue of handshakes
MAX_ERROR_FRACTION = 0.01


@dataclass(frozen=True)
class Settings:
    pairs: tuple[str, ...]
    # 5 short repetitions rather than 3 long ones: on a shared machine a median of 5 shrugs off a
    # burst of someone else's work. The full run takes about 8 minutes on 2 cores.
    reps: int = 5
    duration: float = 3.0
    load: str = "tools"  # tools | python
    threads: int = 1  # wrk is the cheapest process here; a second thread only takes CPU from the pair
    ka_connections: int = 32
    nc_connections: int = 16
    idle_connections: int = 1000
    bulk_mb: int = 256  # python load only: bytes per bulk transfer
    resume: bool = True
    quick: bool = False
    workers: int = 1  # per proxy process (sidecar, nginx, HAProxy)
    settle: float = 0.3  # after a workload: let connections close and access records be written
    idle_hold: float = 1.0  # how long idle connections are held before memory is read
    fresh: bool = False  # a newly started pair for every workload, not one pair per repetition
    workloads: tuple[str, ...] = WORKLOADS  # which to run (--workloads)
    scaling: tuple[int, ...] = SCALING  # concurrent keep-alive connections, one wrk run each


@dataclass(frozen=True)
class Variant:
    pair: Pair
    resume: bool
    workloads: tuple[str, ...]

    @property
    def key(self) -> str:
        return self.pair.name + ("+resume" if self.resume else "")


@dataclass
class Bench:
    settings: Settings
    procs: Procs
    tools: Tools
    samples: dict[str, dict[str, list[float]]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(list)))
    info: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    backends: dict[str, str] = field(default_factory=dict)
    background: list[float] = field(default_factory=list)  # % of the machine used by others, per workload

    def env(self) -> dict[str, str]:
        import os

        env = {k: v for k, v in os.environ.items() if k != "OPENSSL_CONF"}
        if ORIGINAL_OPENSSL_CONF is not None:
            env["OPENSSL_CONF"] = ORIGINAL_OPENSSL_CONF
        return env

    def plan(self) -> list[Variant]:
        variants = []
        for name in self.settings.pairs:
            pair = PAIRS[name]
            if not pair.available(self.tools):
                self.info[name] = {"status": "skipped", "reason": f"{pair.tool} is not installed"}
                continue
            applies = pair.workloads or tuple(w for w in ALL_WORKLOADS if pair.proxied or w != "idle")
            workloads = tuple(w for w in self.settings.workloads if w in applies)
            if not workloads:
                self.info[name] = {"status": "skipped", "reason": "none of --workloads applies to it"}
                continue
            variants.append(Variant(pair, False, workloads))
            if not (self.settings.resume and pair.proxied and "newconn" in workloads):
                continue
            if pair.resumption:
                variants.append(Variant(pair, True, ("newconn",)))
            else:
                reason = f"the {name} cannot resume TLS sessions"
                self.info[f"{name}+resume"] = {"status": "n/a", "reason": reason}
        return variants

    def setup(self) -> Ctx:
        """Certificates and backends: what every pair is started with."""
        fd_limit = raise_fd_limit()
        env = self.env()
        certs = certs_mod.make(self.procs.folder("pki"))
        tools_load = self.settings.load == "tools"
        b = backends.start(self.procs, self.tools, env, tools_load=tools_load, fd_limit=fd_limit)
        self.backends = {"http": b.http_kind, "bulk": b.bulk_kind}
        return Ctx(self.procs, self.tools, certs, b, env, fd_limit, self.settings.workers)

    def run(self) -> None:
        s = self.settings
        ctx = self.setup()
        variants = self.plan()
        for rep in range(s.reps):
            shift = rep % len(variants)
            order = variants[shift:] + variants[:shift]
            for variant in order:
                self._variant(ctx, variant, rep)

    def _variant(self, ctx: Ctx, v: Variant, rep: int) -> None:
        info = self.info.setdefault(v.key, {"status": "measured", "checks": [], "errors": [], "notes": []})
        if info["status"] == "failed":
            return
        runs: list[Running] = []
        try:
            if rep == 0 and v.pair.verbose_for_cipher:
                # This proxy names the suite only at a costly log level: read it from a separate,
                # verbose instance, then measure one at its normal level.
                verbose = v.pair.start(ctx, resume=v.resume, verbose=True)
                try:
                    info["negotiated"] = checks.check(verbose, ctx.certs).get("negotiated")
                finally:
                    for proc in verbose.procs:
                        self.procs.stop(proc)
            run: Running | None = None
            for workload in v.workloads:
                if run is None:
                    run = v.pair.start(ctx, resume=v.resume)
                    runs.append(run)
                    if len(info["checks"]) <= rep:  # once per repetition
                        seen = checks.check(run, ctx.certs)
                        info["checks"].append(seen)
                        if seen.get("negotiated", {}).get("suite"):
                            info["negotiated"] = seen["negotiated"]
                meter = BackgroundMeter()
                meter.start()
                values = self.measure(ctx, run, workload, info)
                values_shown = dict(values)
                if (others := meter.percent()) is not None:
                    self.background.append(others)
                    values_shown["others_cpu_pct"] = others
                prefix = "rs_" if v.resume else ""
                for metric, value in values.items():
                    self.samples[v.pair.name][prefix + metric].append(value)
                _progress(rep, self.settings.reps, v.key, workload, values_shown)
                if dead := run.dead():
                    raise BenchError("; ".join(dead))
                if self.settings.fresh:
                    runs.remove(run)
                    self._stop(run)
                    run = None
        except CheckFailed as exc:
            info["status"] = "failed"
            info["errors"].append(f"check: {exc}")
            self.failures.append(f"{v.key}: {exc}")
            print(f"bench: {v.key} FAILED its checks: {exc}", file=sys.stderr)
        except BenchError as exc:
            info["errors"].append(str(exc))
            self.failures.append(f"{v.key} (repetition {rep + 1}): {exc}")
            print(f"bench: {v.key}: {exc}", file=sys.stderr)
        finally:
            for started in runs:
                self._stop(started)

    def _stop(self, run: Running) -> None:
        for proc in run.procs:
            self.procs.stop(proc)
        if run.on_stop is not None:
            run.on_stop()

    def measure(self, ctx: Ctx, run: Running, workload: str, info: dict[str, Any]) -> dict[str, float]:
        """Run one workload against a started pair; its figures (and CPU of the pair's processes)."""
        s = self.settings
        pids = run.pids()
        tools_load = s.load == "tools"
        if workload == "idle":
            res = load.idle(
                run.http_port,
                connections=s.idle_connections,
                rss=lambda: rss_kib(run.pids()),
                settle=s.idle_hold,
                host=run.host,
            )
            if res.failed:
                raise BenchError(f"{res.failed} of {s.idle_connections} idle connections failed")
            return {"idle_kb": res.kib_per_connection}
        if workload == "scaling":
            return self.scaling(ctx, run, info)
        offset = run.log_offset()
        cpu0 = cpu_seconds(pids)
        out: dict[str, float] = {}
        if workload in ("keepalive", "newconn"):
            close = workload == "newconn"
            conns = s.nc_connections if close else s.ka_connections
            if tools_load:
                http = self._wrk(ctx, run, conns, s.duration, close=close)
            else:
                http = load.py_http(run.http_port, connections=conns, duration=s.duration, close=close, host=run.host)
            cpu = cpu_seconds(pids) - cpu0
            if http.requests == 0:
                raise BenchError(f"{workload}: no request succeeded ({http.errors} errors)")
            if http.errors > MAX_ERROR_FRACTION * http.requests:
                raise BenchError(f"{workload}: {http.errors} errors in {http.requests} requests")
            if http.errors:
                info["notes"].append(f"{workload}: {http.errors} errors in {http.requests} requests")
            p = "nc" if close else "ka"
            out = {f"{p}_rate": http.rate, f"{p}_p50_ms": http.p50_ms, f"{p}_p99_ms": http.p99_ms}
            if http.p999_ms is not None:
                out[f"{p}_p999_ms"] = http.p999_ms
            if run.procs:
                out[f"{p}_cpu"] = cpu / http.requests * (1e3 if close else 1e6)  # ms per conn, µs per request
            if close and run.parse is not None:
                time.sleep(s.settle)
                shakes = run.handshakes_since(offset)
                if len(shakes) < 0.95 * http.requests:
                    # Fewer middle-hop connections than requests: the proxy pooled them, so these
                    # were not full mTLS handshakes each. Say so rather than report the rate.
                    raise BenchError(f"newconn: {len(shakes)} middle-hop connections for {http.requests} requests")
                flagged = [h.resumed for h in shakes if h.resumed is not None]
                if flagged:
                    out["nc_resumed_pct"] = 100.0 * sum(flagged) / len(flagged)
        else:
            reverse = workload == "bulk_down"
            if tools_load:
                iperf3 = ctx.tools.path("iperf3")
                bulk = load.iperf3(
                    self.procs, iperf3, run.bulk_port, duration=s.duration, reverse=reverse, env=ctx.env, host=run.host
                )
            else:
                bulk = load.py_bulk(run.bulk_port, size=s.bulk_mb << 20, reverse=reverse, host=run.host)
            cpu = cpu_seconds(pids) - cpu0
            p = "down" if reverse else "up"
            out = {f"{p}_gbps": bulk.gbps}
            if run.procs and bulk.bytes:
                out[f"{p}_cpu"] = cpu / (bulk.bytes / 1e9)
        time.sleep(s.settle)
        return out

    def _wrk(
        self,
        ctx: Ctx,
        run: Running,
        connections: int,
        duration: float,
        *,
        close: bool,
        during: Callable[[], None] | None = None,
        timeout: float = 5.0,
    ) -> load.HTTPResult:
        return load.wrk(
            self.procs,
            ctx.tools.path("wrk"),
            f"http://{run.url_host}:{run.http_port}/",
            threads=self.settings.threads,
            connections=connections,
            duration=duration,
            close=close,
            env=ctx.env,
            during=during,
            during_at=0.9,
            timeout=timeout,
        )

    def scaling_levels(self, ctx: Ctx) -> list[int]:
        """The levels that fit: a proxy holds two sockets per proxied connection, and no process
        here may open more than the hard limit of files (raising it needs a capability)."""
        most = (ctx.fd_limit - 200) // 2
        return sorted({min(n, most) for n in self.settings.scaling})

    def scaling(self, ctx: Ctx, run: Running, info: dict[str, Any]) -> dict[str, float]:
        """Keep-alive load at each level; RSS per connection read near the end of the run, when all
        of them are open. wrk opens every connection first (a full handshake each on the middle hop,
        a few hundred a second here): each run is longer by 4 ms per connection and waits up to
        ``SCALING_TIMEOUT`` for a response, and that ramp is part of its figures."""
        s = self.settings
        if s.load != "tools":
            raise BenchError("scaling needs wrk (--load tools)")
        out: dict[str, float] = {}
        for n in self.scaling_levels(ctx):
            before = rss_kib(run.pids())
            held: list[int] = []

            def probe(held: list[int] = held) -> None:
                held.append(rss_kib(run.pids()))

            http = self._wrk(ctx, run, n, s.duration + n / 250, close=False, during=probe, timeout=SCALING_TIMEOUT)
            if http.requests == 0 or http.errors > MAX_ERROR_FRACTION * http.requests:
                info["notes"].append(f"scaling, {n} connections: {http.errors} errors in {http.requests} requests")
                continue
            out[f"sc_rate_{n}"] = http.rate
            out[f"sc_p50_ms_{n}"] = http.p50_ms
            out[f"sc_p99_ms_{n}"] = http.p99_ms
            if run.procs and held:
                out[f"sc_kb_{n}"] = (held[0] - before) / n
            time.sleep(s.settle + n / 2000)  # let the connections close
        return out


def _progress(rep: int, reps: int, key: str, workload: str, values: dict[str, float]) -> None:
    shown = ", ".join(f"{k}={v:,.3g}" for k, v in values.items())
    print(f"bench: [{rep + 1}/{reps}] {key:<16} {workload:<9} {shown}", file=sys.stderr, flush=True)


def require_tools(tools: Tools) -> None:
    missing = [t for t in ("wrk", "iperf3") if not tools.has(t)]
    if missing:
        raise BenchError(
            f"{' and '.join(missing)} not installed: run `make bench-deps` (apt-get install {DEB_PACKAGES}),"
            " or use --load python (numbers then measure Python as much as the pairs)"
        )
