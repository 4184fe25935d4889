"""Speed options of the torch predictor: autocast, channels-last, torch.compile, the CUDA copy path.

Each is compared with the plain fp32 forward of the same module. The CUDA
tests run only where a GPU is visible.
"""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import tileseg  # noqa: E402
from tileseg.predictors import load_predictor  # noqa: E402
from tileseg.predictors.torch import clear_cache  # noqa: E402
from tileseg.predictors.unet import UNet  # noqa: E402

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def net():
    torch.manual_seed(0)
    return UNet(in_channels=1, out_channels=2, spatial_dims=2, depth=3, base_features=8).eval()


@pytest.fixture
def batch():
    return np.random.default_rng(0).normal(size=(4, 1, 32, 32)).astype(np.float32)


def _reference(module, batch):
    with torch.inference_mode():
        return module(torch.from_numpy(batch)).float().numpy()


def test_bf16_autocast_on_cpu_is_close_to_fp32_and_really_bf16(net, batch):
    ref = _reference(net, batch)
    out = load_predictor(net, device="cpu", precision="bf16")(batch)
    assert out.dtype == np.float32
    err = np.abs(out - ref).max()
    assert 0 < err < 0.05 * np.abs(ref).max()  # not bit-identical: the convolutions ran in bf16
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = net(torch.from_numpy(batch)).float().numpy()
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-6)  # exactly torch's own CPU autocast
    image = np.random.default_rng(1).normal(size=(50, 60)).astype(np.float32)
    kw = dict(patch_size=(32, 32), output="logits", chunks=(32, 32))
    seg32 = tileseg.segment(image, net, **kw).data.compute()
    seg16 = tileseg.segment(image, net, precision="bf16", **kw).data.compute()
    assert 0 < np.abs(seg16 - seg32).max() < 0.05 * np.abs(seg32).max()


def test_channels_last_same_result_and_layout(net, batch):
    seen = []
    net.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    p = load_predictor(net, device="cpu", channels_last=True)
    np.testing.assert_allclose(p(batch), _reference(net, batch), rtol=1e-4, atol=1e-5)
    assert seen[-1] is True
    first_conv = next(m for m in p.module.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert p.describe()["channels_last"] is True


def test_channels_last_3d():
    torch.manual_seed(0)
    net3 = UNet(in_channels=1, out_channels=2, spatial_dims=3, depth=2, base_features=4).eval()
    b = np.random.default_rng(2).normal(size=(2, 1, 16, 16, 16)).astype(np.float32)
    out = load_predictor(net3, device="cpu", channels_last=True)(b)
    np.testing.assert_allclose(out, _reference(net3, b), rtol=1e-4, atol=1e-5)


def test_compile_a_tiny_model():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(1, 2, 3, padding=1).eval()
    b = np.random.default_rng(3).normal(size=(2, 1, 16, 16)).astype(np.float32)
    p = load_predictor(conv, device="cpu", compile=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager would warn
        try:
            out = p(b)
        except RuntimeWarning as w:
            pytest.skip(f"torch.compile cannot run here: {w}")
    np.testing.assert_allclose(out, _reference(conv, b), rtol=1e-5, atol=1e-5)
    assert p.describe()["compile"] is True


def test_compile_failure_falls_back_to_eager_with_one_warning(net, batch, monkeypatch):
    clear_cache()
    made = []

    def broken_compile(module, **kw):
        def run(x):
            raise RuntimeError("InductorError: no C++ compiler found")

        made.append(module)
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    p = load_predictor(net, device="cpu", compile=True)
    with pytest.warns(RuntimeWarning, match=r"model.compile: torch.compile failed .*no C\+\+ compiler.*eager"):
        out = p(batch)
    np.testing.assert_allclose(out, _reference(net, batch), rtol=1e-5, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p(batch)  # eager from now on, silently
    assert len(made) == 1

    def missing(module, **kw):
        raise RuntimeError("Dynamo is not supported on this Python")

    monkeypatch.setattr(torch, "compile", missing)
    q = load_predictor(net, device="cpu", compile=True)
    with pytest.warns(RuntimeWarning, match=r"torch.compile is not available here.*Dynamo is not supported"):
        np.testing.assert_allclose(q(batch), out, rtol=1e-6, atol=1e-6)


def test_model_errors_under_compile_are_still_model_errors(monkeypatch):
    from tileseg.errors import ModelError

    monkeypatch.setattr(torch, "compile", lambda module, **kw: module.forward)  # a "compiled" model
    p = load_predictor(torch.nn.Conv2d(1, 2, 3), device="cpu", compile=True, )
    with pytest.raises(ModelError, match="model expects 1 input channels"):
        p(np.zeros((1, 3, 8, 8), np.float32))


@cuda
def test_cuda_path_matches_cpu_with_threads_and_tta(net, batch):
    cpu = load_predictor(net, device="cpu", tta=["y", "x"])(batch)
    g = load_predictor(net, device="cuda", tta=["y", "x"])
    batches = [batch * s for s in (1.0, 0.5, 2.0, -1.0)] * 3
    with ThreadPoolExecutor(3) as pool:  # pinned buffers per thread, uploads overlapping forwards
        outs = list(pool.map(g, batches))
    np.testing.assert_allclose(outs[0], cpu, rtol=1e-3, atol=1e-3)
    for b, o in zip(batches, outs):
        np.testing.assert_allclose(o, load_predictor(net, device="cpu", tta=["y", "x"])(b), rtol=1e-3, atol=1e-3)
    assert torch.backends.cudnn.benchmark is True


@cuda
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_cuda_autocast_close_to_fp32(net, batch, precision):
    ref = load_predictor(net, device="cuda")(batch)
    out = load_predictor(net, device="cuda", precision=precision, channels_last=True)(batch)
    assert 0 < np.abs(out - ref).max() < 0.05 * np.abs(ref).max()
