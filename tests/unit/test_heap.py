"""The heap parameters set at start-up: they take effect on glibc, and an operator's own
GLIBC_TUNABLES win. Each check runs in a fresh interpreter, so this process's heap is left alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sidecar import heap

# In a fresh interpreter: how many mmapped chunks an allocation of 900 KB adds (1 when glibc mmaps
# it, 0 when it comes from the heap) and whether 900 KB freed at the heap's top stay there.
PROBE = """
import ctypes, json, sys
from sidecar import heap
done = heap.hold_steady() if sys.argv[1] == "hold" else "not called"
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
        ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
before = libc.mallinfo2().hblks
block = bytearray(900_000)
mmapped = libc.mallinfo2().hblks - before
del block
print(json.dumps({"done": done, "mmapped": mmapped, "kept_at_top": libc.mallinfo2().keepcost >= 900_000}))
"""


def probe(mode: str, **env: str) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode],
        env={**{k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}, **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    result: dict[str, object] = json.loads(out)
    return result


needs_glibc = pytest.mark.skipif(not heap.glibc(), reason="mallopt and mallinfo2 are glibc's")


@needs_glibc
def test_held_heap_serves_large_buffers_and_keeps_its_top() -> None:
    held = probe("hold")
    assert str(held["done"]).startswith("held")
    assert held == {"done": held["done"], "mmapped": 0, "kept_at_top": True}


@needs_glibc
def test_without_it_glibc_maps_the_same_buffer_on_its_own() -> None:
    # the control: proves the probe can tell the difference
    assert probe("none")["mmapped"] == 1


@needs_glibc
def test_an_operators_malloc_tunables_win() -> None:
    own = probe("hold", GLIBC_TUNABLES="glibc.malloc.mmap_threshold=131072")
    assert own["done"] == "left as set by GLIBC_TUNABLES"
    assert own["mmapped"] == 1  # their 128 KiB threshold, not ours
