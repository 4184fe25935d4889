"""Process-level memory settings for long batch runs (used by the CLI only).

glibc raises its mmap threshold every time a large block is freed (up to
32 MiB), after which arrays of a few MiB come from the heap, where freed
space fragments and is not returned to the system. The engine allocates and
frees many arrays of that size (patch batches, accumulators, pieces), so a
long run's resident memory creeps up although its live data does not.
Fixing the threshold (as ``MALLOC_MMAP_THRESHOLD_`` would) keeps large
arrays in their own mappings, returned to the system when freed. Measured
on a 512^3 run with a cheap predictor: peak RSS 630 MiB -> 488 MiB.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3


def tune_allocator(threshold: int = 1 << 20) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes (Linux/glibc only).

    Skipped when ``MALLOC_MMAP_THRESHOLD_`` is already set or
    ``TILESEG_MALLOC_TUNING=0``.

    Returns
    -------
    bool
        Whether the setting was applied.
    """
    if not sys.platform.startswith("linux") or os.environ.get("TILESEG_MALLOC_TUNING") == "0":
        return False
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    log.debug("mmap threshold fixed at %d bytes: %s", threshold, ok)
    return ok
