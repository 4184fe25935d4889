"""Process-wide C allocator setting for long runs (glibc only).

glibc gives every thread that allocates concurrently its own *arena* (up to
eight per core). Model forwards allocate hundreds of megabytes of short-lived
activations; spread over the Dask threads and PyTorch's intra-op threads,
each arena keeps its own high-water mark of freed memory, and the sum keeps
creeping up the longer a run goes, so peak RSS grew with the image size even
though the live data did not. One arena removes that growth (measured on the
engine benchmark: 1304 -> 1303 MiB with two arenas, 1139 -> 1166 MiB with one,
for a 4x larger volume, at unchanged speed; see README, "Memory model").

``tileseg run`` applies it through ``execution.malloc_arenas`` (default 1);
code that embeds :func:`tileseg.segment` can call :func:`limit_arenas` itself,
as early as possible (threads that already have an arena keep it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

M_ARENA_MAX = -8  # from glibc's malloc.h
ENV = "MALLOC_ARENA_MAX"


def limit_arenas(n: int) -> bool:
    """Cap the number of glibc malloc arenas of this process at ``n``.

    Parameters
    ----------
    n : int
        Maximum number of arenas (>= 1).

    Returns
    -------
    bool
        True when the setting was applied; False on platforms without glibc
        (macOS, Windows, musl), where this is a no-op.
    """
    if n < 1:
        raise ValueError(f"malloc arenas must be >= 1, got {n!r}")
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = bool(mallopt(ctypes.c_int(M_ARENA_MAX), ctypes.c_int(int(n))))
    log.debug("malloc arenas capped at %d: %s", n, ok)
    return ok


M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
M_MMAP_THRESHOLD = -3
#: Allocations from this size up get their own mapping (returned to the system when freed).
MMAP_THRESHOLD = 1 << 20
#: Free memory at the top of the heap beyond this is returned to the system.
TRIM_THRESHOLD = 4 << 20


def pin_mmap_threshold(mmap_bytes: int = MMAP_THRESHOLD, trim_bytes: int = TRIM_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold (and trim threshold) of this process.

    glibc raises its mmap threshold after each large block is freed (up to
    32 MiB), so after a few model forwards every array below that size comes
    from the heap, where blocks freed by different threads (decoded DICOM
    slices, preprocessed regions, activations) leave holes the heap never
    gives back: measured on the medical benchmark (200 x 512 x 512, 3D U-Net),
    pinning the thresholds at 1 MiB / 4 MiB lowered peak RSS from 1390 to
    1165 MiB. ``tileseg run`` pins them together with ``execution.malloc_arenas``.

    Returns
    -------
    bool
        True when both settings were applied; False without glibc (a no-op).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    ok = bool(mallopt(ctypes.c_int(M_MMAP_THRESHOLD), ctypes.c_int(int(mmap_bytes))))
    ok = bool(mallopt(ctypes.c_int(M_TRIM_THRESHOLD), ctypes.c_int(int(trim_bytes)))) and ok
    log.debug("malloc mmap threshold %d, trim threshold %d: %s", mmap_bytes, trim_bytes, ok)
    return ok
