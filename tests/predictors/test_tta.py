"""Flip test-time augmentation: folded into one batch, averaged as logits.

Oracles are computed by hand with torch: each flipped batch forwarded on its
own, flipped back, averaged. The models are deliberately not flip-symmetric
(random convolution weights), so TTA changes the result and a wrong flip,
a missing copy or averaging after softmax would show.
"""

from __future__ import annotations

import sys
import textwrap
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import tileseg  # noqa: E402
from tileseg.errors import ConfigError  # noqa: E402
from tileseg.predictors import CallablePredictor, load_predictor  # noqa: E402
from tileseg.predictors.tta import FlipTTAPredictor, flip_sets, fold, unfold  # noqa: E402
from tileseg.predictors.unet import UNet  # noqa: E402

sys.path.insert(0, str(Path(__file__).parents[1]))
from pipeline_helpers import write_scene  # noqa: E402

AXIS_DIM = {"x": -1, "y": -2, "z": -3}


def asymmetric_conv(ndim: int = 2, classes: int = 2, seed: int = 0):
    """Two 3x3 convolutions with random (not flip-symmetric) weights: receptive-field radius 2."""
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d if ndim == 2 else torch.nn.Conv3d
    return torch.nn.Sequential(conv(1, 3, 3, padding=1), torch.nn.Tanh(), conv(3, classes, 3, padding=1)).eval()


def by_hand(net, batch: np.ndarray, axes) -> np.ndarray:
    """Mean over every combination of flips of ``flip(net(flip(batch)))``, one forward per combination."""
    dims = [batch.ndim + AXIS_DIM[a] for a in axes]
    outs = []
    with torch.inference_mode():
        x = torch.from_numpy(np.ascontiguousarray(batch))
        for r in range(len(dims) + 1):
            for c in combinations(dims, r):
                y = net(x.flip(c) if c else x)
                outs.append(y.flip(c) if c else y)
    return torch.stack(outs).mean(0).numpy()


def plain(net, batch: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return net(torch.from_numpy(np.ascontiguousarray(batch))).numpy()


def whole_image_tta(net, image: np.ndarray, axes) -> np.ndarray:
    """``(K, *shape)``: TTA logits of one forward over the whole image (no tileseg)."""
    return by_hand(net, image[None, None].astype(np.float32), axes)[0]


@pytest.fixture
def unet2d():
    torch.manual_seed(0)
    m = UNet(in_channels=1, out_channels=3, spatial_dims=2, depth=3, base_features=4)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    return m.eval()


def test_flip_sets_and_fold_round_trip():
    assert flip_sets(["x"], 4) == [(), (3,)]
    assert flip_sets(["z", "x"], 5) == [(), (2,), (4,), (2, 4)]
    assert flip_sets(["x", "y", "z"], 5) == [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]
    x = np.random.default_rng(0).random((2, 1, 3, 5)).astype(np.float32)
    flips = flip_sets(["y", "x"], 4)
    folded = fold(x, flips)
    assert folded.shape == (8, 1, 3, 5)
    np.testing.assert_array_equal(folded[2:4], x[:, :, ::-1])  # the y-flipped copy of both patches
    np.testing.assert_array_equal(folded[6:8], x[:, :, ::-1, ::-1])
    np.testing.assert_allclose(unfold(folded, flips), x)  # each copy flipped back: the mean is x
    t = torch.from_numpy(x)
    np.testing.assert_array_equal(fold(t, flips).numpy(), folded)
    np.testing.assert_allclose(unfold(fold(t, flips), flips).numpy(), x)
    with pytest.raises(ConfigError, match=r"cannot flip axis 'z' of 2D"):
        flip_sets(["z"], 4)
    with pytest.raises(ConfigError, match=r"unknown axis 'w'"):
        flip_sets(["w"], 4)


@pytest.mark.parametrize("axes", [["x"], ["y", "x"]])
def test_torch_predictor_tta_is_one_forward_and_equals_the_mean_by_hand(unet2d, axes):
    batch = np.random.default_rng(1).normal(size=(3, 1, 32, 48)).astype(np.float32)
    seen = []
    unet2d.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    p = load_predictor(unet2d, device="cpu", tta=axes)
    out = p(batch)
    assert seen == [(3 * 2 ** len(axes), 1, 32, 48)]  # every flipped copy in the same forward
    want = by_hand(unet2d, batch, axes)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    assert np.abs(want - plain(unet2d, batch)).max() > 1e-2  # the flips matter for this model
    assert p.describe()["tta"] == sorted(axes, key=AXIS_DIM.get)


def test_tta_3d_on_chosen_axes_only():
    net = asymmetric_conv(3)
    batch = np.random.default_rng(2).normal(size=(2, 1, 8, 10, 12)).astype(np.float32)
    out = load_predictor(net, device="cpu", tta=["z", "x"])(batch)
    np.testing.assert_allclose(out, by_hand(net, batch, ["z", "x"]), rtol=1e-5, atol=1e-6)
    assert np.abs(out - by_hand(net, batch, ["z", "y", "x"])).max() > 1e-3  # y was not flipped


def test_tta_wraps_any_predictor_in_one_call():
    net = asymmetric_conv(2)
    calls = []

    def model(b):
        calls.append(b.shape[0])
        return plain(net, b)

    batch = np.random.default_rng(3).normal(size=(4, 1, 16, 16)).astype(np.float32)
    p = load_predictor(model, tta=["y", "x"])
    assert isinstance(p, FlipTTAPredictor)
    np.testing.assert_allclose(p(batch), by_hand(net, batch, ["y", "x"]), rtol=1e-5, atol=1e-6)
    assert calls == [16]
    assert p.describe() == {"type": "callable", "name": "model", "tta": ["y", "x"]}
    with pytest.raises(ConfigError, match="model.compile: applies to PyTorch models only"):
        load_predictor(model, compile=True)
    with pytest.raises(ConfigError, match="model.channels_last: applies to PyTorch models only"):
        load_predictor(CallablePredictor(model), channels_last=True)


def test_segment_with_tta_equals_a_model_doing_it_by_hand():
    """Gaussian blending: tileseg's TTA == the same engine running a callable that averages by hand."""
    net = asymmetric_conv(2)
    image = np.random.default_rng(4).normal(size=(70, 90)).astype(np.float32)
    kw = dict(patch_size=(24, 24), overlap=0.25, chunks=(40, 40), output="logits", batch_size=3)
    got = tileseg.segment(image, net, tta=["y", "x"], **kw).data.compute(scheduler="threads")
    want = tileseg.segment(image, lambda b: by_hand(net, b, ["y", "x"]), **kw).data.compute(scheduler="threads")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    no_tta = tileseg.segment(image, net, **kw).data.compute(scheduler="threads")
    assert np.abs(got - no_tta).max() > 1e-2


@pytest.mark.parametrize("axes", [["x"], ["y", "x"]])
def test_segment_with_tta_and_crop_equals_whole_image_tta(axes):
    """Crop blending with a margin >= the receptive field: every kept pixel saw the whole-image context."""
    net = asymmetric_conv(2)
    image = np.random.default_rng(5).normal(size=(61, 77)).astype(np.float32)
    got = tileseg.segment(image, net, tta=axes, patch_size=(24, 24), overlap_px=8, blend="crop", chunks=(32, 32),
                          output="logits", batch_size=4).data.compute(scheduler="threads")
    np.testing.assert_allclose(got, whole_image_tta(net, image, axes), rtol=0, atol=1e-5)


def _save_script(module, path: Path) -> Path:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(module).save(str(path))
    return path


def test_pipeline_tta_from_yaml(tmp_path):
    from tileseg.runner import run_pipeline

    net = asymmetric_conv(2)
    _save_script(net, tmp_path / "model.pt")
    image, _ = write_scene(tmp_path / "a.zarr", shape=(50, 70), seed=3)
    pipe = tmp_path / "p.yaml"
    pipe.write_text(textwrap.dedent("""\
        version: 1
        input: {path: a.zarr, array: image}
        tiling: {patch_size: [24, 24], overlap_px: [8, 8], blend: crop, chunks: [32, 32]}
        model: {torchscript: {path: model.pt}, output: logits, batch_size: 4, tta: [x, y]}
        output: {path: "out/{stem}.zarr"}
        execution: {scheduler: threads, workers: 2}
        """))
    report = run_pipeline(pipe)
    assert report.ok, report.items[0].error
    assert report.pipeline["model"]["tta"] == ["y", "x"]
    got = tileseg.open(report.items[0].output).data.compute()
    np.testing.assert_allclose(got, whole_image_tta(net, image, ["y", "x"]), rtol=0, atol=1e-5)
    # a 2D pipeline cannot flip z; unknown names are refused with the key named
    for bad, msg in (("[z]", r"model.tta: cannot flip axis 'z' of 2D patches"), ("[q]", r"model.tta.*unknown axis 'q'")):
        pipe.write_text(pipe.read_text().replace("tta: [x, y]", f"tta: {bad}").replace("tta: [z]", f"tta: {bad}"))
        with pytest.raises(ConfigError, match=msg):
            run_pipeline(pipe)


def test_tta_predictors_pickle_with_their_axes():
    import pickle

    net = asymmetric_conv(2)
    batch = np.random.default_rng(6).normal(size=(2, 1, 16, 16)).astype(np.float32)
    want = by_hand(net, batch, ["x"])
    # folded on the device by the torch predictor, or by the generic wrapper around a plain one
    for p in (load_predictor(net, device="cpu", tta=["x"]), FlipTTAPredictor(load_predictor(net, device="cpu"), ["x"])):
        q = pickle.loads(pickle.dumps(p))
        assert q.in_channels == 1 and q.out_channels == 2
        np.testing.assert_allclose(q(batch), want, rtol=1e-5, atol=1e-6)


def test_tta_on_a_channels_last_model_flips_its_spatial_axes():
    """layout NHWC: the flips land on the model's H and W axes, not on its channel axis."""
    from tileseg.predictors.conventions import Conventions
    from tileseg.predictors.torch import TorchPredictor

    net = asymmetric_conv(2)

    class NHWC(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

    batch = np.random.default_rng(7).normal(size=(3, 1, 16, 20)).astype(np.float32)
    p = TorchPredictor(NHWC().eval(), device="cpu", conventions=Conventions(layout="NHWC"), tta=["y", "x"])
    np.testing.assert_allclose(p(batch), by_hand(net, batch, ["y", "x"]), rtol=1e-5, atol=1e-6)
