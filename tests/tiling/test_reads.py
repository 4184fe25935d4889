"""Owners read their own input: same result, each input block read a bounded number of times."""

from __future__ import annotations

import threading
from collections import Counter

import dask.array as da
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tileseg
from tileseg.tiling.grid import make_grid
from tileseg.tiling.reads import RegionRead, private_reads


def segment(*args, **kwargs):
    """The engine's lazy array (``tileseg.segment`` returns it inside an Image)."""
    return tileseg.segment(*args, **kwargs).data


def identity(batch):
    return batch


class CountingSource:
    """A dask array whose block reads are counted (by block index)."""

    def __init__(self, x: np.ndarray, chunks):
        self.x, self.reads, self.lock = x, Counter(), threading.Lock()
        self.array = da.map_blocks(self._read, dtype=x.dtype, chunks=da.from_array(x, chunks=chunks).chunks)

    def _read(self, block_info=None):
        loc = block_info[None]["array-location"]
        with self.lock:
            self.reads[tuple(block_info[None]["chunk-location"])] += 1
        return self.x[tuple(slice(a, b) for a, b in loc)].copy()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ndim=st.sampled_from([2, 3]),
    data=st.data(),
)
def test_private_reads_give_the_input_back_exactly(ndim, data):
    hi = 60 if ndim == 2 else 22
    shape = tuple(data.draw(st.integers(3, hi)) for _ in range(ndim))
    patch = tuple(data.draw(st.integers(2, 12)) for _ in range(ndim))
    out_chunks = tuple(data.draw(st.integers(4, 30)) for _ in range(ndim))
    in_chunks = tuple(data.draw(st.integers(1, c)) for c in out_chunks)  # never larger: private path
    x = (np.random.default_rng(0).integers(0, 4096, size=shape) / 16).astype(np.float32)
    y = segment(da.from_array(x, chunks=in_chunks), identity, patch_size=patch, overlap=0.4, blend="constant",
                output="logits", chunks=out_chunks, pad_mode="reflect",
                preprocess=[{"scale": {"multiply": 2.0, "add": 1.0}}]).compute()
    np.testing.assert_array_equal(y[0], x * 2 + 1)


@pytest.mark.parametrize("in_chunks", [8, 16, (16, 20, 33)])
def test_each_input_block_read_by_at_most_two_per_axis_owners(in_chunks):
    shape = (50, 64, 66)
    x = np.random.default_rng(1).random(shape, dtype=np.float32)
    src = CountingSource(x, in_chunks)
    y = segment(src.array, identity, patch_size=(16, 16, 16), overlap=0.25, blend="constant", output="logits",
                chunks=(24, 24, 36))
    keys = {k[0] if isinstance(k, tuple) else k for k in dict(y.__dask_graph__())}
    assert not any(name.startswith("map_blocks") or name == src.array.name for name in keys)  # no shared block
    np.testing.assert_allclose(y.compute()[0], x, rtol=1e-6)
    blocks = set(np.ndindex(*src.array.numblocks))
    assert set(src.reads) == blocks  # every block read
    assert max(src.reads.values()) <= 2**3
    grid = make_grid(shape, (16, 16, 16), overlap=0.25, chunks=(24, 24, 36))
    assert sum(src.reads.values()) < 3 * len(blocks)
    assert len(list(grid.owners())) > 1


def test_large_input_chunks_are_shared_and_read_once():
    x = np.random.default_rng(2).random((80, 90), dtype=np.float32)
    src = CountingSource(x, (80, 45))  # larger than the output chunks on axis 0: shared
    y = segment(src.array, identity, patch_size=(16, 16), overlap=0.25, blend="constant", output="logits",
                chunks=(24, 45))
    np.testing.assert_allclose(y.compute()[0], x, rtol=1e-6)
    assert src.reads == Counter({(0, 0): 1, (0, 1): 1})


def test_region_read_returns_the_blocks_of_the_input_graph():
    x = np.arange(24 * 30, dtype=np.float32).reshape(24, 30)
    arr = (da.from_array(x, chunks=(8, 10)) * 3).astype(np.float32)
    wanted = {"a": [(arr.name, 0, 0), (arr.name, 2, 1)], "b": [(arr.name, 1, 2)]}
    readers = private_reads(arr.__dask_graph__(), wanted)
    assert isinstance(readers["a"], RegionRead)
    a0, a1 = readers["a"]()
    np.testing.assert_array_equal(a0, x[:8, :10] * 3)
    np.testing.assert_array_equal(a1, x[16:24, 10:20] * 3)
    (b0,) = readers["b"]()
    np.testing.assert_array_equal(b0, x[8:16, 20:30] * 3)
    assert len(readers["b"].graph) < len(dict(arr.__dask_graph__()))  # only the tasks it needs


@pytest.mark.parametrize("mode", ["reflect", "symmetric", "edge", "constant"])
def test_padding_wider_than_the_axis_matches_numpy(mode):
    from tileseg.graph import pad

    for n in (1, 2, 3, 5):
        x = np.arange(2 * n * 3, dtype=np.float32).reshape(2, n, 3)
        for width in [((0, 0), (0, 9), (1, 1)), ((0, 0), (7, 4), (0, 0)), ((0, 0), (13, 13), (5, 6))]:
            got = pad(da.from_array(x, chunks=1), width, mode, 0.0).compute()
            np.testing.assert_array_equal(got, np.pad(x, width, mode=mode), err_msg=f"{mode} n={n} {width}")


def test_in_memory_arrays_are_not_copied_into_every_owner():
    x = np.random.default_rng(3).random((600, 600), dtype=np.float32)  # 1.4 MB held in the graph
    arr = da.from_array(x, chunks=100, lock=True)  # the whole array under one shared key
    wanted = {i: [(arr.name, i, 0)] for i in range(3)}
    assert private_reads(arr.__dask_graph__(), wanted) is None
    y = segment(arr, identity, patch_size=(32, 32), overlap=0.25, blend="constant", output="logits", chunks=200)
    assert any(isinstance(k, tuple) and k[0] == arr.name for k in dict(y.__dask_graph__()))  # shared blocks
    np.testing.assert_allclose(y.compute()[0], x, rtol=1e-6)
