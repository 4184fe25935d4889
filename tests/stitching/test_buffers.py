"""Long-lived engine buffers live in their own memory mapping."""

from __future__ import annotations

import mmap
import pickle
import sys

import numpy as np
import pytest

from tileseg.stitching import buffers


def _owner(arr: np.ndarray):
    base = arr
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    return base.obj if isinstance(base, memoryview) else base


@pytest.mark.parametrize("dtype", [np.float32, np.uint8, np.float64])
def test_large_arrays_are_mapped_small_ones_are_not(dtype):
    big = buffers.zeros((3, 64, 64, 64), dtype)
    assert isinstance(_owner(big), mmap.mmap)
    assert big.dtype == dtype and big.shape == (3, 64, 64, 64) and big.flags.c_contiguous and big.flags.writeable
    assert not big.any()
    small = buffers.zeros((4, 4), dtype)
    assert not isinstance(_owner(small), mmap.mmap) and not small.any()


def test_copy_is_equal_independent_and_picklable():
    src = np.random.default_rng(0).random((2, 100, 300), dtype=np.float32)[:, ::2]  # non-contiguous view
    out = buffers.copy(src)
    np.testing.assert_array_equal(out, src)
    out[0, 0, 0] = -1
    assert src[0, 0, 0] != -1
    back = pickle.loads(pickle.dumps(out))
    np.testing.assert_array_equal(back, out)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_mappings_are_private_not_shared_memory():
    big = buffers.empty((8, 1024, 1024), np.float32)  # 32 MiB
    address = big.__array_interface__["data"][0]
    for line in open("/proc/self/maps"):
        span, perms = line.split()[:2]
        lo, hi = (int(v, 16) for v in span.split("-"))
        if lo <= address < hi:
            assert perms.endswith("p"), line  # a shared mapping ("s") is shmem: slow to fault in
            return
    pytest.fail("mapping not found")
