"""Stitching on the model's device: the same code on the CPU as on a GPU, results equal to the host path and
MONAI, and only what an output block needs crosses to the host."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import tileseg  # noqa: E402
from tileseg.predictors import CallablePredictor, oom  # noqa: E402
from tileseg.predictors.conventions import Conventions  # noqa: E402
from tileseg.predictors.torch import TorchPredictor  # noqa: E402
from tileseg.stitching import accumulate  # noqa: E402
from tileseg.tiling.grid import make_grid  # noqa: E402


def _net(ndim: int, k: int, seed: int = 0):
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d if ndim == 2 else torch.nn.Conv3d
    return torch.nn.Sequential(conv(1, 4, 3, padding=1), torch.nn.Tanh(), conv(4, k, 1)).eval()


def _host(net):
    """The same model behind a NumPy callable: stitched by the NumPy path on the host."""
    def forward(batch):
        with torch.inference_mode():
            return net(torch.from_numpy(batch)).numpy()
    return CallablePredictor(forward, 1, net[-1].out_channels)


def _structured(shape, seed=0):
    """Smooth blobs plus noise: class borders run across block and patch borders."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(0, 3 * np.pi, n) for n in shape], indexing="ij")
    return (np.sin(sum(g * (i + 1) for i, g in enumerate(grids))) + 0.3 * rng.standard_normal(shape)).astype(
        np.float32)


def _monai(x, net, patch, overlap):
    inferers = pytest.importorskip("monai.inferers")
    with torch.inference_mode():
        out = inferers.sliding_window_inference(torch.from_numpy(x[None, None]), patch, 3, net, overlap=overlap,
                                                mode="gaussian", padding_mode="constant", cval=0.0)
    return out[0].numpy()


def _clear_ties(scores, labels, ref_labels, margin=1e-4):
    """Labels agree wherever the reference's best class leads the runner-up by ``margin``."""
    top2 = np.sort(scores, axis=0)[-2:]
    clear = (top2[1] - top2[0]) > margin
    np.testing.assert_array_equal(labels[clear], ref_labels[clear])
    assert clear.mean() > 0.99


@pytest.mark.parametrize("shape, patch, chunks, k", [
    ((61, 83), (24, 24), 13, 5),  # chunks smaller than the patch: most pixels in strips
    ((61, 83), (24, 24), 50, 3),
    ((23, 30, 19), (12, 12, 12), (12, 20, 19), 6),
    ((30, 41, 36), (12, 16, 12), 40, 2),  # one block: all interior
])
def test_device_path_equals_host_path_and_monai(shape, patch, chunks, k):
    x = _structured(shape)
    net = _net(len(shape), k)
    ref = _monai(x, net, patch, 0.5)
    kw = dict(patch_size=patch, overlap=0.5, chunks=chunks, batch_size=3, pad_mode="constant")
    dev = {o: tileseg.segment(x, TorchPredictor(net, device="cpu"), output=o, **kw).data.compute()
           for o in ("labels", "logits", "probabilities")}
    host = {o: tileseg.segment(x, _host(net), output=o, **kw).data.compute() for o in ("labels", "logits")}
    np.testing.assert_allclose(dev["logits"], ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dev["logits"], host["logits"], rtol=1e-5, atol=1e-6)
    e = np.exp(ref - ref.max(axis=0))
    np.testing.assert_allclose(dev["probabilities"], e / e.sum(axis=0), rtol=1e-5, atol=1e-6)
    _clear_ties(ref, dev["labels"], np.argmax(ref, axis=0))
    _clear_ties(ref, dev["labels"], host["labels"])


def test_one_channel_labels_and_crop_blend_on_the_device():
    x = _structured((50, 47), seed=3)
    net = _net(2, 1)
    kw = dict(patch_size=(16, 16), overlap=0.25, chunks=20, batch_size=4)
    for blend in ("gaussian", "crop"):
        dev = tileseg.segment(x, TorchPredictor(net, device="cpu"), output="labels", blend=blend, **kw).data.compute()
        host = tileseg.segment(x, _host(net), output="logits", blend=blend, **kw).data.compute()
        np.testing.assert_array_equal(dev, (host[0] > 0).astype(dev.dtype))


def _owner_cover(grid):
    """Per pixel of the padded image: how many owner blocks' patches cover it, and whether only its own block's."""
    n = np.zeros(grid.padded_shape, np.int64)
    own = np.zeros(grid.padded_shape, bool)
    for o in grid.owners():
        m = np.zeros(grid.padded_shape, bool)
        for s in grid.patches_of(o):
            m[tuple(slice(int(a), int(a) + p) for a, p in zip(s, grid.patch_size))] = True
        n += m
        block = tuple(slice(a, b) for a, b in grid.block_box(o))
        own[block] = m[block]
    return n, own & (n == 1)


@pytest.mark.parametrize("shape, patch, chunks", [((70, 90), (20, 20), 30), ((26, 33, 30), (12, 12, 12), 16)])
def test_only_labels_and_shared_strips_leave_the_device(monkeypatch, shape, patch, chunks):
    """With the CPU treated like a GPU (its accumulator no host memory), count what :func:`to_host` moves.

    Every pixel of an owner's block that only this owner writes to crosses
    once as a label; every other pixel crosses as K floats from each owner
    writing to it (e.g. a block holding no patch start has no owner to reduce it);
    no batch of model output crosses; the result equals the host path.
    """
    k = 7
    x = _structured(shape, seed=1)
    net = _net(len(shape), k)
    monkeypatch.setattr(accumulate, "HOST_DEVICES", ())  # accumulator and views as on a GPU
    moved = []
    real_to_host = accumulate.to_host
    monkeypatch.setattr(accumulate, "to_host", lambda t: moved.append((tuple(t.shape), str(t.dtype)))
                        or real_to_host(t))
    kept = []
    real_forward = TorchPredictor._forward
    monkeypatch.setattr(TorchPredictor, "_forward", lambda self, b, f, keep=False: kept.append(keep)
                        or real_forward(self, b, f, keep))
    kw = dict(patch_size=patch, overlap=0.5, chunks=chunks, batch_size=4)
    got = tileseg.segment(x, TorchPredictor(net, device="cpu"), output="labels", **kw).data.compute(
        scheduler="synchronous")
    assert kept and all(kept), "a batch of model output went to the host"
    grid = make_grid(shape, patch, overlap=0.5, chunks=chunks)
    cover, alone = _owner_cover(grid)
    label_px = sum(int(np.prod(s)) for s, dt in moved if dt == "torch.uint8")
    float_px = [s for s, dt in moved if dt == "torch.float32"]
    assert all(s[0] == k for s in float_px)
    assert label_px == int(alone.sum())
    assert sum(int(np.prod(s[1:])) for s in float_px) == int(cover[~alone].sum())
    assert all(tuple(s) != (4, k) + patch for s in float_px)
    old_bytes = 4 * k * grid.n_patches * int(np.prod(patch))  # every batch's scores, as before
    new_bytes = label_px + 4 * sum(int(np.prod(s)) for s in float_px)
    assert new_bytes < old_bytes / 3
    monkeypatch.undo()
    host = tileseg.segment(x, _host(net), output="logits", **kw).data.compute()
    _clear_ties(host, got, np.argmax(host, axis=0))


class _Fits(torch.nn.Module):
    """Raises CUDA out-of-memory above ``fits`` patches per forward (constructible without a GPU)."""

    def __init__(self, fits: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = _net(2, 3)
        self.fits = fits
        self.sizes: list[int] = []

    def forward(self, x):
        self.sizes.append(int(x.shape[0]))
        if x.shape[0] > self.fits:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {x.shape[0]} patches")
        return self.body(x)


def test_out_of_memory_back_off_keeps_outputs_on_the_device():
    oom.reset()
    try:
        p = TorchPredictor(_Fits(2), device="cpu", out_channels=3, in_channels=1)
        batch = np.random.default_rng(0).standard_normal((5, 1, 16, 16)).astype(np.float32)
        y = p.predict_tensor(batch)
        assert torch.is_tensor(y) and y.device.type == "cpu" and tuple(y.shape) == (5, 3, 16, 16)
        with torch.inference_mode():
            np.testing.assert_allclose(y.numpy(), p.module.body(torch.from_numpy(batch)).numpy(), rtol=1e-5,
                                       atol=1e-6)
        assert max(p.module.sizes[1:]) <= 2 and oom.batch_limit(p._key, "cpu") == 2
        x = _structured((40, 52), seed=2)
        kw = dict(patch_size=(16, 16), overlap=0.5, chunks=20, batch_size=6)
        got = tileseg.segment(x, p, output="logits", **kw).data.compute()
        ref = tileseg.segment(x, _host(p.module.body), output="logits", **kw).data.compute()
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    finally:
        oom.reset()


def test_accumulator_without_room_on_the_device_stitches_on_the_host(monkeypatch, caplog):
    x = _structured((40, 52), seed=5)
    net = _net(2, 4)
    kw = dict(patch_size=(16, 16), overlap=0.5, chunks=20, batch_size=4)
    ref = {o: tileseg.segment(x, TorchPredictor(net, device="cpu"), output=o, **kw).data.compute()
           for o in ("logits", "labels")}
    monkeypatch.setattr(accumulate, "HOST_DEVICES", ())  # the model's device is not the host ...

    def full(shape, device):  # ... and has no room for an accumulator
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate an accumulator")

    monkeypatch.setattr(accumulate, "_device_zeros", full)
    with caplog.at_level("WARNING", logger="tileseg.stitching.accumulate"):
        got = {o: tileseg.segment(x, TorchPredictor(net, device="cpu"), output=o, **kw).data.compute()
               for o in ("logits", "labels")}
    assert "stitching this block on the host" in caplog.text
    np.testing.assert_array_equal(got["logits"], ref["logits"])
    np.testing.assert_array_equal(got["labels"], ref["labels"])


def test_out_of_memory_outside_the_forward_stitches_that_block_on_the_host(monkeypatch, caplog):
    """An OOM in the device reduction (or the slices' concatenation, the conventions): that block on the host."""
    x = _structured((40, 52), seed=6)
    net = _net(2, 3)
    kw = dict(patch_size=(16, 16), overlap=0.5, chunks=20, batch_size=4)
    ref = {o: tileseg.segment(x, TorchPredictor(net, device="cpu"), output=o, **kw).data.compute()
           for o in ("probabilities", "labels")}
    calls = {"labels": 0, "scores": 0}

    def failing(name):
        original = getattr(accumulate.TorchAccumulator, name)

        def method(self, *a, **k):
            calls[name] += 1
            if calls[name] == 1:  # the first block's reduction runs out of device memory
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return original(self, *a, **k)
        return method

    for name in calls:
        monkeypatch.setattr(accumulate.TorchAccumulator, name, failing(name))
    with caplog.at_level("WARNING", logger="tileseg.stitching.overlap_add"):
        got = {o: tileseg.segment(x, TorchPredictor(net, device="cpu"), output=o,
                                  **kw).data.compute(scheduler="synchronous")
               for o in ("probabilities", "labels")}
    assert calls["labels"] >= 2 and calls["scores"] >= 2  # failed once each, then other blocks on the device
    assert caplog.text.count("stitching it on the host instead") == 2
    np.testing.assert_allclose(got["probabilities"], ref["probabilities"], atol=1e-6)
    np.testing.assert_array_equal(got["labels"], ref["labels"])


@pytest.mark.parametrize("conv", [
    Conventions(layout="NHWC"),
    Conventions(activation="none"),
    Conventions(activation="none", layout="NHWC"),
    Conventions(output_stride=2),
])
def test_conventions_in_torch_equal_the_numpy_ones(conv):
    rng = np.random.default_rng(4)
    n, k, patch = 3, 4, (8, 12)
    small = tuple(p // conv.output_stride for p in patch)
    shape = (n,) + small + (k,) if conv.channels_last else (n, k) + small
    out = rng.random(shape).astype(np.float32)
    if conv.activation == "none":  # probabilities over the channel axis
        out /= out.sum(axis=-1 if conv.channels_last else 1, keepdims=True)
    ref = conv.engine_output(out, (n, 1) + patch)
    got = conv.engine_output(torch.from_numpy(out), (n, 1) + patch)
    assert torch.is_tensor(got)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_stitching_equals_the_cpu():
    x = _structured((23, 30, 19))
    net = _net(3, 6)
    kw = dict(patch_size=(12, 12, 12), overlap=0.5, chunks=(12, 20, 19), batch_size=3)
    for out in ("logits", "probabilities"):
        cpu = tileseg.segment(x, TorchPredictor(net, device="cpu"), output=out, **kw).data.compute()
        gpu = tileseg.segment(x, TorchPredictor(net, device="cuda"), output=out, **kw).data.compute()
        np.testing.assert_allclose(gpu, cpu, rtol=1e-4, atol=1e-4)
    labels = tileseg.segment(x, TorchPredictor(net, device="cuda"), output="labels", **kw).data.compute()
    _clear_ties(cpu, labels, np.argmax(cpu, axis=0), margin=1e-3)
