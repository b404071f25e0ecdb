"""deploy/prometheus/alerts.yaml: Prometheus loads it, its unit tests pass (and can fail), and it
asks only for metrics and labels the sidecar really exports (names from a real registry)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit.test_dashboard import SCRAPE_LABELS, exported, parse

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
ALERT_TESTS = ROOT / "tests" / "prometheus" / "alerts-test.yaml"
EXPECTED = {
    "SidecarCertificateExpiringSoon": "warning",
    "SidecarCertificateExpiryCritical": "critical",
    "SidecarCertificateReloadsFailing": "warning",
    "SidecarHandshakeFailuresSpiking": "warning",
    "SidecarDenialsSpiking": "warning",
    "SidecarNotReady": "critical",
}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        print("promtool not found: install it with `apt-get install -y --no-install-recommends prometheus`")
        pytest.skip("promtool is not installed (Debian package `prometheus`)")
    return path


def rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(ALERTS.read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def test_promtool_checks_the_rules() -> None:
    proc = run("check", "rules", str(ALERTS))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(EXPECTED)} rules found" in proc.stdout


def test_promtool_unit_tests_pass() -> None:
    proc = run("test", "rules", str(ALERT_TESTS))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_the_unit_tests_catch_a_wrong_threshold(tmp_path: Path) -> None:
    # the expiry warning moved from 14 to 15 days: the near-miss case of the unit tests must fail
    (tmp_path / "deploy" / "prometheus").mkdir(parents=True)
    (tmp_path / "tests" / "prometheus").mkdir(parents=True)
    text = ALERTS.read_text()
    assert text.count("< 14 * 86400") == 1
    (tmp_path / "deploy" / "prometheus" / "alerts.yaml").write_text(text.replace("< 14 * 86400", "< 15 * 86400"))
    shutil.copy(ALERT_TESTS, tmp_path / "tests" / "prometheus" / "alerts-test.yaml")
    proc = run("test", "rules", "tests/prometheus/alerts-test.yaml", cwd=tmp_path)
    assert proc.returncode != 0
    assert "SidecarCertificateExpiringSoon" in proc.stdout + proc.stderr


def test_every_alert_is_there_with_its_severity_and_words() -> None:
    found = {rule["alert"]: rule for rule in rules()}
    assert {name: rule["labels"]["severity"] for name, rule in found.items()} == EXPECTED
    for rule in found.values():
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        assert "for" in rule  # no alert fires on one bad scrape


def test_every_metric_and_label_in_the_rules_is_exported() -> None:
    real = exported()
    for rule in rules():
        identifiers, selectors, grouping = parse(rule["expr"])
        metrics = {i for i in identifiers if i.startswith("sidecar_")}
        assert metrics, rule["alert"]
        assert metrics <= set(real), (rule["alert"], metrics - set(real))
        known_labels = set().union(*(real[m] for m in metrics)) | SCRAPE_LABELS
        for metric, labels in selectors:
            assert labels <= real[metric] | SCRAPE_LABELS, (rule["alert"], metric, labels)
        assert grouping <= known_labels, (rule["alert"], grouping - known_labels)
