"""The tiled engine equals whole-image processing: identity, counting, MONAI, crop."""

from __future__ import annotations

import threading
from collections import Counter

import dask.array as da
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tileseg
from tileseg.errors import InputError, ModelError, TilingError
from tileseg.graph import plan
from tileseg.image import as_image, label_dtype
from tileseg.options import TilingOptions
from tileseg.tiling.grid import make_grid


def segment(*args, **kwargs):
    """The engine's lazy array (``tileseg.segment`` returns it inside an Image)."""
    return tileseg.segment(*args, **kwargs).data


def identity(batch):
    return batch


def dyadic(rng, shape):
    """Values with few significant bits, so float32 sums of copies are exact."""
    return (rng.integers(0, 4096, size=shape) / 16).astype(np.float32)


@st.composite
def engine_cases(draw):
    ndim = draw(st.sampled_from([2, 3]))
    hi = 70 if ndim == 2 else 24
    shape = tuple(draw(st.integers(3, hi)) for _ in range(ndim))
    patch = tuple(draw(st.integers(2, 20 if ndim == 2 else 10)) for _ in range(ndim))
    overlap = draw(st.sampled_from([0.0, 0.2, 0.25, 0.5, 0.7]))
    chunks = tuple(draw(st.integers(1, 40)) for _ in range(ndim))
    channels = draw(st.sampled_from([None, 2]))
    return shape, patch, overlap, chunks, channels


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=engine_cases(), seed=st.integers(0, 2**16))
def test_identity_constant_blend_gives_back_the_input_exactly(case, seed):
    shape, patch, overlap, chunks, channels = case
    rng = np.random.default_rng(seed)
    x = dyadic(rng, ((channels,) if channels else ()) + shape)
    y = segment(x, identity, patch_size=patch, overlap=overlap, blend="constant",
                output="logits", chunks=chunks, pad_mode="constant").compute()
    expected = x if channels else x[None]
    assert y.shape == expected.shape
    np.testing.assert_array_equal(y, expected)


@pytest.mark.parametrize("blend", ["crop", "gaussian", "hann"])
def test_identity_other_blends_give_back_the_input(blend):
    rng = np.random.default_rng(1)
    x = rng.random((45, 61, 30), dtype=np.float32)
    y = segment(x, identity, patch_size=(16, 16, 16), overlap=0.5, blend=blend,
                output="logits", chunks=(20, 13, 30)).compute()
    if blend == "crop":
        np.testing.assert_array_equal(y[0], x)
    else:
        np.testing.assert_allclose(y[0], x, rtol=2e-6)


class CountingPredictor:
    """Records the start corner of every patch it sees (encoded in the pixels)."""

    def __init__(self, n_classes=1):
        self.seen = Counter()
        self.calls = 0
        self.lock = threading.Lock()
        self.n_classes = n_classes

    def __call__(self, batch):
        with self.lock:
            self.calls += 1
            for patch in batch:
                self.seen[tuple(int(patch[c][(0,) * (batch.ndim - 2)]) for c in range(patch.shape[0]))] += 1
        return np.repeat(batch[:, :1], self.n_classes, axis=1)


@pytest.mark.parametrize("chunks", [7, 16, 25, 64, (10, 40, 33), 200])
def test_each_patch_predicted_exactly_once(chunks):
    shape, patch = (50, 70, 45), (16, 16, 16)
    coords = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))
    counter = CountingPredictor()
    segment(coords, counter, patch_size=patch, overlap=0.3, chunks=chunks, batch_size=5,
            output="labels", out_channels=1).compute(scheduler="threads")
    grid = make_grid(shape, patch, overlap=0.3)
    expected = {tuple(int(v) for v in s) for o in grid.owners() for s in grid.patches_of(o)}
    assert set(counter.seen) == expected
    assert max(counter.seen.values()) == 1
    assert sum(counter.seen.values()) == grid.n_patches == len(expected)


def test_patches_are_batched():
    counter = CountingPredictor()
    x = np.stack(np.meshgrid(np.arange(64.0), np.arange(64.0), indexing="ij")).astype(np.float32)
    segment(x, counter, patch_size=(8, 8), overlap=0.0, chunks=64, batch_size=16, out_channels=1).compute()
    assert sum(counter.seen.values()) == 64 and counter.calls == 4


# ---------------------------------------------------------------- MONAI oracle
# torch is optional: only the tests that take this fixture skip without it.
@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


def small_net(ndim, c_in=1, k=3, seed=0):
    import torch

    torch.manual_seed(seed)
    conv = torch.nn.Conv2d if ndim == 2 else torch.nn.Conv3d
    net = torch.nn.Sequential(conv(c_in, 4, 3, padding=1), torch.nn.Tanh(), conv(4, k, 3, padding=1))
    return net.eval()


def monai_reference(x, net, patch, overlap, mode, batch_size=4):
    import torch

    inferers = pytest.importorskip("monai.inferers")
    t = torch.from_numpy(x[None] if x.ndim == len(patch) + 1 else x[None, None])
    with torch.inference_mode():
        out = inferers.sliding_window_inference(
            t, patch, batch_size, net, overlap=overlap, mode=mode, padding_mode="constant", cval=0.0
        )
    return out[0].numpy()


@pytest.mark.parametrize("mode", ["constant", "gaussian"])
@pytest.mark.parametrize(
    "shape, patch, chunks",
    [
        ((61, 83), (24, 24), 13),  # chunks smaller than the patch
        ((61, 83), (24, 24), 24),  # equal
        ((61, 83), (24, 24), 50),  # larger
        ((17, 90), (24, 32), 40),  # padded axis (image smaller than the patch)
        ((23, 30, 19), (12, 12, 12), 7),
        ((23, 30, 19), (12, 12, 12), (12, 20, 19)),
        ((9, 30, 26), (12, 16, 16), 40),
    ],
)
def test_logits_match_monai_sliding_window(shape, patch, chunks, mode, torch):
    rng = np.random.default_rng(len(shape) * 7 + chunks if isinstance(chunks, int) else 3)
    x = rng.standard_normal(shape).astype(np.float32)
    net = small_net(len(shape))
    ref = monai_reference(x, net, patch, 0.4, mode)
    got = segment(x, net, patch_size=patch, overlap=0.4, blend=mode, output="logits", chunks=chunks,
                  pad_mode="constant", batch_size=3).compute()
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_multichannel_input_matches_monai(torch):
    x = np.random.default_rng(5).standard_normal((2, 40, 50)).astype(np.float32)
    net = small_net(2, c_in=2)
    ref = monai_reference(x, net, (16, 16), 0.25, "gaussian")
    got = segment(x, net, patch_size=(16, 16), overlap=0.25, output="logits", chunks=20).compute()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ndim", [2, 3])
def test_crop_blend_equals_one_whole_image_forward(ndim, torch):
    # two 3x3 convolutions: receptive-field radius 2 <= overlap_px / 2
    shape = (70, 95) if ndim == 2 else (30, 41, 36)
    patch = (20,) * ndim
    x = np.random.default_rng(ndim).standard_normal(shape).astype(np.float32)
    net = small_net(ndim)
    with torch.inference_mode():
        whole = net(torch.from_numpy(x[None, None]))[0].numpy()
    for chunks in (9, 25, 64):
        got = segment(x, net, patch_size=patch, overlap_px=4, overlap=None, blend="crop",
                      output="logits", chunks=chunks).compute()
        np.testing.assert_allclose(got, whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("output", ["logits", "probabilities", "labels"])
def test_result_does_not_depend_on_chunks(output, torch):
    x = np.random.default_rng(11).standard_normal((37, 52, 44)).astype(np.float32)
    net = small_net(3)
    results = [
        segment(da.from_array(x, chunks=c_in), net, patch_size=(16, 16, 16), overlap=0.5, output=output,
                chunks=c_out).compute()
        for c_in, c_out in [(37, 8), (10, 16), (20, (37, 30, 44)), (7, 100)]
    ]
    for r in results[1:]:
        if output == "labels":
            assert (r != results[0]).mean() < 1e-4  # only float near-ties may differ
        else:
            np.testing.assert_allclose(r, results[0], rtol=1e-5, atol=1e-6)


def test_probabilities_and_labels_follow_the_blended_logits(torch):
    x = np.random.default_rng(2).standard_normal((40, 40)).astype(np.float32)
    net = small_net(2)
    kw = dict(patch_size=(16, 16), overlap=0.5, chunks=17)
    logits = segment(x, net, output="logits", **kw).compute()
    probs = segment(x, net, output="probabilities", **kw).compute()
    labels = segment(x, net, output="labels", **kw).compute()
    ref = torch.softmax(torch.from_numpy(logits), 0).numpy()
    np.testing.assert_allclose(probs, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(labels, logits.argmax(0))
    assert labels.dtype == np.uint8
    single = segment(x, small_net(2, k=1), output="labels", **kw).compute()
    single_logits = segment(x, small_net(2, k=1), output="logits", **kw).compute()
    np.testing.assert_array_equal(single, (single_logits[0] > 0).astype(np.uint8))


def test_label_dtype_is_smallest_unsigned():
    assert label_dtype(1) == np.uint8 and label_dtype(256) == np.uint8
    assert label_dtype(257) == np.uint16 and label_dtype(70000) == np.uint32


# ---------------------------------------------------------------- bad input
def test_nan_input_raises_naming_the_box_or_is_filled():
    x = np.ones((40, 40), np.float32)
    x[30, 5] = np.nan
    y = segment(x, identity, patch_size=(16, 16), chunks=20, output="logits")
    with pytest.raises(InputError, match="NaN in pixel box"):
        y.compute()
    filled = segment(x, identity, patch_size=(16, 16), chunks=20, output="logits", blend="constant",
                     nan_policy="fill", fill_value=1.0).compute()
    np.testing.assert_array_equal(filled[0], np.ones_like(x))


def test_wrong_channel_count_for_the_model(torch):
    net = small_net(2, c_in=3)
    with pytest.raises(ModelError, match="3 input channels"):
        segment(np.zeros((1, 32, 32), np.float32), net, patch_size=(16, 16))


def test_patch_and_overlap_errors():
    x = np.zeros((32, 32), np.float32)
    with pytest.raises(TilingError, match="overlap: must be >= 0"):
        segment(x, identity, patch_size=(16, 16), overlap=-0.5)
    with pytest.raises(TilingError, match="more than"):
        segment(np.zeros((4, 4, 4), np.float32), identity, patch_size=(1024, 1024, 1024))
    with pytest.raises(TilingError, match="patch_size .* has 3 axes"):
        segment(as_image(x), identity, patch_size=(8, 8, 8))
    with pytest.raises(InputError, match="unsupported dtype complex"):
        segment(x.astype(np.complex64), identity, patch_size=(16, 16))


def test_model_with_wrong_output_shape():
    with pytest.raises(ModelError, match="expected"):
        segment(np.zeros((32, 32), np.float32), lambda b: b[:, :, :4], patch_size=(16, 16))


def test_plan_counts_patches_without_computing():
    x = da.zeros((1000, 700), chunks=100, dtype=np.uint8)
    p = plan(as_image(x), TilingOptions(patch_size=(128, 128), overlap=0.25, chunks=256), out_channels=2)
    grid = make_grid((1000, 700), (128, 128), overlap=0.25)
    assert p["n_patches"] == grid.n_patches == 11 * 7  # ceil((1000-128)/96)+1, ceil((700-128)/96)+1
    assert p["chunks"] == (256, 256) and p["n_blocks"] == 4 * 3
    assert p["est_peak_task_bytes"] > 4 * 3 * 256 * 256
