"""Adaptive batch size: out-of-memory halves the batch, the size found is kept, the item never fails for it.

The models raise ``torch.cuda.OutOfMemoryError`` (constructible without a
GPU) whenever a forward gets more patches than they "fit"; results are
compared with the same model called directly.
"""

from __future__ import annotations

import logging
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import tileseg  # noqa: E402
from tileseg import registry  # noqa: E402
from tileseg.errors import ModelError  # noqa: E402
from tileseg.predictors import load_predictor, oom  # noqa: E402

sys.path.insert(0, str(Path(__file__).parents[1]))
from pipeline_helpers import write_scene  # noqa: E402


class Fits(torch.nn.Module):
    """Two 3x3 convolutions that raise CUDA out-of-memory above ``fits`` patches per forward."""

    def __init__(self, fits: int | None = 2, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3, padding=1), torch.nn.Tanh(),
                                        torch.nn.Conv2d(3, 2, 3, padding=1))
        self.fits = fits
        self.sizes: list[int] = []

    def forward(self, x):
        self.sizes.append(int(x.shape[0]))
        if self.fits is not None and x.shape[0] > self.fits:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {x.shape[0]} patches")
        return self.body(x)


@pytest.fixture(autouse=True)
def _fresh_table():
    oom.reset()
    yield
    oom.reset()


def _direct(net, batch):
    with torch.inference_mode():
        return net.body(torch.from_numpy(batch)).numpy()


def test_callable_halves_keeps_the_size_and_logs(caplog):
    calls = []

    def model(b):
        calls.append(len(b))
        if len(b) > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory.")
        return b * 2.0

    p = load_predictor(model)
    batch = np.random.default_rng(0).random((8, 1, 4, 4)).astype(np.float32)
    with caplog.at_level(logging.WARNING, logger="tileseg.predictors.oom"):
        out = p(batch)
    np.testing.assert_array_equal(out, batch * 2)
    assert calls == [8, 4, 2, 2, 2, 2]
    assert "out of memory with a batch of 8 patches; retrying with 4" in caplog.text
    assert "retrying with 2" in caplog.text
    calls.clear()
    np.testing.assert_array_equal(p(batch[:5]), batch[:5] * 2)
    assert calls == [2, 2, 1]  # the size found is reused: no new out-of-memory
    (entry,) = oom.snapshot()
    assert (entry["model"], entry["batch_size"], entry["requested"]) == ("model", 2, 8)
    other = load_predictor(lambda b: b)  # another model starts from its own batch size
    assert other(batch).shape == batch.shape and len(oom.snapshot()) == 1


def test_torch_predictor_backs_off_instead_of_failing():
    net = Fits(fits=2).eval()
    batch = np.random.default_rng(1).normal(size=(7, 1, 16, 16)).astype(np.float32)
    p = load_predictor(net, device="cpu")
    np.testing.assert_allclose(p(batch), _direct(net, batch), rtol=1e-6, atol=1e-6)
    assert net.sizes == [7, 3, 1, 1, 1, 1, 1, 1, 1]  # 7 fails, 3 fails, then 1s (7 // 2 = 3, 3 // 2 = 1)
    assert oom.batch_limit(p._key, "cpu") == 1


def test_oom_with_tta_counts_patches_not_copies():
    net = Fits(fits=4).eval()
    batch = np.random.default_rng(2).normal(size=(4, 1, 16, 16)).astype(np.float32)
    p = load_predictor(net, device="cpu", tta=["x"])
    out = p(batch)
    assert net.sizes == [8, 4, 4]  # 4 patches x 2 flips fail; 2 patches x 2 flips fit
    x = torch.from_numpy(batch)
    with torch.inference_mode():
        want = ((net.body(x) + net.body(x.flip(3)).flip(3)) / 2).numpy()
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)


def test_a_single_patch_that_does_not_fit_is_a_clear_error():
    p = load_predictor(Fits(fits=0).eval(), device="cpu")
    with pytest.raises(ModelError, match=r"out of device memory with a batch of a single patch \(1, 16, 16\)"):
        p(np.zeros((4, 1, 16, 16), np.float32))


def test_other_runtime_errors_still_fail():
    def model(b):
        raise RuntimeError("something else")

    with pytest.raises(RuntimeError, match="something else"):
        load_predictor(model)(np.zeros((2, 1, 4, 4), np.float32))


def test_segment_result_unchanged_by_back_off():
    image = np.random.default_rng(3).normal(size=(70, 90)).astype(np.float32)
    kw = dict(patch_size=(24, 24), overlap=0.25, chunks=(40, 40), output="logits", batch_size=8)
    ref = tileseg.segment(image, Fits(fits=None).eval(), **kw).data.compute(scheduler="threads")
    net = Fits(fits=2).eval()
    got = tileseg.segment(image, net, **kw).data.compute(scheduler="threads", num_workers=2)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    assert max(net.sizes) > 2 and net.sizes.count(8) <= 2  # tried big at most twice (two threads), then 2 or less


def _pipeline(tmp_path: Path, scheduler: str, extra: str = "") -> Path:
    pipe = tmp_path / "p.yaml"
    pipe.write_text(textwrap.dedent(f"""\
        version: 1
        input: {{path: a.zarr, array: image}}
        tiling: {{patch_size: [24, 24], overlap: 0.25, chunks: [32, 32]}}
        model: {{state_dict: {{path: w.pt, architecture: {{fits: {{fits: 2}}}}}}, output: logits, batch_size: 6}}
        output: {{path: "out/{{stem}}.zarr", overwrite: true}}
        execution: {{scheduler: {scheduler}, workers: 1{extra}}}
        """))
    return pipe


@pytest.fixture
def fits_pipeline(tmp_path, monkeypatch):
    monkeypatch.setitem(registry._EXTRA["architectures"], "fits", Fits)
    torch.save(Fits(fits=None).state_dict(), tmp_path / "w.pt")
    image, _ = write_scene(tmp_path / "a.zarr", shape=(60, 70), seed=4)
    ref = tileseg.segment(image, Fits(fits=None).eval(), patch_size=(24, 24), overlap=0.25, output="logits",
                          batch_size=6).data.compute(scheduler="threads")
    return tmp_path, ref


def test_pipeline_item_succeeds_and_reports_the_batch_size(fits_pipeline):
    from tileseg.runner import run_pipeline

    root, ref = fits_pipeline
    report = run_pipeline(_pipeline(root, "threads"))
    assert report.ok, report.items[0].error
    np.testing.assert_allclose(tileseg.open(report.items[0].output).data.compute(), ref, rtol=1e-6, atol=1e-6)
    (entry,) = report.batch_sizes
    # the first owner block to run holds 4 or 6 patches (6 -> 3 -> 1, or 4 -> 2)
    assert entry["model"] == "fits" and entry["batch_size"] <= 2 < entry["requested"] <= 6
    assert entry["worker"] == "local"
    import json

    saved = json.loads(Path(report.report_path).read_text())
    assert saved["batch_sizes"][0]["batch_size"] == entry["batch_size"]


def test_batch_sizes_gathered_from_cluster_workers(fits_pipeline):
    distributed = pytest.importorskip("distributed")
    from tileseg.runner import run_pipeline

    root, ref = fits_pipeline
    # in-process workers: they see the "fits" architecture registered by this test
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  protocol="tcp://", dashboard_address=":0") as cluster:
        report = run_pipeline(_pipeline(root, "threads"), scheduler=cluster.scheduler_address)
        addresses = set(cluster.workers[name].address for name in cluster.workers)
    assert report.ok, report.items[0].error
    np.testing.assert_allclose(tileseg.open(report.items[0].output).data.compute(), ref, rtol=1e-6, atol=1e-6)
    (entry,) = report.batch_sizes  # both workers share this process and its table: reported once
    assert entry["worker"] in addresses
    assert entry["batch_size"] <= 2 < entry["requested"] <= 6
