"""Patch-grid geometry: MONAI's window convention, ownership and crop spans."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tileseg.errors import TilingError
from tileseg.tiling.grid import make_grid, stride_for, window_starts


def monai_starts(size: int, patch: int, overlap: float) -> list[int]:
    """The window starts of MONAI's dense_patch_slices, re-derived independently."""
    monai_utils = pytest.importorskip("monai.data.utils")
    interval = patch if patch == size else max(1, int(patch * (1 - overlap)))
    slices = monai_utils.dense_patch_slices((size,), (patch,), (interval,))
    return [s[0].start for s in slices]


@settings(max_examples=60, deadline=None)
@given(size=st.integers(1, 300), patch=st.integers(1, 64), overlap=st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.75, 0.9]))
def test_window_starts_match_monai(size, patch, overlap):
    # MONAI pads an axis shorter than the patch up to the patch, then tiles the padded axis
    padded = max(size, patch)
    want = monai_starts(padded, patch, overlap)
    if size >= patch:
        assert window_starts(size, patch, stride_for(patch, overlap=overlap)).tolist() == want
    axis = make_grid((size, 8), (patch, 8), overlap=overlap).axes[0]
    assert axis.size == padded and axis.starts.tolist() == want


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(1, 60), min_size=2, max_size=3),
    patch=st.integers(1, 40),
    overlap=st.floats(0, 0.9),
    chunk=st.integers(1, 70),
)
def test_every_patch_owned_once_and_targets_cover_region(shape, patch, overlap, chunk):
    grid = make_grid(shape, patch, overlap=overlap, chunks=chunk)
    owned = [tuple(s) for o in grid.owners() for s in grid.patches_of(o)]
    assert len(owned) == len(set(owned)) == grid.n_patches
    for owner in grid.owners():
        region = grid.region(owner)
        covered = np.zeros(grid.padded_shape, bool)
        for t in grid.targets(owner):
            covered[tuple(slice(a, b) for a, b in grid.block_box(t))] = True
        assert covered[tuple(slice(a, b) for a, b in region)].all()
        for t in grid.targets(owner):
            assert owner in set(grid.sources(t))


@settings(max_examples=60, deadline=None)
@given(size=st.integers(1, 200), patch=st.integers(1, 50), overlap=st.floats(0, 0.95))
def test_crop_spans_tile_the_axis_and_stay_inside_their_patch(size, patch, overlap):
    axis = make_grid((size, 8), (patch, 8), overlap=overlap).axes[0]
    spans = axis.crop_ranges()
    assert spans[0, 0] == 0 and spans[-1, 1] == axis.size
    assert (spans[1:, 0] == spans[:-1, 1]).all()
    assert (spans[:, 0] >= axis.starts).all() and (spans[:, 1] <= axis.starts + axis.patch).all()
    # each pixel goes to the nearest centre
    centres = axis.starts + (axis.patch - 1) / 2
    for j, (a, b) in enumerate(spans):
        for x in range(a, b):
            assert abs(x - centres[j]) <= np.abs(x - centres).min() + 1e-9


def test_padding_is_symmetric_like_monai():
    grid = make_grid((30, 100), (64, 64))
    assert grid.pad == ((17, 17), (0, 0))
    assert grid.padded_shape == (64, 100)
    assert grid.chunks[0] == (64,)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"overlap": -0.1}, "overlap: must be >= 0"),
        ({"overlap": 1.0}, "overlap: must be >= 0"),
        ({"overlap": None, "overlap_px": 64}, "overlap_px: entries must be >= 0 and < the patch size"),
        ({"overlap": 0.5, "overlap_px": 4}, "mutually exclusive"),
        ({"chunks": 0}, "chunk size must be >= 1"),
    ],
)
def test_bad_parameters_are_named(kwargs, message):
    with pytest.raises(TilingError, match=message):
        make_grid((100, 100), (64, 64), **kwargs)


def test_impossible_patch_sizes():
    with pytest.raises(TilingError, match="patch_size: every entry must be > 0"):
        make_grid((100, 100), (0, 64))
    with pytest.raises(TilingError, match="more than"):
        make_grid((100, 100, 100), (1024, 1024, 1024))
    with pytest.raises(TilingError, match="2 values but the patch has 3"):
        make_grid((10, 10, 10), (4, 4, 4), overlap=(0.1, 0.1))


@pytest.mark.parametrize("shape, patch, overlap", [((1300, 3000), (256, 256), 0.25), ((300, 500, 410), (64, 64, 64), 0.25),
                                                    ((200, 200, 200), (48, 64, 80), 0.5)])
def test_default_chunks_align_blocks_with_window_starts(shape, patch, overlap):
    grid = make_grid(shape, patch, overlap=overlap)
    for axis in grid.axes:
        if axis.n_blocks == 1:
            continue
        chunk = axis.bounds[1]
        assert chunk % axis.stride == 0 and chunk >= axis.patch
        for b in range(axis.n_blocks - 1):
            lo, hi = axis.region(b)
            assert lo == axis.bounds[b]  # the block starts on a window start
            # spills only the overlap (or reaches the image end with the flush last window)
            assert hi - axis.bounds[b + 1] <= axis.patch - axis.stride or hi == axis.size


@pytest.mark.parametrize("shape, patch, overlap, batch", [((3000, 4000), (256, 256), 0.25, 16),
                                                          ((500, 520, 530), (64, 64, 64), 0.25, 4),
                                                          ((5000, 5000), (100, 100), 0.5, 6),
                                                          ((700, 600, 600), (64, 64, 64), 0.5, 8)])
def test_default_chunks_give_full_batches(shape, patch, overlap, batch):
    grid = make_grid(shape, patch, overlap=overlap, batch_size=batch)
    plain = make_grid(shape, patch, overlap=overlap)
    # owners away from the far border (the last full block may also own the flush last window)
    interior = [o for o in grid.owners() if all(i < n - 2 for i, n in zip(o, grid.n_blocks))]
    assert interior
    for o in interior:
        assert len(grid.patches_of(o)) % batch == 0
    for a, b in zip(grid.axes, plain.axes):  # still window-aligned, grown by at most half
        assert a.bounds[1] % a.stride == 0 and b.bounds[1] <= a.bounds[1] <= 1.5 * b.bounds[1]
    assert grid.n_patches == plain.n_patches


def test_fill_batches_examples():
    from tileseg.tiling.grid import fill_batches

    assert fill_batches((3, 3, 3), 4) == (3, 3, 4)
    assert fill_batches((6, 6), 16) == (6, 8)
    assert fill_batches((5, 5), 7) == (5, 7)
    assert fill_batches((3, 3), 1) == (3, 3)
    assert fill_batches((2, 2), 97) == (2, 2)  # impossible within the growth limit: unchanged


@settings(max_examples=80, deadline=None)
@given(
    shape=st.lists(st.integers(1, 60), min_size=2, max_size=3),
    patch=st.integers(2, 24),
    overlap=st.floats(0, 0.8),
    chunk=st.integers(5, 40),
    seed=st.integers(0, 3),
)
def test_patch_sets_match_the_window_arrays(shape, patch, overlap, chunk, seed):
    # tasks carry PatchSets (index ranges) and compute corners and crop spans in closed form;
    # here they are checked against the grid's explicit window arrays, block by block
    grid = make_grid(shape, patch, overlap=overlap, chunks=chunk)
    if seed:  # a grid that skips some patches
        keep = np.random.default_rng(seed).random(tuple(len(a.starts) for a in grid.axes)) < 0.6
        grid = grid.with_active(keep)
    starts = [a.starts for a in grid.axes]
    crops = [a.crop_ranges() for a in grid.axes]
    windows = np.stack(np.meshgrid(*[np.arange(len(s)) for s in starts], indexing="ij"), -1).reshape(-1, grid.ndim)
    if grid.active is not None:
        windows = windows[grid.active[tuple(windows.T)]]
    corner = np.stack([starts[d][windows[:, d]] for d in range(grid.ndim)], axis=1)
    for block in np.ndindex(*grid.n_blocks):
        box = grid.block_box(block)
        inside = np.all([(corner[:, d] >= lo) & (corner[:, d] < hi) for d, (lo, hi) in enumerate(box)], axis=0)
        meets = np.all([(corner[:, d] < hi) & (corner[:, d] + patch > lo) for d, (lo, hi) in enumerate(box)], axis=0)
        owned = grid.owned(block)
        assert owned.starts().tolist() == corner[inside].tolist()  # raster order
        assert len(owned) == int(inside.sum())
        want_crop = np.stack([crops[d][windows[inside][:, d]] for d in range(grid.ndim)], axis=1)
        np.testing.assert_array_equal(owned.crop_boxes().reshape(-1, grid.ndim, 2), want_crop.reshape(-1, grid.ndim, 2))
        assert sorted(map(tuple, grid.covering(block).starts().tolist())) == sorted(map(tuple, corner[meets].tolist()))
