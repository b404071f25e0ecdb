"""The soak's verdict and report: trends of descriptors and memory, failures, markdown, JSON, a chart.

Growth criterion (the same for open descriptors and RSS, per sidecar process): the first half of
the run is warm-up (allocator arenas, caches, the first rotations); over the second half a
least-squares line is fitted, and the growth it predicts across that half must stay within a
tolerance of max(floor, 10% of the second half's median): 16 descriptors, 8 MiB. A leak grows
on and on and exceeds it; a process that has settled wanders around a level and does not. With
fewer than 4 samples in the second half, or a second half shorter than four minutes (a run of
under eight minutes is still warming up: a two-minute run grew RSS by 5 of the 8 MiB in its second
half), the trend is reported, not judged; failures, rotations and the at-rest check still are. At
rest: two seconds after the load stopped and closed everything, each process must hold no more
than 4 descriptors more than before the load began (what a leak of sockets or files shows
plainest).
The run passes when the load saw no failed connection, both sidecars logged every connection
``ok``, every rotation was seen, and every check of growth holds.
"""

from __future__ import annotations

import itertools
import json
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .soak import SoakRun

SIDES = ("client", "server")
TOLERANCES = {"fds": (16.0, 0.10), "rss_kib": (8192.0, 0.10)}  # (floor, fraction of the level)
MIN_SECOND_HALF = 4
MIN_SECOND_HALF_SECONDS = 240.0
REST_FD_SLACK = 4
UNITS = {"fds": "descriptors", "rss_kib": "KiB"}


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of value over time, per second."""
    if len(points) < 2:
        return 0.0
    mean_t = statistics.fmean(t for t, _ in points)
    mean_v = statistics.fmean(v for _, v in points)
    spread = sum((t - mean_t) ** 2 for t, _ in points)
    return sum((t - mean_t) * (v - mean_v) for t, v in points) / spread if spread else 0.0


def trend(points: list[tuple[float, float]], metric: str) -> dict[str, Any]:
    floor, fraction = TOLERANCES[metric]
    middle = (points[0][0] + points[-1][0]) / 2
    first = [(t, v) for t, v in points if t < middle]
    second = [(t, v) for t, v in points if t >= middle]
    out: dict[str, Any] = {
        "first": points[0][1],
        "last": points[-1][1],
        "min": min(v for _, v in points),
        "max": max(v for _, v in points),
        "first_half_mean": statistics.fmean(v for _, v in first) if first else None,
        "second_half_mean": statistics.fmean(v for _, v in second) if second else None,
        "first_half_slope_per_min": slope(first) * 60,
        "second_half_slope_per_min": slope(second) * 60,
    }
    if len(second) < MIN_SECOND_HALF or second[-1][0] - second[0][0] < MIN_SECOND_HALF_SECONDS:
        return {**out, "judged": False, "ok": True}
    growth = slope(second) * (second[-1][0] - second[0][0])
    tolerance = max(floor, fraction * statistics.median(v for _, v in second))
    return {**out, "judged": True, "growth": growth, "tolerance": tolerance, "ok": growth <= tolerance}


def build(run: SoakRun) -> dict[str, Any]:
    samples = [asdict(s) for s in run.samples]
    trends = {
        side: {metric: trend([(s["t"], float(s[metric][side])) for s in samples], metric) for metric in TOLERANCES}
        for side in SIDES
    }
    assert run.baseline is not None and run.drained is not None
    last = asdict(run.drained)
    rest = {
        side: {
            "fds_before": run.baseline.fds[side],
            "fds_after": run.drained.fds[side],
            "rss_kib_before": run.baseline.rss_kib[side],
            "rss_kib_after": run.drained.rss_kib[side],
        }
        for side in SIDES
    }
    not_ok = {side: {k: v for k, v in run.outcomes.get(side, {}).items() if k != "ok"} for side in SIDES}
    failures = []
    if run.error_count:
        failures.append(f"{run.error_count} failed operations in the load")
    for side in SIDES:
        if not_ok[side]:
            failures.append(f"{side} sidecar logged connections not ok: {not_ok[side]}")
        if rest[side]["fds_after"] > rest[side]["fds_before"] + REST_FD_SLACK:
            failures.append(
                f"{side} holds {rest[side]['fds_after']} descriptors at rest after the load, "
                f"{rest[side]['fds_before']} before it"
            )
        for metric, t in trends[side].items():
            if not t["ok"]:
                failures.append(
                    f"{side} {metric}: grew {t['growth']:.0f} over the second half (tolerance {t['tolerance']:.0f})"
                )
    return {
        "kind": "soak",
        "settings": asdict(run.settings),
        "info": run.info,
        "duration_s": last["t"],
        "totals": {
            "requests": last["requests"],
            "connections": last["connections"],
            "bulk_bytes": last["bulk_bytes"],
            "errors": run.error_count,
            "rotations": len(run.rotations),
            "reloads": last["reloads"],
        },
        "outcomes": run.outcomes,
        "rotations": run.rotations,
        "errors": run.errors,
        "trends": trends,
        "rest": rest,
        "failures": failures,
        "passed": not failures and len(samples) >= 2,
        "samples": samples,
    }


def markdown(results: dict[str, Any]) -> str:
    s, totals = results["settings"], results["totals"]
    minutes = results["duration_s"] / 60
    lines = [
        f"# Soak: {minutes:.1f} minutes through the sidecar pair, {'PASSED' if results['passed'] else 'FAILED'}",
        "",
        f"Load, all at once: {s['churn_workers']} churn workers (one request per connection), "
        f"{s['keepalive_connections']} keep-alive connections, {s['idle_connections']} idle connections "
        f"(held {s['idle_hold'][0]:.0f}-{s['idle_hold'][1]:.0f} s, then used), a {s['bulk_mb']} MiB bulk transfer "
        f"every {s['bulk_every']:.0f} s, both certificates re-issued every {s['rotate_every']:.0f} s; "
        f"sampled every {s['sample_every']:.0f} s. Workers per sidecar: {s['workers']}; "
        f"{results['info'].get('cores')} cores; backends {results['info'].get('backends')}.",
        "",
        f"- requests: {totals['requests']:,} ({totals['requests'] / max(results['duration_s'], 1e-9):,.0f}/s), "
        f"connections opened by the load: {totals['connections']:,}, bulk: {totals['bulk_bytes'] / 2**30:.2f} GiB",
        f"- failed operations in the load: {totals['errors']}",
        f"- rotations: {totals['rotations']} written, each seen by a new handshake after "
        + (
            f"{max(r['seen_after_s'] for r in results['rotations']):.2f} s at most"
            if results["rotations"]
            else "(none in a run this short)"
        )
        + f"; reloads logged: {totals['reloads']}",
        f"- access records by outcome: {results['outcomes']}",
        "",
        "| process | metric | first | min | max | last | 1st half mean | 2nd half mean | 2nd half slope/min "
        "| growth over 2nd half | tolerance | verdict |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for side, metrics in results["trends"].items():
        for metric, t in metrics.items():
            verdict = ("ok" if t["ok"] else "**GROWS**") if t["judged"] else "not judged (run too short)"
            growth = f"{t['growth']:.0f}" if t["judged"] else "-"
            tolerance = f"{t['tolerance']:.0f}" if t["judged"] else "-"
            lines.append(
                f"| {side} | {metric} ({UNITS[metric]}) | {t['first']:.0f} | {t['min']:.0f} | {t['max']:.0f} "
                f"| {t['last']:.0f} | {_num(t['first_half_mean'])} | {_num(t['second_half_mean'])} "
                f"| {t['second_half_slope_per_min']:+.1f} | {growth} | {tolerance} | {verdict} |"
            )
    lines += ["", "| process | descriptors before the load | after it, at rest | RSS before (MiB) | after (MiB) |"]
    lines += ["| --- | ---: | ---: | ---: | ---: |"]
    for side, r in results["rest"].items():
        lines.append(
            f"| {side} | {r['fds_before']} | {r['fds_after']} | {r['rss_kib_before'] / 1024:.1f} "
            f"| {r['rss_kib_after'] / 1024:.1f} |"
        )
    lines += ["", "Criteria (bench/soakreport.py): the growth a least-squares line over the second half predicts"]
    lines += ["across it stays within max(16 descriptors or 8 MiB, 10% of the second half's median); at rest"]
    lines += [f"after the load, at most {REST_FD_SLACK} descriptors more than before it."]
    if results["failures"]:
        lines += ["", "## Failures", "", *(f"- {f}" for f in results["failures"])]
    if results["errors"]:
        lines += ["", "## First errors", "", *(f"- {e}" for e in results["errors"])]
    return "\n".join(lines) + "\n"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def chart(results: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    samples = results["samples"]
    minutes = [s["t"] / 60 for s in samples]
    fig, (fds, rss, rate) = plt.subplots(3, 1, figsize=(11, 9), sharex=True)
    fig.suptitle(f"Soak through the sidecar pair: {'passed' if results['passed'] else 'FAILED'}")
    for side, style in zip(SIDES, ("-", "--"), strict=True):
        fds.plot(minutes, [s["fds"][side] for s in samples], style, label=f"{side} sidecar")
        rss.plot(minutes, [s["rss_kib"][side] / 1024 for s in samples], style, label=f"{side} sidecar")
    fds.plot(minutes, [s["open_connections"] for s in samples], label="load's open connections", linestyle=":")
    fds.set_ylabel("open descriptors")
    rss.set_ylabel("RSS (MiB)")
    rates = [0.0] + [
        (b["requests"] - a["requests"]) / max(b["t"] - a["t"], 1e-9) for a, b in itertools.pairwise(samples)
    ]
    rate.plot(minutes, rates, label="requests/s")
    errors = rate.twinx()
    errors.plot(minutes, [s["errors"] for s in samples], color="red", label="failed operations (cumulative)")
    errors.set_ylabel("failed operations", color="red")
    errors.set_ylim(bottom=0, top=max(1, max(s["errors"] for s in samples)) * 1.2)
    errors.legend(loc="lower left", fontsize="small")
    rate.set_ylabel("requests/s")
    rate.set_xlabel("minutes")
    for ax in (fds, rss, rate):
        for rotation in results["rotations"]:
            ax.axvline(rotation["t"] / 60, color="grey", linestyle="--", linewidth=0.6)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize="small")
    rate.set_title("dashed lines: certificate rotations", fontsize="small", loc="right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(results: dict[str, Any], out_dir: Path, stem: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / f"{stem}.json", out_dir / f"{stem}.md"]
    written[0].write_text(json.dumps(results, indent=1) + "\n")
    written[1].write_text(markdown(results))
    png = out_dir / f"{stem}.png"
    if chart(results, png):
        written.append(png)
    return written
