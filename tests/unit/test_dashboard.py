"""deploy/grafana/sidecar-dashboard.json asks only for metrics and labels the sidecar really exports.

The names come from a real ``Metrics()`` registry, so renaming a metric without the dashboard (or
the other way round) fails here, not on an operator's screen.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.metrics import Metrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "sidecar-dashboard.json"

SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("_sum", "_count", "_created"),
}
PROMQL_WORDS = {
    # aggregations and their modifiers
    *("sum", "min", "max", "avg", "count", "group", "stddev", "stdvar", "topk", "bottomk", "quantile"),
    *("by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"),
    # functions
    *("rate", "irate", "increase", "delta", "idelta", "histogram_quantile", "time", "vector", "scalar", "abs"),
    *("clamp_min", "clamp_max", "sort", "sort_desc", "absent", "changes", "resets", "timestamp", "deriv"),
    *("min_over_time", "max_over_time", "avg_over_time", "last_over_time", "label_replace"),
    # Grafana's templating helper
    "label_values",
}
SCRAPE_LABELS = {"job", "instance"}  # added by Prometheus, not by the sidecar
IDENT = r"[a-zA-Z_:][a-zA-Z0-9_:]*"


def exported() -> dict[str, set[str]]:
    """Every series name a real registry exposes, with the label names it carries."""
    m = Metrics()
    m.for_listener("l", "inbound")
    m.cert_expiry.labels(cert="identity").set(0)
    names: dict[str, set[str]] = {}
    for family in m.registry.collect():
        for suffix in SUFFIXES[family.type]:
            names.setdefault(family.name + suffix, set())
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def queries(dash: dict[str, Any]) -> list[str]:
    out = [t["expr"] for p in all_panels(dash["panels"]) for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            q = var["query"]
            out.append(q["query"] if isinstance(q, dict) else q)
    return out


def parse(expr: str) -> tuple[set[str], list[tuple[str, set[str]]], set[str]]:
    """(identifiers outside label matchers, [(metric, its matcher labels)], labels named in by/without/on)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals hold regexes and $variables
    selectors = [
        (name, set(re.findall(rf"({IDENT})\s*(?:=~|!~|!=|=)", body)))
        for name, body in re.findall(rf"({IDENT})\s*\{{([^}}]*)\}}", text)
    ]
    grouping = set()
    for label in re.findall(rf"label_values\(.*,\s*({IDENT})\s*\)", text):  # Grafana: label_values(metric, label)
        grouping.add(label)
    text = re.sub(rf"label_values\((.*),\s*{IDENT}\s*\)", r"label_values(\1)", text)
    for body in re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", text):
        grouping |= {label.strip() for label in body.split(",") if label.strip()}
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1", text)
    text = re.sub(r"\$\w+", " ", text)
    text = re.sub(r"\b\d+(\.\d+)?([eE][+-]?\d+)?\b", " ", text)
    return set(re.findall(IDENT, text)), selectors, grouping


def test_dashboard_is_valid_grafana_json_with_unique_panel_ids() -> None:
    dash = dashboard()
    assert dash["title"] and dash["uid"] and dash["schemaVersion"] >= 36
    panels = list(all_panels(dash["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]), panel["title"]
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"]), panel["title"]
    names = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "job", "instance", "listener"} <= names


def test_every_metric_and_label_in_the_dashboard_is_exported() -> None:
    real = exported()
    exprs = queries(dashboard())
    assert exprs
    for expr in exprs:
        identifiers, selectors, grouping = parse(expr)
        metrics = {i for i in identifiers if i not in PROMQL_WORDS}
        unknown = {m for m in metrics if m not in real}
        assert not unknown, f"{expr}\n  names the sidecar does not export: {sorted(unknown)}"
        allowed = set().union(*(real[m] for m in metrics)) | SCRAPE_LABELS if metrics else SCRAPE_LABELS
        for name, labels in selectors:
            assert labels <= real[name] | SCRAPE_LABELS, f"{expr}\n  {name} has no label(s) {labels - real[name]}"
        assert grouping <= allowed, f"{expr}\n  grouping by unknown label(s) {grouping - allowed}"


def test_the_operator_panels_are_there() -> None:
    exprs = queries(dashboard())

    def some(pattern: str) -> bool:
        return any(re.search(pattern, e) for e in exprs)

    assert some(r"sum by \(outcome\) \(rate\(sidecar_connections_total")
    assert some(r"rate\(sidecar_bytes_total.*") and some(r"by \(listener, flow\)")
    assert sum(bool(re.search(r"histogram_quantile\(.*sidecar_handshake_seconds_bucket", e)) for e in exprs) >= 3
    assert some(r"sum by \(reason\) \(rate\(sidecar_handshake_failures_total")
    assert some(r'sidecar_cert_expiry_timestamp_seconds\{[^}]*cert="identity"[^}]*\}\) - time\(\)')
    assert some(r"sidecar_cert_expiry_timestamp_seconds\{[^}]*\} - time\(\)")
    assert some(r"sum by \(result\) \(increase\(sidecar_cert_reloads_total")


def test_the_parser_of_this_test_catches_mistakes() -> None:
    # guards the checks above: a misspelt metric, a missing label and a stray grouping are all seen
    real = exported()
    identifiers, selectors, grouping = parse(
        'sum by (flavour) (rate(sidecar_conections_total{job=~"$job",colour="x"}[$__rate_interval])) > 0.5'
    )
    assert {i for i in identifiers if i not in PROMQL_WORDS} == {"sidecar_conections_total"}
    assert "sidecar_conections_total" not in real
    assert selectors == [("sidecar_conections_total", {"job", "colour"})]
    assert grouping == {"flavour"}


def test_promtool_parses_every_expression(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        print("promtool not found: install it with `apt-get install -y --no-install-recommends prometheus`")
        pytest.skip("promtool is not installed (Debian package `prometheus`)")
    dash = dashboard()
    exprs = [t["expr"] for p in all_panels(dash["panels"]) for t in p.get("targets", [])]
    concrete = [
        e.replace("$__rate_interval", "5m").replace("$job", ".*").replace("$instance", ".*").replace("$listener", ".*")
        for e in exprs
    ]
    rules = {
        "groups": [
            {"name": "dashboard", "rules": [{"record": f"dash:expr{i}", "expr": e} for i, e in enumerate(concrete)]}
        ]
    }
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    proc = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
