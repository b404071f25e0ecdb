"""The results: medians with min-max, ratios against ``direct`` and the best peer, as markdown, JSON, PNG.

Only this module knows how a metric is titled, which way is better, and how it is printed. The
markdown is what the README pastes; the JSON holds every sample; the chart (matplotlib, the
``bench`` extra) is skipped with a note when matplotlib is missing.
"""

from __future__ import annotations

import json
import os
import platform
import ssl
import statistics
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from .pairs import FORWARDING, PEERS


@dataclass(frozen=True)
class Metric:
    key: str
    title: str
    unit: str
    higher_is_better: bool
    vs_direct: bool = False  # meaningful against no proxy at all


METRICS = [
    Metric("up_gbps", "bulk →", "Gbit/s", True, True),
    Metric("down_gbps", "bulk ←", "Gbit/s", True, True),
    Metric("ka_rate", "keep-alive", "req/s", True, True),
    Metric("ka_p50_ms", "keep-alive p50", "ms", False, True),
    Metric("ka_p99_ms", "keep-alive p99", "ms", False, True),
    Metric("ka_p999_ms", "keep-alive p99.9", "ms", False, True),
    Metric("nc_rate", "new conns, full handshake", "conn/s", True, True),
    Metric("nc_p99_ms", "new conns p99", "ms", False, True),
    Metric("rs_nc_rate", "new conns, resumed", "conn/s", True, True),
    Metric("rs_nc_p99_ms", "resumed p99", "ms", False, True),
    Metric("idle_kb", "idle memory", "KB/conn", False),
    Metric("up_cpu", "CPU bulk →", "s/GB", False),
    Metric("down_cpu", "CPU bulk ←", "s/GB", False),
    Metric("ka_cpu", "CPU keep-alive", "µs/req", False),
    Metric("nc_cpu", "CPU full handshake", "ms/conn", False),
    Metric("rs_nc_cpu", "CPU resumed", "ms/conn", False),
]
BY_KEY = {m.key: m for m in METRICS}
PERFORMANCE = ["up_gbps", "down_gbps", "ka_rate", "ka_p50_ms", "ka_p99_ms", "ka_p999_ms", "nc_rate", "nc_p99_ms"]
PERFORMANCE += ["rs_nc_rate", "rs_nc_p99_ms", "idle_kb"]
COST = ["up_cpu", "down_cpu", "ka_cpu", "nc_cpu", "rs_nc_cpu"]
CHART_THROUGHPUT = ["up_gbps", "down_gbps", "ka_rate", "nc_rate", "rs_nc_rate"]
CHART_COST = ["ka_p99_ms", "nc_p99_ms", "idle_kb", "up_cpu", "down_cpu", "ka_cpu", "nc_cpu"]
NA_RESUME = "n/a¹"


def summarize(samples: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, dict[str, Any]]]:
    return {
        pair: {
            metric: {"median": statistics.median(v), "min": min(v), "max": max(v), "samples": v}
            for metric, v in by_metric.items()
            if v
        }
        for pair, by_metric in samples.items()
    }


def best_peers(summary: dict[str, dict[str, dict[str, Any]]]) -> dict[str, tuple[str, float]]:
    """Per metric: the peer (stunnel, haproxy, nginx) with the best median, and that median."""
    out: dict[str, tuple[str, float]] = {}
    for m in METRICS:
        found = [(p, summary[p][m.key]["median"]) for p in PEERS if m.key in summary.get(p, {})]
        if found:
            out[m.key] = (max if m.higher_is_better else min)(found, key=lambda x: x[1])
    return out


def direct_key(key: str) -> str:
    """``direct`` has no TLS, so nothing to resume: resumed figures compare with its plain new connections."""
    return key.removeprefix("rs_")


def ratios(summary: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, dict[str, float]]]:
    best = best_peers(summary)
    direct = summary.get("direct", {})
    out: dict[str, dict[str, dict[str, float]]] = {"vs_direct": {}, "vs_best_peer": {}}
    for pair, metrics in summary.items():
        for key, s in metrics.items():
            m = BY_KEY.get(key)
            if m is None:
                continue
            base = direct.get(direct_key(key), {}).get("median")
            if m.vs_direct and pair != "direct" and base:
                out["vs_direct"].setdefault(pair, {})[key] = s["median"] / base
            if key in best and best[key][1] and pair != "direct":
                out["vs_best_peer"].setdefault(pair, {})[key] = s["median"] / best[key][1]
    return out


# -- machine and versions ------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    distro = platform.system()
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                distro = line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": mem_gib,
        "os": distro,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "openssl_python": ssl.OPENSSL_VERSION,
    }


def sidecar_version() -> str:
    import sidecar

    version = sidecar.__version__
    try:
        root = Path(__file__).resolve().parent.parent
        commit = subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        if commit:
            version += f" ({commit})"
    except (OSError, subprocess.TimeoutExpired):
        pass
    return version


# -- formatting ----------------------------------------------------------------------------------


def fmt(v: float) -> str:
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def cell(s: dict[str, Any] | None, *, spread: bool = True) -> str:
    if s is None:
        return "—"
    if not spread or len(s["samples"]) < 2:
        return fmt(s["median"])
    return f"{fmt(s['median'])} ({fmt(s['min'])}-{fmt(s['max'])})"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["--:"] * (len(header) - 1)) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return out


def _value(results: dict[str, Any], pair: str, key: str, *, spread: bool = True) -> str:
    p = results["pairs"].get(pair, {})
    if key.startswith("rs_") and p.get("resume_status") == "n/a":
        return NA_RESUME
    return cell(p.get("summary", {}).get(key), spread=spread)


SUMMARY = ["up_gbps", "down_gbps", "ka_rate", "ka_p99_ms", "nc_rate", "rs_nc_rate", "idle_kb", "nc_cpu"]


def _workers_text(n: int) -> str:
    if n == 1:
        return (
            "Every proxy process has one worker (nginx `worker_processes 1`, HAProxy `nbthread 1`, the sidecar "
            "`workers: 1`; stunnel has a thread per connection) "
        )
    return (
        f"Every proxy process has {n} workers (nginx `worker_processes {n}`, HAProxy `nbthread {n}`, the sidecar "
        f"`workers: {n}`; stunnel has a thread per connection) "
    )


def summary_table(results: dict[str, Any]) -> list[str]:
    """The headline: medians only, then the sidecar against the best peer and against no proxy."""
    pairs = [p for p, v in results["pairs"].items() if v.get("summary")]
    header = ["pair"] + [f"{BY_KEY[k].title} {BY_KEY[k].unit}" for k in SUMMARY]
    rows = [[f"`{p}`"] + [_value(results, p, k, spread=False) for k in SUMMARY] for p in pairs]
    r = results["ratios"]
    for ref, label in (("vs_best_peer", "best peer"), ("vs_direct", "direct")):
        vals = r[ref].get("sidecar")
        if vals:
            rows.append([f"*sidecar ÷ {label}*"] + [_ratio(results, "sidecar", k, vals) for k in SUMMARY])
    summary = results["summary"]
    # --baseline REV: the change against its base; sidecar-transparent: what capture costs; HBONE
    # tunnels against our own direct mTLS. Same run.
    for pair, base in (("sidecar", "baseline"), ("sidecar-transparent", "sidecar"), ("sidecar-hbone", "sidecar")):
        if not (summary.get(pair) and summary.get(base)):
            continue
        ab = {
            k: summary[pair][k]["median"] / summary[base][k]["median"]
            for k in SUMMARY
            if k in summary[pair] and k in summary[base] and summary[base][k]["median"]
        }
        rows.append([f"*{pair} ÷ {base}*"] + [_ratio(results, pair, k, ab) for k in SUMMARY])
    return _table(header, rows)


FORWARDING_KEYS = ["ka_rate", "ka_p50_ms", "ka_p99_ms", "ka_cpu"]


def forwarding_table(results: dict[str, Any]) -> list[str]:
    """``--forwarding``: keep-alive through our pair with each identity-forwarding setting, against
    the same pair without (same run, same backend)."""
    summary = results["summary"]
    base = summary.get("sidecar", {})
    shown = [p for p in ("sidecar", *FORWARDING) if summary.get(p)]
    if len(shown) < 2 or not base:
        return []
    header = ["pair"] + [f"{BY_KEY[k].title} {BY_KEY[k].unit}" for k in FORWARDING_KEYS]
    rows = [[f"`{p}`"] + [_value(results, p, k) for k in FORWARDING_KEYS] for p in shown]
    for p in shown[1:]:
        rows.append([f"*{p} ÷ sidecar*"] + [_paired(summary[p].get(k), base.get(k)) for k in FORWARDING_KEYS])
    intro = (
        "**Identity forwarding** (keep-alive; `sidecar-xfcc`: `client_cert_header: xfcc`, `sidecar-proxy`: "
        "`proxy_protocol: tls-full` to nginx's `listen ... proxy_protocol` port, both on the server side; "
        "÷ rows: the median (min-max) of each repetition's ratio, the pairs measured one after the other):"
    )
    return ["", intro, "", *_table(header, rows)]


def _paired(s: dict[str, Any] | None, base: dict[str, Any] | None) -> str:
    """A pair against the base pair, repetition by repetition (samples are in repetition order);
    the ratio of the medians when a repetition is missing on either side."""
    if s is None or base is None or not base["median"]:
        return "—"
    if len(s["samples"]) != len(base["samples"]):
        return f"{s['median'] / base['median']:.2f}x"
    per_rep = [a / b for a, b in zip(s["samples"], base["samples"], strict=True) if b]
    if not per_rep:
        return "—"
    return f"{statistics.median(per_rep):.2f}x ({min(per_rep):.2f}-{max(per_rep):.2f})"


def metric_tables(results: dict[str, Any], *, spread: bool = True) -> list[str]:
    pairs = [p for p, v in results["pairs"].items() if v.get("summary")]
    lines = ["**Throughput, latency, memory** (median (min-max) over the repetitions):", ""]
    header = ["pair"] + [f"{BY_KEY[k].title} {BY_KEY[k].unit}" for k in PERFORMANCE]
    lines += _table(header, [[f"`{p}`"] + [_value(results, p, k, spread=spread) for k in PERFORMANCE] for p in pairs])
    proxied = [p for p in pairs if p != "direct"]
    lines += ["", "**CPU seconds used by the pair's two proxy processes**, per unit of work:", ""]
    header = ["pair"] + [f"{BY_KEY[k].title} {BY_KEY[k].unit}" for k in COST]
    lines += _table(header, [[f"`{p}`"] + [_value(results, p, k, spread=spread) for k in COST] for p in proxied])
    return lines


SCALING_COLUMNS = (("sc_rate", "req/s"), ("sc_p50_ms", "p50 ms"), ("sc_p99_ms", "p99 ms"), ("sc_kb", "RSS KB/conn"))


def scaling_levels(results: dict[str, Any]) -> list[int]:
    keys = {k for p in results["summary"].values() for k in p if k.startswith("sc_rate_")}
    return sorted(int(k.rsplit("_", 1)[1]) for k in keys)


def scaling_table(results: dict[str, Any]) -> list[str]:
    """Per pair and number of connections: medians, and the rate kept against the fewest connections."""
    levels = scaling_levels(results)
    rows = []
    for pair, p in results["pairs"].items():
        summary = p.get("summary", {})
        first = summary.get(f"sc_rate_{levels[0]}", {}).get("median") if levels else None
        for n in levels:
            if f"sc_rate_{n}" not in summary:
                continue
            cells = [cell(summary.get(f"{key}_{n}")) for key, _ in SCALING_COLUMNS]
            kept = f"{summary[f'sc_rate_{n}']['median'] / first:.2f}x" if first else "—"
            rows.append([f"`{pair}`", f"{n:,}", *cells, kept])
    header = ["pair", "connections", *(title for _, title in SCALING_COLUMNS), f"req/s ÷ at {levels[0]:,}"]
    return _table(header, rows)


def scaling_chart(results: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    levels = scaling_levels(results)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    fig.suptitle(f"Keep-alive load at growing numbers of connections: {results['date']} (medians; whiskers min-max)")
    for ax, (key, title) in zip(axes, (SCALING_COLUMNS[0], SCALING_COLUMNS[2], SCALING_COLUMNS[3]), strict=True):
        for pair, p in results["pairs"].items():
            summary = p.get("summary", {})
            xs = [n for n in levels if f"{key}_{n}" in summary]
            if not xs:
                continue
            med = [summary[f"{key}_{n}"]["median"] for n in xs]
            lo = [m - summary[f"{key}_{n}"]["min"] for m, n in zip(med, xs, strict=True)]
            hi = [summary[f"{key}_{n}"]["max"] - m for m, n in zip(med, xs, strict=True)]
            ax.errorbar(xs, med, yerr=[lo, hi], marker="o", capsize=3, label=pair, color=_COLORS.get(pair))
        ax.set_xscale("log")
        if key != "sc_rate":
            ax.set_yscale("log")
        ax.set_xlabel("concurrent keep-alive connections")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def sample_table(results: dict[str, Any]) -> list[str]:
    rows = []
    for pair, p in results["pairs"].items():
        summary = p.get("summary", {})
        for key in PERFORMANCE + COST:
            if key in summary:
                m = BY_KEY[key]
                rows.append([f"`{pair}`", f"{m.title} {m.unit}", " ".join(fmt(v) for v in summary[key]["samples"])])
    return _table(["pair", "metric", "samples"], rows)


def ratio_tables(results: dict[str, Any]) -> list[str]:
    r = results["ratios"]
    lines = ["**Against `direct`** (median ÷ direct's median; throughput: higher is better, latency: lower):", ""]
    keys = [m.key for m in METRICS if m.vs_direct]
    rows = []
    for pair, vals in r["vs_direct"].items():
        rows.append([f"`{pair}`"] + [_ratio(results, pair, k, vals) for k in keys])
    lines += _table(["pair"] + [f"{BY_KEY[k].title}" for k in keys], rows)
    lines += [
        "",
        "**Against the best peer** (median ÷ the best peer's median for that column, best of stunnel, haproxy, "
        "nginx; for throughput higher is better, for latency, memory and CPU lower is better):",
        "",
    ]
    keys = [m.key for m in METRICS]
    rows = []
    for pair, vals in r["vs_best_peer"].items():
        rows.append([f"`{pair}`"] + [_ratio(results, pair, k, vals) for k in keys])
    best = results["best_peer"]
    rows.append(["*best peer*"] + [best[k][0] if k in best else "—" for k in keys])
    lines += _table(["pair"] + [f"{BY_KEY[k].title}" for k in keys], rows)
    return lines


def _ratio(results: dict[str, Any], pair: str, key: str, vals: dict[str, float]) -> str:
    if key.startswith("rs_") and results["pairs"].get(pair, {}).get("resume_status") == "n/a":
        return NA_RESUME
    return f"{vals[key]:.2f}x" if key in vals else "—"


def markdown(results: dict[str, Any], chart: str | None) -> str:
    m = results["machine"]
    s = results["settings"]
    lines = [f"# What mTLS costs: bench run {results['date']}", ""]
    if results["mode"] != "full":
        lines += [
            f"> **{results['mode']} mode**: tiny durations and one repetition, to prove every pair works. "
            "Do not quote these numbers.",
            "",
        ]
    lines += [
        f"Machine: {m['cpu']}, **{m['cores']} cores** shared by everything (load generator, both proxies, "
        f"backend), {m['memory_gib']} GiB, {m['os']}, Linux {m['kernel']}.",
        "",
        f"Method: {_n(s['reps'], 'repetition')}; in each, every pair in turn (order rotated per repetition), "
        f"{s['duration']:g} s per workload{_workloads_text(s)}"
        + (", each workload on a pair started for it alone" if s.get("fresh") else "")
        + f". Load: {_load_text(results)}. Medians with min-max. "
        "Topology: load generator → client-side proxy (plain in, TLS 1.3 mTLS out) → server-side proxy "
        "(client certificate required and verified, plain out) → backend, all on 127.0.0.1, one EC P-256 CA. "
        + _workers_text(s.get("workers", 1))
        + "and writes an access record per connection, like the sidecar. "
        "Peers keep their default buffer sizes (HAProxy `tune.bufsize` and nginx `proxy_buffer_size`, 16 KB): "
        "in a side test, 64 KB raised HAProxy's bulk throughput by a third or more and nginx's by 10-20%. "
        "Latency is taken at saturation (closed loop, every connection busy), so on 2 shared cores p99 is "
        "mostly queueing and scheduling. "
        "CPU is user+system time of the pair's processes over the workload (kernel softirq work for "
        "loopback packets belongs to no process and is not in it). Nothing is pinned to a core."
        + _background_text(results),
        "",
    ]
    if chart:
        lines += [f"![ratios]({chart})", ""]
    lines += ["**Summary** (medians; ranges and every other figure below):", ""]
    lines += summary_table(results)
    lines += forwarding_table(results)
    lines += [""]
    lines += metric_tables(results)
    lines += [
        "",
        'Every proxied pair was measured with client-side session resumption off (the columns without "resumed") '
        "and on.",
        "",
    ]
    if any(p.get("resume_status") == "n/a" for p in results["pairs"].values()):
        lines[-2:-1] = ["¹ this pair cannot resume sessions: every connection is a full handshake."]
    lines += ratio_tables(results)
    if scaling_levels(results):
        lines += ["", "**Scaling**: keep-alive load (wrk, one run per level) at growing numbers of connections:", ""]
        if results.get("scaling_chart"):
            lines += [f"![scaling]({results['scaling_chart']})", ""]
        lines += scaling_table(results)
    lines += ["", "**Every sample**, in the order taken (what a median hides shows here):", ""]
    lines += sample_table(results)
    lines += ["", "**Checks before measuring, and the negotiated middle hop:**", ""]
    rows = []
    for pair, p in results["pairs"].items():
        if p.get("status") in ("skipped",):
            rows.append([f"`{pair}`", p.get("reason", ""), "", "", "", "", ""])
            continue
        c = (p.get("checks") or [{}])[-1]
        neg = (p.get("negotiated") or {}).get("suite") or ("plain TCP" if pair == "direct" else "not logged")
        rows.append(
            [
                f"`{pair}`",
                p.get("status", ""),
                c.get("request", "—"),
                "refused" if "refused_no_client_cert" in c else "—",
                "refused" if "refused_unknown_ca" in c else "—",
                "refused" if "refused_tls12" in c else "—",
                neg,
                _resumed_text(p),
            ]
        )
    lines += _table(
        ["pair", "status", "request through", "no client cert", "unknown CA", "TLS 1.2", "middle hop", "resumed"],
        rows,
    )
    lines += ["", "**Versions:**", ""]
    versions = {"sidecar": results["sidecar_version"], **results["versions"], "Python": m["python"]}
    versions["OpenSSL (Python's, used by the sidecar)"] = m["openssl_python"]
    lines += [f"- {k}: {v}" for k, v in versions.items()]
    if results["failures"]:
        lines += ["", "**Failures:**", ""] + [f"- {f}" for f in results["failures"]]
    notes = list(results["notes"])
    notes += [f"`{pair}`: {n}" for pair, p in results["pairs"].items() for n in p.get("notes", [])]
    if notes:
        lines += ["", "**Notes:**", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _workloads_text(settings: dict[str, Any]) -> str:
    chosen = settings.get("workloads")
    if not chosen or len(chosen) >= 5:
        return ""
    return f" (only {', '.join(chosen)}: `--workloads`)"


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _background_text(results: dict[str, Any]) -> str:
    bg = results.get("background_cpu_pct") or {}
    if bg.get("median") is None:
        return ""
    return (
        f" Processes other than the bench's used a median {bg['median']:.0f}% (max {bg['max']:.0f}%) of the "
        "machine's CPU during the workloads (steal included)."
    )


def _resumed_text(p: dict[str, Any]) -> str:
    summary = p.get("summary", {})
    parts = []
    for key, label in (("nc_resumed_pct", "off"), ("rs_nc_resumed_pct", "on")):
        if key in summary:
            parts.append(f"{label}: {summary[key]['median']:.0f}%")
    if p.get("resume_status") == "n/a":
        parts.append("on: n/a¹")
    return ", ".join(parts) or "—"


def _load_text(results: dict[str, Any]) -> str:
    s = results["settings"]
    b = results["backends"]
    if s["load"] == "tools":
        return (
            f"wrk ({_n(s['threads'], 'thread')}; {s['ka_connections']} keep-alive connections; "
            f"{s['nc_connections']} connections with `Connection: close` for new connections), "
            f"iperf3 (1 stream, → upload and ← `-R`), {s['idle_connections']} idle connections "
            f"(one request each, then held); backends: {b['http']} (HTTP `200 ok`), {b['bulk']}"
        )
    return (
        f"the pure-Python client ({s['ka_connections']} keep-alive connections, {s['nc_connections']} "
        f"new-connection workers, {s['bulk_mb']} MB bulk transfers, {s['idle_connections']} idle connections); "
        f"backends: {b['http']} (HTTP), {b['bulk']} (bulk)"
    )


# -- chart ---------------------------------------------------------------------------------------


def chart(results: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    summary = results["summary"]
    pairs = [p for p in results["pairs"] if p != "direct" and summary.get(p)]
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 6), gridspec_kw={"width_ratios": [5, 7]})
    m = results["machine"]
    fig.suptitle(
        f"What mTLS costs: {results['date']}, {m['cores']} cores, {results['mode']} mode "
        "(median of the repetitions; whiskers min-max)"
    )
    _bars(left, results, pairs, CHART_THROUGHPUT, "direct", "x direct: share of throughput kept (higher is better)")
    _bars(right, results, pairs, CHART_COST, None, "x best peer (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _bars(ax: Any, results: dict[str, Any], pairs: list[str], keys: list[str], ref: str | None, label: str) -> None:
    from matplotlib.ticker import FuncFormatter, NullFormatter

    summary = results["summary"]
    best = results["best_peer"]
    width = 0.8 / max(1, len(pairs))
    shown: list[float] = [1.0]
    missing: list[tuple[float, str]] = []
    for i, pair in enumerate(pairs):
        xs, ys, lo, hi = [], [], [], []
        for j, key in enumerate(keys):
            x = j + (i - (len(pairs) - 1) / 2) * width
            if key.startswith("rs_") and results["pairs"].get(pair, {}).get("resume_status") == "n/a":
                missing.append((x, pair))
                continue
            s = summary[pair].get(key)
            if ref == "direct":
                base = summary.get("direct", {}).get(direct_key(key), {}).get("median")
            else:
                base = best.get(key, ("", 0))[1]
            if s is None or not base:
                continue
            xs.append(x)
            ys.append(s["median"] / base)
            lo.append((s["median"] - s["min"]) / base)
            hi.append((s["max"] - s["median"]) / base)
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=pair, color=_COLORS.get(pair))
        for x, y, h in zip(xs, ys, hi, strict=True):
            ax.text(x, (y + h) * 1.04, f"{y:.2f}", rotation=90, ha="center", va="bottom", fontsize=6)
            shown += [y - 0, y + h]
    bottom, top = min(shown) / 1.6, max(shown) * 1.8
    ax.set_yscale("log")
    ax.set_ylim(bottom, top)
    for x, pair in missing:
        ax.text(
            x,
            bottom * 1.1,
            "n/a (cannot resume)",
            rotation=90,
            ha="center",
            va="bottom",
            fontsize=7,
            color=_COLORS.get(pair),
        )
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([CHART_LABELS.get(k, BY_KEY[k].title) for k in keys], fontsize=8)
    ax.set_ylabel(label)
    ax.set_yticks([t for t in (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50) if bottom <= t <= top])
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(axis="y", alpha=0.3)


CHART_LABELS = {
    "up_gbps": "bulk →\n(Gbit/s)",
    "down_gbps": "bulk ←\n(Gbit/s)",
    "ka_rate": "keep-alive\n(req/s)",
    "nc_rate": "new conns,\nfull handshake",
    "rs_nc_rate": "new conns,\nresumed",
    "ka_p99_ms": "keep-alive\np99",
    "nc_p99_ms": "new conn\np99",
    "idle_kb": "idle memory\n(KB/conn)",
    "up_cpu": "CPU/GB\nbulk →",
    "down_cpu": "CPU/GB\nbulk ←",
    "ka_cpu": "CPU per\nrequest",
    "nc_cpu": "CPU per\nhandshake",
}
_COLORS = {
    "direct": "#000000",
    "sidecar": "#d62728",
    "sidecar-hbone": "#ff7f0e",
    "baseline": "#9467bd",
    "stunnel": "#7f7f7f",
    "haproxy": "#1f77b4",
    "nginx": "#2ca02c",
}


# -- assembling and writing ----------------------------------------------------------------------


def build(
    *,
    mode: str,
    settings: dict[str, Any],
    samples: dict[str, dict[str, list[float]]],
    info: dict[str, dict[str, Any]],
    versions: dict[str, str],
    backends: dict[str, str],
    failures: list[str],
    notes: list[str],
    pair_order: Sequence[str],
    background: Sequence[float] = (),
) -> dict[str, Any]:
    summary = summarize(samples)
    best = best_peers(summary)
    pairs: dict[str, Any] = {}
    for name in pair_order:
        base = dict(info.get(name, {"status": "not run"}))
        resumed = info.get(f"{name}+resume")
        if resumed is not None:
            base["resume_status"] = resumed.get("status")
            if resumed.get("reason"):
                base["resume_reason"] = resumed["reason"]
            base["resume_checks"] = resumed.get("checks", [])
            base["resume_errors"] = resumed.get("errors", [])
        base["summary"] = summary.get(name, {})
        pairs[name] = base
    return {
        "date": datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "mode": mode,
        "settings": settings,
        "machine": machine(),
        "sidecar_version": sidecar_version(),
        "versions": versions,
        "backends": backends,
        "pairs": pairs,
        "summary": summary,
        "best_peer": {k: list(v) for k, v in best.items()},
        "ratios": ratios(summary),
        "background_cpu_pct": {
            "median": statistics.median(background) if background else None,
            "max": max(background) if background else None,
            "per_workload": list(background),
        },
        "failures": failures,
        "notes": notes,
    }


def write(results: dict[str, Any], out_dir: Path, stem: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    png = out_dir / f"{stem}.png"
    has_chart = chart(results, png)
    if has_chart:
        written.append(png)
    else:
        results["notes"].append("no chart: matplotlib is not installed (pip install -e '.[bench]')")
    if scaling_levels(results):
        scaling_png = out_dir / f"{stem}-scaling.png"
        if scaling_chart(results, scaling_png):
            written.append(scaling_png)
            results["scaling_chart"] = scaling_png.name
    md = out_dir / f"{stem}.md"
    md.write_text(markdown(results, png.name if has_chart else None))
    js = out_dir / f"{stem}.json"
    js.write_text(json.dumps(results, indent=1, default=str) + "\n")
    return [md, js, *written]
