"""Final reductions: the slabbed argmax equals NumPy's, the pieces are summed like a whole block."""

from __future__ import annotations

import numpy as np
import pytest

from tileseg.stitching import reduce
from tileseg.stitching.reduce import first_argmax, labels_from_pieces, reduce_logits, scores_from_pieces


@pytest.mark.parametrize("k", [2, 3, 16, 64, 300])
@pytest.mark.parametrize("shape", [(7,), (5, 9), (3, 4, 6)])
def test_first_argmax_equals_numpy_also_on_ties(k, shape):
    rng = np.random.default_rng(k)
    scores = rng.integers(0, 4, size=(k,) + shape).astype(np.float32)  # many ties
    out = np.empty(shape, np.uint16)
    np.testing.assert_array_equal(first_argmax(scores, out), np.argmax(scores, axis=0))
    scores = rng.standard_normal((k,) + shape).astype(np.float32)
    np.testing.assert_array_equal(first_argmax(scores, np.empty(shape, np.uint16)), np.argmax(scores, axis=0))


def test_first_argmax_nan_and_infinities_like_numpy():
    scores = np.array([[0, np.nan, 1, -np.inf, np.inf],
                       [np.nan, 2, 1, np.inf, -np.inf],
                       [3, np.nan, 1, 0, np.inf]], np.float32)
    np.testing.assert_array_equal(first_argmax(scores, np.empty(5, np.uint8)), np.argmax(scores, axis=0))


def _pieces(rng, block, k, n):
    """Random boxes inside ``block`` with random scores; their sum over the block by hand."""
    total = np.zeros((k,) + tuple(b - a for a, b in block), np.float32)
    pieces = []
    for _ in range(n):
        box = []
        for a, b in block:
            lo = int(rng.integers(a, b))
            box.append((lo, int(rng.integers(lo + 1, b + 1))))
        box = tuple(box)
        arr = rng.standard_normal((k,) + tuple(b - a for a, b in box)).astype(np.float32)
        total[(slice(None),) + tuple(slice(a - o[0], b - o[0]) for (a, b), o in zip(box, block))] += arr
        pieces.append((box, arr))
    full = (tuple(block), rng.standard_normal((k,) + total.shape[1:]).astype(np.float32))
    return [full] + pieces, total + full[1]


@pytest.mark.parametrize("k", [1, 4, 20])
@pytest.mark.parametrize("block", [((10, 47), (3, 30)), ((0, 9), (5, 17), (2, 11))])
def test_labels_from_pieces_equal_argmax_of_the_summed_block(k, block, monkeypatch):
    monkeypatch.setattr(reduce, "SLAB_BYTES", 64)  # many slabs, pieces cut across slab edges
    rng = np.random.default_rng(k + len(block))
    pieces, total = _pieces(rng, block, k, 6)
    before = [p[1].copy() for p in pieces]
    got = labels_from_pieces(block, k, "uint8", pieces)
    expected = (total[0] > 0) if k == 1 else np.argmax(total, axis=0)
    # the slabs sum in another order than ``total``: only float near-ties may differ
    assert got.dtype == np.uint8 and got.shape == total.shape[1:]
    assert (got != expected).mean() < 0.01
    for p, b in zip(pieces, before):
        np.testing.assert_array_equal(p[1], b)  # inputs untouched: a rerun gives the same block


def test_labels_from_pieces_exact_on_dyadic_scores_and_uncovered_pixels_are_zero(monkeypatch):
    monkeypatch.setattr(reduce, "SLAB_BYTES", 100)
    rng = np.random.default_rng(3)
    block = ((4, 40), (0, 25))
    total = np.zeros((5, 36, 25), np.float32)
    pieces = []
    for box in (((4, 20), (0, 25)), ((10, 40), (3, 20)), ((30, 40), (20, 25))):
        arr = (rng.integers(-64, 64, size=(5,) + tuple(b - a for a, b in box)) / 8).astype(np.float32)
        total[(slice(None),) + tuple(slice(a - o[0], b - o[0]) for (a, b), o in zip(box, block))] += arr
        pieces.append((box, arr))
    got = labels_from_pieces(block, 5, "uint16", pieces)
    np.testing.assert_array_equal(got, np.argmax(total, axis=0))
    assert (got[16:26, 20:] == 0).all()  # rows 20-30, columns 20-25: no piece


@pytest.mark.parametrize("output", ["logits", "probabilities"])
@pytest.mark.parametrize("k", [1, 3])
def test_scores_from_pieces_normalise_and_activate(output, k):
    rng = np.random.default_rng(7)
    block = ((0, 12), (5, 20))
    pieces, total = _pieces(rng, block, k, 4)
    weight = rng.uniform(0.5, 2.0, size=total.shape[1:]).astype(np.float32)
    weight[0, :3] = 0  # no patch there: not divided (the sum is 0 in the engine)
    got = scores_from_pieces(block, k, output, pieces, weight)
    logits = np.where(weight > 0, total / np.where(weight > 0, weight, 1), total).astype(np.float32)
    if output == "probabilities":
        if k == 1:
            ref = 1 / (1 + np.exp(-logits))
        else:
            e = np.exp(logits - logits.max(0))
            ref = e / e.sum(0)
    else:
        ref = logits
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_reduce_logits_leaves_its_input_alone():
    logits = np.random.default_rng(0).standard_normal((4, 30, 20)).astype(np.float32)
    before = logits.copy()
    np.testing.assert_array_equal(reduce_logits(logits, "labels", "uint8"), np.argmax(before, axis=0))
    probs = reduce_logits(logits, "probabilities", "float32")
    np.testing.assert_array_equal(logits, before)
    e = np.exp(before - before.max(0))
    np.testing.assert_allclose(probs, e / e.sum(0), rtol=1e-6)
    single = reduce_logits(logits[:1], "labels", "uint8")
    np.testing.assert_array_equal(single, (before[0] > 0).astype(np.uint8))
