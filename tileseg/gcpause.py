"""Python's cyclic garbage collector held back while large task graphs are built and scheduled.

A huge image's graph is a few hundred thousand Python objects (tasks, keys,
boxes). The collector runs every few hundred allocations and its full passes
walk every tracked object, so building the graph and Dask's conversion and
ordering of it paid for repeated walks over the graph itself: measured on a
10^6 x 10^6 image, 1.6 s of collections while building and 4-6 s before the
first task ran (against 1.5 s with the graph frozen), see
``benchmarks/bench_huge.py``. Reference counting frees objects as usual in
both cases; only cycles wait.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def paused() -> Iterator[None]:
    """No cyclic collection inside the block (for building a graph); restored afterwards if it was on."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


@contextmanager
def frozen() -> Iterator[None]:
    """Objects alive on entry (a built graph) are left out of collections until the block ends.

    For a compute: the scheduler's own passes over the graph then no longer
    trigger collections that walk it. Objects created inside the block are
    collected as usual.
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
