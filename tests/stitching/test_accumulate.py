"""Owner accumulators: the torch and NumPy paths add the same weighted patches as a plain loop."""

from __future__ import annotations

import numpy as np
import pytest

import tileseg
from tileseg.predictors import CallablePredictor
from tileseg.stitching.accumulate import NumpyAccumulator, TorchAccumulator, accumulator
from tileseg.stitching.weights import blend_window


def _patches(rng, shape, patch, n, k):
    starts = [tuple(int(rng.integers(0, s - p + 1)) for s, p in zip(shape, patch)) for _ in range(n)]
    preds = rng.standard_normal((n, k) + patch).astype(np.float32)
    return starts, preds


def _reference(shape, patch, starts, preds, window):
    ref = np.zeros((preds.shape[1],) + shape, np.float64)
    for s, p in zip(starts, preds):
        ref[(slice(None),) + tuple(slice(a, a + q) for a, q in zip(s, patch))] += p * window
    return ref


@pytest.mark.parametrize("path", ["numpy", "torch"])
def test_windowed_sum_matches_a_plain_loop(path):
    rng = np.random.default_rng(0)
    shape, patch = (30, 41, 22), (12, 16, 10)
    window = blend_window(patch, "gaussian")
    starts, preds = _patches(rng, shape, patch, 9, 3)
    if path == "torch":
        torch = pytest.importorskip("torch")
        preds_in = torch.from_numpy(preds)
    else:
        preds_in = preds
    acc = accumulator(preds_in, 3, shape, window)
    assert isinstance(acc, TorchAccumulator if path == "torch" else NumpyAccumulator)
    for s, p in zip(starts, preds_in):
        acc.add(p, tuple(slice(a, a + q) for a, q in zip(s, patch)))
    got = acc.result()
    assert isinstance(got, np.ndarray) and got.dtype == np.float32
    np.testing.assert_allclose(got, _reference(shape, patch, starts, preds, window), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", ["numpy", "torch"])
def test_crop_adds_the_kept_part_only(path):
    rng = np.random.default_rng(1)
    preds = rng.standard_normal((2, 2, 8, 8)).astype(np.float32)
    pred_in = preds
    if path == "torch":
        torch = pytest.importorskip("torch")
        pred_in = torch.from_numpy(preds)
    acc = accumulator(pred_in, 2, (20, 20), None)
    acc.add_crop(pred_in[0], (slice(3, 7), slice(0, 8)), (slice(3, 7), slice(0, 8)))
    acc.add_crop(pred_in[1], (slice(7, 12), slice(10, 14)), (slice(0, 5), slice(2, 6)))
    ref = np.zeros((2, 20, 20), np.float32)
    ref[:, 3:7, 0:8] = preds[0][:, 3:7, 0:8]
    ref[:, 7:12, 10:14] = preds[1][:, 0:5, 2:6]
    np.testing.assert_array_equal(acc.result(), ref)


def test_torch_and_numpy_paths_give_the_same_segmentation():
    """A torch model stitches with torch; the same model behind a NumPy callable stitches with NumPy."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.Tanh(),
                              torch.nn.Conv3d(4, 5, 1)).eval()

    def as_numpy(batch):
        with torch.inference_mode():
            return net(torch.from_numpy(batch)).numpy()

    x = np.random.default_rng(2).standard_normal((21, 37, 30)).astype(np.float32)
    kw = dict(patch_size=(12, 12, 12), overlap=0.5, chunks=(21, 16, 20), batch_size=3)
    ours = {}
    for name, model in (("torch", net), ("numpy", CallablePredictor(as_numpy, 1, 5))):
        ours[name] = {out: tileseg.segment(x, model, output=out, **kw).data.compute()
                      for out in ("logits", "labels")}
    np.testing.assert_allclose(ours["torch"]["logits"], ours["numpy"]["logits"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(ours["torch"]["labels"], np.argmax(ours["torch"]["logits"], axis=0))
    assert (ours["torch"]["labels"] != ours["numpy"]["labels"]).mean() < 1e-3  # float near-ties only
