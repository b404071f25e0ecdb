"""Holding glibc's heap steady under bulk traffic: one checked ``mallopt`` call set at start-up.

By default glibc's malloc gives the top of its heap back to the kernel as soon as more than
128 KiB there are free, and moves its mmap threshold with the sizes it sees. A proxy moving
hundreds of kilobytes per read then grows and trims the heap around its transient buffers
(``brk`` up, ``brk`` down, every page faulted in anew, zeroed): that made bulk throughput bimodal,
about half speed whenever a long-lived object happened to sit at the heap's top. Fixing the
threshold and keeping a few MiB of free top lets the same pages be reused.

This is a call into libc, not libssl: it only sets allocator parameters, reaches no object's
memory, and is made only where glibc is the C library and the operator has not set malloc
tunables of their own (``GLIBC_TUNABLES``). If ``mallopt`` is missing or refuses, nothing changes
but speed.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from collections.abc import Mapping

from .logs import event

# glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

MIB = 1024 * 1024
# Allocations up to this size come from the heap (and are reused), larger ones are mmapped. A fixed
# value also stops glibc from moving the threshold (and with it the trim threshold) at run time.
MMAP_THRESHOLD = 1 * MIB
TRIM_THRESHOLD = 8 * MIB  # free memory at the heap's top kept before it is given back
TOP_PAD = 1 * MIB  # extra asked for each time the heap grows

SETTINGS = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD))


def glibc() -> bool:
    """Whether this process's C library is glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") is not None
    except (ValueError, OSError):
        return False


def hold_steady(environ: Mapping[str, str] | None = None) -> str:
    """Set the heap parameters once (at start-up); logs and returns what was done."""
    done = _hold_steady(os.environ if environ is None else environ)
    event(logging.getLogger("sidecar"), logging.DEBUG, "heap", malloc=done)
    return done


def _hold_steady(env: Mapping[str, str]) -> str:
    if "glibc.malloc." in env.get("GLIBC_TUNABLES", ""):
        return "left as set by GLIBC_TUNABLES"
    if not glibc():
        return "left alone (the C library is not glibc)"
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return "left alone (no mallopt)"
    mallopt.restype = ctypes.c_int
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    for param, value in SETTINGS:
        if mallopt(param, value) != 1:
            return f"left alone (mallopt({param}) refused)"
    return f"held (mmap threshold {MMAP_THRESHOLD // MIB} MiB, trim threshold {TRIM_THRESHOLD // MIB} MiB)"
