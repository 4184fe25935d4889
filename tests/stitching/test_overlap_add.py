"""Task bodies of the engine: safe to rerun, weights recomputed from geometry."""

from __future__ import annotations

import numpy as np

from tileseg.stitching.overlap_add import finalize_block, weight_sum
from tileseg.stitching.weights import blend_window
from tileseg.tiling.grid import make_grid


def test_finalize_does_not_modify_its_inputs_so_a_rerun_gives_the_same_chunk():
    grid = make_grid((40, 40), (16, 16), overlap=0.5, chunks=40)
    window = blend_window((16, 16), "gaussian")
    block = grid.block_box((0, 0))
    piece = (block, np.random.default_rng(0).random((2, 40, 40), dtype=np.float32))
    before = piece[1].copy()
    starts = grid.patches_overlapping((0, 0))
    first = finalize_block(block, 2, "logits", "float32", starts, window, piece)
    second = finalize_block(block, 2, "logits", "float32", starts, window, piece)
    np.testing.assert_array_equal(piece[1], before)
    np.testing.assert_array_equal(first, second)
    # and the chunk is right: the weighted sum divided by the windows summed by hand
    total = np.zeros((40, 40), np.float32)
    for s in starts:
        total[s[0] : s[0] + 16, s[1] : s[1] + 16] += window
    np.testing.assert_allclose(first, before / total, rtol=1e-6)


def test_weight_sum_equals_the_sum_of_windows_over_the_whole_image():
    grid = make_grid((50, 37), (16, 12), overlap=0.3, chunks=(20, 15))
    window = blend_window((16, 12), "hann")
    full = np.zeros((50, 37), np.float32)
    for o in grid.owners():
        for s in grid.patches_of(o):
            full[s[0] : s[0] + 16, s[1] : s[1] + 12] += window
    for by in range(grid.n_blocks[0]):
        for bx in range(grid.n_blocks[1]):
            box = grid.block_box((by, bx))
            got = weight_sum(box, grid.patches_overlapping((by, bx)), window)
            np.testing.assert_allclose(got, full[box[0][0] : box[0][1], box[1][0] : box[1][1]], rtol=1e-6)
