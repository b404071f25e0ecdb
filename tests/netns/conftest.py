"""Fixtures for the namespace tests: a ``lab`` per test, skipped with the reason when namespaces
cannot be made here (not root, no ``ip``). Each test module here sets ``pytestmark = netns``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from namespaces import Lab, lab, leftovers, unavailable

_why_not: list[str | None] = []


@pytest.fixture
def netlab() -> Iterator[Lab]:
    if not _why_not:
        _why_not.append(unavailable())
    if _why_not[0] is not None:
        pytest.skip(f"network namespaces unavailable: {_why_not[0]}")
    with lab() as made:
        yield made
    assert leftovers() == [], "a namespace outlived its test"
