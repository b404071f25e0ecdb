"""docs/security.md names, for each threat, the tests that prove its defence: every test it names
exists (``path::name``, or ``::name`` in the file named last), and every named test file too."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "security.md"


def named_tests() -> list[tuple[str, str | None]]:
    current: str | None = None
    out: list[tuple[str, str | None]] = []
    for m in re.finditer(r"`(tests/[\w/]+\.py)(?:::(\w+))?`|`::(\w+)`", DOC.read_text()):
        if m.group(1):
            current = m.group(1)
            out.append((current, m.group(2)))
        else:
            assert current is not None, f"::{m.group(3)} before any file is named"
            out.append((current, m.group(3)))
    return out


def test_every_test_the_security_doc_names_exists() -> None:
    named = named_tests()
    assert len(named) > 30
    missing = [
        (path, name)
        for path, name in named
        if not (ROOT / path).is_file() or (name and f"def {name}(" not in (ROOT / path).read_text())
    ]
    assert not missing


def test_every_row_names_a_test_or_says_when_it_will() -> None:
    rows = [line for line in DOC.read_text().splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) >= 12
    for row in rows:
        assert "tests/" in row or "to be added when" in row, row
