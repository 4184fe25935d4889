"""The malloc arena cap really limits glibc's arenas, and every scheduler applies it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from tileseg.allocator import limit_arenas
from tileseg.config.schema import PipelineConfig
from tileseg.execution import scheduler_context

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc arenas are Linux-only")

# Count the heaps glibc reports after eight threads allocate at the same time.
COUNT_ARENAS = textwrap.dedent(
    """
    import ctypes, os, sys, tempfile, threading
    sys.path.insert(0, {root!r})
    from tileseg.allocator import limit_arenas
    if {cap}:
        assert limit_arenas({cap})
    libc = ctypes.CDLL("libc.so.6")
    libc.fopen.restype = ctypes.c_void_p
    barrier = threading.Barrier(8)
    def work():
        barrier.wait()
        for _ in range(200):
            bufs = [ctypes.create_string_buffer(4096) for _ in range(50)]
            del bufs
    threads = [threading.Thread(target=work) for _ in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    path = tempfile.mktemp()
    fp = libc.fopen(path.encode(), b"w")
    libc.malloc_info(0, ctypes.c_void_p(fp))
    libc.fclose(ctypes.c_void_p(fp))
    print(open(path).read().count("<heap nr="))
    os.unlink(path)
    """
)


def _arenas(cap: int) -> int:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    out = subprocess.run([sys.executable, "-c", COUNT_ARENAS.format(root=root, cap=cap)],
                         capture_output=True, text=True, env=env, check=True)
    return int(out.stdout.split()[-1])


@linux
def test_cap_limits_the_arenas_of_a_threaded_process():
    assert _arenas(0) > 1  # without the cap concurrent threads get their own arenas
    assert _arenas(1) == 1


def test_cap_must_be_positive():
    with pytest.raises(ValueError, match=">= 1"):
        limit_arenas(0)
    with pytest.raises(Exception, match="malloc_arenas"):
        PipelineConfig.model_validate(
            {"version": 1, "input": {"path": "x.zarr"}, "output": {"path": "o.zarr"},
             "execution": {"malloc_arenas": 0}}
        )


def test_threads_scheduler_applies_the_cap(monkeypatch):
    import tileseg.execution as ex

    seen = []
    monkeypatch.setattr(ex, "limit_arenas", seen.append)
    with scheduler_context({"scheduler": "threads", "malloc_arenas": 3}):
        pass
    with scheduler_context({"scheduler": "threads", "malloc_arenas": None}):
        pass
    assert seen == [3]


@linux
def test_local_cluster_workers_get_the_cap():
    pytest.importorskip("distributed")
    with scheduler_context({"scheduler": "local", "workers": 1, "malloc_arenas": 2,
                            "malloc_mmap_threshold": 1 << 20}) as info:
        env = info.client.run(lambda: [os.environ.get(k) for k in ("MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_",
                                                                   "MALLOC_TRIM_THRESHOLD_")])
    assert list(env.values()) == [["2", str(1 << 20), str(4 << 20)]]



# Heap holes: 4 MiB blocks freed below a live one, after a 20 MiB free raised glibc's dynamic mmap threshold.
HOLES = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {root!r})
    import numpy as np
    from tileseg.allocator import pin_mmap_threshold
    if {pin}:
        assert pin_mmap_threshold()
    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * 4096 >> 20
    big = np.ones(5 << 20, np.float32); del big
    base = rss()
    blocks = [np.ones(1 << 20, np.float32) for _ in range(50)]
    last = blocks.pop()
    del blocks
    print(rss() - base)
    """
)


@linux
def test_pinned_mmap_threshold_gives_freed_blocks_back():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def held(pin: bool) -> int:
        out = subprocess.run([sys.executable, "-c", HOLES.format(root=root, pin=pin)], capture_output=True,
                             text=True, check=True,
                             env={k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")})
        return int(out.stdout.split()[-1])

    assert held(False) > 150  # 49 freed 4 MiB blocks stay in the heap under the live one
    assert held(True) < 20


def test_threads_scheduler_pins_the_mmap_threshold_only_when_asked(monkeypatch):
    """An option (it makes every larger allocation a fresh mapping: slower), not a side effect of the arena cap."""
    import tileseg.execution as ex

    seen = []
    monkeypatch.setattr(ex, "limit_arenas", lambda n: None)
    monkeypatch.setattr(ex, "pin_mmap_threshold", lambda m, t: seen.append((m, t)))
    with scheduler_context({"scheduler": "threads", "malloc_arenas": 1}):
        pass
    with scheduler_context({"scheduler": "threads", "malloc_arenas": None, "malloc_mmap_threshold": 1 << 20}):
        pass
    assert seen == [(1 << 20, 4 << 20)]
