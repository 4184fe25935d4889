"""Chunk records and resumed partial outputs, for every block-store writer (zarr, COG, NIfTI, DICOM SEG's store).

A write that fails part-way keeps its keyed partial output; preparing again with the same key
resumes it: only the chunks without a record are computed (counted per block), and the finished
output equals one written in a single go (read back with the writers' own reference readers).
"""

from __future__ import annotations

import os
import threading

import dask
import dask.array as da
import numpy as np
import pytest

from tileseg.image import Image
from tileseg.readers import open_image
from tileseg.writers import get_writer
from tileseg.writers.blocks import RECORDS, ChunkRecords, needed

KEY = "c0ffee0123456789"


class Counting:
    """A block function that counts its calls per block."""

    def __init__(self) -> None:
        self.calls: dict[tuple[int, ...], int] = {}
        self.lock = threading.Lock()

    def __call__(self, block: np.ndarray, block_info=None) -> np.ndarray:
        loc = tuple(block_info[0]["chunk-location"])
        with self.lock:
            self.calls[loc] = self.calls.get(loc, 0) + 1
        return block



def _compute_only(graph: dict, keys: list) -> None:
    """Run just what ``keys`` need (dask 2024.8's synchronous ``get`` runs every task of the graph it is given)."""
    from dask.optimization import cull

    dask.get(cull(graph, keys)[0], keys)

def _cases():
    rng = np.random.default_rng(4)
    labels2d = rng.integers(0, 3, size=(70, 90), dtype=np.uint8)
    labels3d = rng.integers(0, 3, size=(12, 20, 18), dtype=np.uint8)
    return [
        ("zarr", "out.zarr", labels2d, (32, 32), ("y", "x"), {}),
        pytest.param("cog", "out.tif", rng.integers(0, 3, size=(300, 260), dtype=np.uint8), (128, 128), ("y", "x"),
                     {"blocksize": 128},
                     marks=pytest.mark.skipif(not _has("rasterio"), reason="the cog writer needs 'geo'")),
        pytest.param("nifti", "out.nii.gz", labels3d, (4, 20, 18), ("z", "y", "x"), {},
                     marks=pytest.mark.skipif(not _has("nibabel"), reason="the nifti writer needs 'medical'")),
    ]


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _read(path: str) -> np.ndarray:
    image = open_image(path)
    data = np.asarray(image.data.compute())
    return data[0] if image.has_channels and data.shape[0] == 1 else data  # a one-band GeoTIFF


@pytest.mark.parametrize("writer_name, name, ref, chunks, axes, options", _cases())
def test_failed_write_resumes_only_unrecorded_chunks(tmp_path, writer_name, name, ref, chunks, axes, options):
    writer = get_writer(writer_name)
    counting = Counting()
    data = da.from_array(ref, chunks=chunks).map_blocks(counting, dtype=ref.dtype)
    image = Image(data, axes=axes, class_names=("a", "b", "c"))
    grid = list(np.ndindex(*data.numblocks))
    path = str(tmp_path / name)

    handle = writer.prepare(image, path, partial_key=KEY, **options)
    assert handle.target.endswith(f".partial-{KEY}")
    # a run killed after half of the store tasks: compute only those
    graph = dict(writer.write_task(handle, image).__dask_graph__())
    stores = sorted(k for k in graph if isinstance(k, tuple) and k[0].startswith("tileseg-store-"))
    assert len(stores) == len(grid)
    _compute_only(graph, stores[: len(stores) // 2])
    assert not os.path.exists(path) and os.path.isdir(handle.target)
    recorded = ChunkRecords(os.path.join(handle.target, RECORDS)).finished(len(chunks))
    assert recorded == set(grid[: len(grid) // 2])

    counting.calls.clear()
    again = writer.prepare(image, path, partial_key=KEY, **options)
    assert again.target == handle.target
    with dask.config.set(scheduler="threads"):
        dask.compute(writer.write_task(again, image))
    assert set(counting.calls) == set(grid) - recorded  # only the missing chunks were computed
    assert all(n == 1 for n in counting.calls.values())
    writer.finalize(again)
    assert not os.path.exists(again.target)
    np.testing.assert_array_equal(_read(path), ref)
    assert writer.is_complete(path)


def test_another_key_or_layout_starts_again(tmp_path):
    writer = get_writer("zarr")
    ref = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)
    image = Image(da.from_array(ref, chunks=32), axes=("y", "x"))
    path = str(tmp_path / "o.zarr")
    first = writer.prepare(image, path, partial_key=KEY)
    ChunkRecords(os.path.join(first.target, RECORDS)).mark((0, 0))  # a record from a killed run
    # same key, other chunks: the layout differs, the partial output is made anew
    second = writer.prepare(image.with_data(image.data.rechunk(16)), path, partial_key=KEY)
    assert second.target == first.target
    assert ChunkRecords(os.path.join(second.target, RECORDS)).finished(2) == set()
    # another key: the old partial output is removed
    third = writer.prepare(image, path, partial_key="ab" * 8)
    assert not os.path.exists(first.target) and os.path.isdir(third.target)
    dask.compute(writer.write_task(third, image))
    writer.finalize(third)
    np.testing.assert_array_equal(_read(path), ref)
    assert not os.path.exists(os.path.join(path, RECORDS))


def test_bad_partial_key_is_refused(tmp_path):
    from tileseg.errors import OutputError

    image = Image(da.zeros((8, 8), chunks=4, dtype="uint8"), axes=("y", "x"))
    with pytest.raises(OutputError, match="partial_key"):
        get_writer("zarr").prepare(image, str(tmp_path / "o.zarr"), partial_key="../x")


def test_needed_drops_ordering_tokens_to_work_not_needed():
    from tileseg.graph import ORDER_TOKEN

    tok = ORDER_TOKEN + "t"
    dsk = {
        ("a", 0): (np.add, 1, 1),
        ("a", 1): (np.add, 1, 2),
        (tok, 0): (lambda *_: None, ("a", 0)),
        (tok, 1): (lambda *_: None, ("a", 1)),
        ("b", 1): (lambda x, _: x, ("a", 1), (tok, 0)),  # waits for block 0 only for ordering
        ("c", 0): (lambda x, _: x, ("a", 0), (tok, 1)),
    }
    got = needed(dsk, [("b", 1)])
    assert set(got) == {("b", 1), ("a", 1), (tok, 0)} and got[(tok, 0)] is None
    both = needed(dsk, [("b", 1), ("c", 0)])
    assert both[(tok, 0)] is dsk[(tok, 0)] and both[(tok, 1)] is dsk[(tok, 1)]  # kept: its work is needed anyway
    assert dask.get(got, ("b", 1)) == 3


def test_vector_writer_resumes_only_unpolygonised_chunks(tmp_path):
    pyogrio = pytest.importorskip("pyogrio", reason="the vector writer needs the 'vector' extra")
    pytest.importorskip("rasterio", reason="the vector writer needs the 'vector' extra")
    rng = np.random.default_rng(5)
    ref = (rng.random((64, 80)) > 0.6).astype(np.uint8)
    counting = Counting()
    data = da.from_array(ref, chunks=(16, 20)).map_blocks(counting, dtype=ref.dtype)
    image = Image(data, axes=("y", "x"), class_names=("background", "object"))
    writer = get_writer("vector")
    clean = str(tmp_path / "clean.gpkg")
    writer.write(image, clean)
    counting.calls.clear()

    path = str(tmp_path / "out.gpkg")
    handle = writer.prepare(image, path, partial_key=KEY)
    graph = dict(writer.write_task(handle, image).__dask_graph__())
    stores = sorted(k for k in graph if isinstance(k, tuple) and k[0].startswith("tileseg-store-"))
    _compute_only(graph, stores[:5])  # killed after five chunks
    counting.calls.clear()
    again = writer.prepare(image, path, partial_key=KEY)
    dask.compute(writer.write_task(again, image))
    assert len(counting.calls) == len(stores) - 5
    writer.finalize(again)
    got, want = pyogrio.raw.read(path), pyogrio.raw.read(clean)
    assert len(got[2]) == len(want[2]) > 10
    assert list(got[2]) == list(want[2])  # the same polygons (WKB), in the same order
    for a, b in zip(got[3], want[3]):
        np.testing.assert_array_equal(a, b)
