"""Huge images start fast: graph size and set-up do not grow with the pixel count faster than the blocks.

The images are virtual Zarr arrays (metadata only, no chunk written: they cost no disk and read as
their fill value). Sizes are measured by task counts and tracemalloc, never by time.
"""

from __future__ import annotations

import tracemalloc

import dask.array as da
import numpy as np
import pytest
import zarr

import tileseg
from tileseg.planning import MAX_TASKS_PER_ITEM, plan_pipeline
from tileseg.preprocess import SUBSAMPLE_BLOCKS, channel_stats, sample_blocks
from tileseg.readers.zarr import MAX_READ_BLOCKS
from tileseg.testing.counting import register
from tileseg.tiling.grid import MAX_BLOCKS

SIDE = 10**6


@pytest.fixture(scope="module")
def huge(tmp_path_factory):
    path = tmp_path_factory.mktemp("huge") / "huge.zarr"
    g = zarr.open_group(str(path), mode="w")
    g.create_array("image", shape=(SIDE, SIDE), chunks=(1024, 1024), dtype="uint8", fill_value=7)
    return path


def test_reader_groups_stored_chunks_of_a_huge_image(huge):
    image = tileseg.open(str(huge), array="image")
    assert image.spatial_shape == (SIDE, SIDE)
    assert int(np.prod(image.data.numblocks)) <= MAX_READ_BLOCKS
    assert all(c % 1024 == 0 for c in image.data.chunksize)  # whole stored chunks, none decoded twice


def _pipeline(folder, chunks: str = "") -> str:
    register()
    (folder / "p.yaml").write_text(
        "version: 1\ninput: {path: huge.zarr, array: image}\npreprocess: [zscore]\n"
        f"tiling: {{patch_size: [256, 256], overlap: 0.25{chunks}}}\n"
        "model: {counting: {}, classes: [background, object]}\noutput: {path: 'out/{stem}.zarr'}\n")
    return str(folder / "p.yaml")


def test_plan_keeps_a_huge_item_under_the_task_budget_and_warns_otherwise(huge):
    tracemalloc.start()
    try:
        (row,) = plan_pipeline(_pipeline(huge.parent))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "error" not in row, row.get("error")
    assert row["n_blocks"] <= MAX_BLOCKS and row["n_patches"] > 2 * 10**7
    assert row["est_tasks"] < MAX_TASKS_PER_ITEM and not row.get("warnings")
    assert peak < 200 * 2**20
    # chunks chosen by hand: 977^2 blocks, far over the budget: plan says so
    (small,) = plan_pipeline(_pipeline(huge.parent, ", chunks: [1152, 1152]"))
    assert small["est_tasks"] > MAX_TASKS_PER_ITEM
    assert any("tasks" in w and "tiling.chunks" in w for w in small["warnings"])


def test_statistics_of_a_huge_image_read_a_bounded_subsample(huge):
    image = tileseg.open(str(huge), array="image")
    data = image.data[None]
    tracemalloc.start()
    try:
        mean, std = channel_stats(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert mean.tolist() == [7.0] and std.tolist() == [0.0]  # the fill value everywhere
    assert peak < 300 * 2**20


def test_subsampled_statistics_approximate_the_exact_ones(monkeypatch):
    import tileseg.preprocess as pp

    rng = np.random.default_rng(0)
    # a gradient plus noise: a subsample that missed part of the image would shift the mean
    y, x = np.mgrid[0:1200, 0:1000]
    image = (x / 10 + y / 20 + rng.normal(0, 5, size=x.shape)).astype(np.float32)
    arr = da.from_array(image[None], chunks=(1, 100, 100))
    exact_mean, exact_std = channel_stats(arr)
    monkeypatch.setattr(pp, "SUBSAMPLE_ABOVE_PIXELS", 10**5)
    monkeypatch.setattr(pp, "SUBSAMPLE_BLOCKS", 30)
    monkeypatch.setattr(pp, "SUBSAMPLE_WINDOW", 400)
    assert sample_blocks(arr.numblocks[1:], image.size) == 5  # 5 x 5 windows
    mean, std = channel_stats(arr)
    assert mean[0] == pytest.approx(float(image.mean(dtype=np.float64)), rel=0.02)
    assert std[0] == pytest.approx(float(image.std(dtype=np.float64)), rel=0.05)
    assert (mean[0], std[0]) != (exact_mean[0], exact_std[0])  # it did subsample
    assert SUBSAMPLE_BLOCKS >= 64  # the default spreads over many blocks (8 x 8 in 2D)


def _model(batch: np.ndarray) -> np.ndarray:
    return np.concatenate([batch, -batch], axis=1)


def _write_graph(path, out) -> tuple[dict, int]:
    """The low-level graph of segmenting and writing a virtual image, and its output blocks."""
    image = tileseg.open(str(path), array="image")
    seg = tileseg.segment(image, _model, patch_size=(256, 256), overlap=0.25, out_channels=2, preprocess=["zscore"])
    job = tileseg.write(seg, str(out), compute=False)
    return dict(job.task.__dask_graph__()), int(seg.data.npartitions)


def _index_elements(obj, seen: set) -> int:
    """Array elements carried in a task's arguments (numpy arrays, in tuples, lists and dataclasses)."""
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        return int(obj.size)
    if isinstance(obj, (tuple, list)):
        return sum(_index_elements(o, seen) for o in obj)
    if isinstance(obj, dict):
        return sum(_index_elements(o, seen) for o in obj.values())
    if hasattr(obj, "__dataclass_fields__"):
        return sum(_index_elements(getattr(obj, f), seen) for f in obj.__dataclass_fields__)
    return 0


def test_graph_of_a_huge_image_does_not_grow_with_its_pixels(huge, tmp_path):
    import pickle

    # a 2e5^2 image and the 1e6^2 one: both at the block budget, 25x the pixels (and patches per block)
    small_path = tmp_path / "small.zarr"
    g = zarr.open_group(str(small_path), mode="w")
    g.create_array("image", shape=(2 * 10**5,) * 2, chunks=(1024, 1024), dtype="uint8", fill_value=7)
    small, small_blocks = _write_graph(small_path, tmp_path / "small-seg.zarr")
    big, big_blocks = _write_graph(huge, tmp_path / "big-seg.zarr")
    assert len(big) < MAX_TASKS_PER_ITEM
    assert small_blocks > MAX_BLOCKS // 2 and big_blocks <= MAX_BLOCKS
    per_block = big_blocks / small_blocks
    assert len(big) <= 1.1 * per_block * len(small)
    # what the tasks carry: patch index ranges, not one corner per patch (27 million at 1e12 pixels)
    small_idx = sum(_index_elements(t, set()) for t in small.values())
    big_idx = sum(_index_elements(t, set()) for t in big.values())
    assert big_idx <= 1.1 * per_block * small_idx + 1000
    small_bytes, big_bytes = len(pickle.dumps(small)), len(pickle.dumps(big))
    assert big_bytes <= 1.2 * per_block * small_bytes
    assert big_bytes / len(big) < 2000  # bytes per task
