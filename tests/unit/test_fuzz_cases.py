"""Every fuzz target holds on its seeds and on every input a fuzzing run ever crashed on.

Crashes found by ``make fuzz`` are copied to tests/unit/fuzz_cases/TARGET/ (named for what they
broke) and replayed here through the very target function, without atheris; the named
regression tests of each finding live beside the code they test (test_config.py for the config
loader). The reference SPIFFE grammar is itself checked against known IDs, so the comparison in
the ``spiffe`` target cannot pass by both sides being wrong the same way on the basics.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from fuzz import spiffe_reference  # noqa: E402 - the fuzz folder lives at the repository root
from fuzz.targets import TARGETS  # noqa: E402

CASES = sorted(
    (target, path)
    for target in TARGETS
    for folder in (ROOT / "fuzz" / "seeds" / target, Path(__file__).parent / "fuzz_cases" / target)
    if folder.is_dir()
    for path in folder.iterdir()
)


def test_every_target_has_seeds() -> None:
    assert {target for target, path in CASES if "seeds" in path.parts} == set(TARGETS)


@pytest.mark.parametrize(("target", "path"), CASES, ids=[f"{t}/{p.parent.parent.name}/{p.name}" for t, p in CASES])
def test_target_holds(target: str, path: Path) -> None:
    TARGETS[target](path.read_bytes())


@pytest.mark.parametrize(
    ("uri", "valid"),
    [
        ("spiffe://mesh.local/a/b", True),
        ("spiffe://mesh.local", True),
        ("spiffe://mesh.local/a/..", False),
        ("spiffe://mesh.local/a/.", False),
        ("spiffe://mesh.local/a/...", True),
        ("spiffe://mesh.local/.a", True),
        ("spiffe://mesh.local/a/", False),
        ("spiffe://mesh.local/a?b", False),
        ("spiffe://Mesh.local/a", False),
        ("spiffe://mesh.local:1/a", False),
        ("spiffe://mesh.local/a\n", False),
        ("SPIFFE://mesh.local/a", False),
        ("spiffe://mesh.local/" + "a" * 2028, True),
        ("spiffe://mesh.local/" + "a" * 2029, False),
    ],
)
def test_the_reference_grammar_knows_the_basics(uri: str, valid: bool) -> None:
    assert len("spiffe://mesh.local/" + "a" * 2028) == 2048
    assert spiffe_reference.is_valid(uri) is valid


def test_the_targets_catch_a_broken_property(monkeypatch: pytest.MonkeyPatch) -> None:
    # the spiffe target compares two implementations: a validator made wrong on purpose (it
    # accepts everything, as a raw string match did) must be caught on the first trick
    monkeypatch.setattr("sidecar.spiffeid.problem", lambda uri, *, require_path=False: None)
    with pytest.raises(AssertionError):
        TARGETS["spiffe"](b"spiffe://mesh.local/jobs/..")
