"""The configs we ship as examples must load: a README that shows a broken config lies."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar import config

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "config").rglob("*.yaml"))


def test_there_are_examples() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"sidecar.yaml", "inbound.yaml", "outbound.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(ROOT)))
def test_example_config_loads(path: Path) -> None:
    cfg = config.load(path)
    assert cfg.inbound or cfg.outbound or cfg.transparent or cfg.hbone
    for inbound in cfg.inbound:
        assert inbound.allow, "an inbound listener without allow would refuse everyone"
