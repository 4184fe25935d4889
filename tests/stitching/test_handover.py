"""Owner hand-over geometry: the interior an owner reduces is written by no other owner (pixels no patch covers
stay 0 either way); strips tile the rest."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from tileseg.graph import _handovers
from tileseg.stitching.handover import box_minus
from tileseg.tiling.grid import make_grid


def _sl(box):
    return tuple(slice(a, b) for a, b in box)


@st.composite
def grids(draw):
    ndim = draw(st.integers(2, 3))
    shape = tuple(draw(st.integers(5, 40)) for _ in range(ndim))
    patch = tuple(draw(st.integers(2, 16)) for _ in range(ndim))
    overlap = draw(st.sampled_from([0.0, 0.25, 0.5, 0.7]))
    chunks = tuple(draw(st.integers(3, 30)) for _ in range(ndim))
    grid = make_grid(shape, patch, overlap=overlap, chunks=chunks)
    if draw(st.booleans()):  # some patches skipped (nodata): regions shrink, pixels may stay uncovered
        rng = np.random.default_rng(draw(st.integers(0, 2**16)))
        active = rng.random(tuple(len(a.starts) for a in grid.axes)) < 0.7
        if active.any():
            grid = grid.with_active(active)
    return grid


@settings(max_examples=60, deadline=None)
@given(grids())
def test_interior_is_covered_by_its_owner_only(grid):
    owners = list(grid.owners())
    cover = {}  # owner -> boolean map of the pixels its patches cover
    for o in owners:
        m = np.zeros(grid.padded_shape, bool)
        for s in grid.patches_of(o):
            m[tuple(slice(int(a), int(a) + p) for a, p in zip(s, grid.patch_size))] = True
        cover[o] = m
    for o, h in _handovers(grid, owners, "labels", "|u1").items():
        assert h.block == grid.block_box(o)
        assert set(h.targets) == {grid.block_box(t) for t in grid.targets(o) if t != o}
        if h.interior is None:
            continue
        inner = _sl(h.interior)
        assert all(r0 <= a and b <= r1 for (a, b), (r0, r1) in zip(h.interior, grid.region(o)))
        for other in owners:
            if other != o:
                assert not cover[other][inner].any(), f"owner {other} also writes into the interior of {o}"


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_box_minus_tiles_the_rest_of_the_box(data):
    ndim = data.draw(st.integers(1, 3))
    box = tuple((0, data.draw(st.integers(1, 9))) for _ in range(ndim))
    inner = []
    for _, n in box:
        a = data.draw(st.integers(0, n - 1))
        inner.append((a, data.draw(st.integers(a + 1, n))))
    inner = tuple(inner) if data.draw(st.booleans()) else None
    count = np.zeros(tuple(n for _, n in box), int)
    for part in box_minus(box, inner):
        assert all(a < b for a, b in part)
        count[_sl(part)] += 1
    expected = np.ones_like(count)
    if inner is not None:
        expected[_sl(inner)] = 0
    np.testing.assert_array_equal(count, expected)


def test_dask_sees_the_size_of_an_owner_result():
    from dask.sizeof import sizeof

    from tileseg.stitching.handover import OwnerResult, OwnPiece

    labels, strip, spill = np.zeros((30, 40), np.uint8), np.zeros((5, 8, 40), np.float32), np.zeros((5, 30, 6))
    own = OwnPiece(((8, 38), (0, 40)), labels, ((((0, 8), (0, 40)), strip),))
    res = OwnerResult(((0, 38), (0, 46)), own, {((0, 38), (40, 80)): (((0, 30), (40, 46)), spill)})
    assert labels.nbytes + strip.nbytes + spill.nbytes <= sizeof(res) < labels.nbytes + strip.nbytes + spill.nbytes + 1024


def test_dask_sees_the_accumulator_that_strip_views_keep_alive():
    """On the CPU the own strips are views of the owner's accumulator: the whole buffer stays alive, count it once."""
    from dask.sizeof import sizeof

    from tileseg.stitching.handover import OwnerResult, OwnPiece

    acc = np.zeros((5, 38, 46), np.float32)
    labels = np.zeros((30, 40), np.uint8)
    top, side = acc[:, :8, :40], acc[:, 8:, 40:]  # two views of one buffer
    own = OwnPiece(((8, 38), (0, 40)), labels, ((((0, 8), (0, 40)), top), (((8, 38), (40, 46)), side)))
    res = OwnerResult(((0, 38), (0, 46)), own, {})
    assert acc.nbytes + labels.nbytes <= sizeof(res) < acc.nbytes + labels.nbytes + 1024
    assert acc.nbytes + labels.nbytes <= sizeof(own) < acc.nbytes + labels.nbytes + 1024
