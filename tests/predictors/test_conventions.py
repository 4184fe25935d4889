"""Model conventions (layout, output selection, activation, output stride, fixed size) against direct calls."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import tileseg  # noqa: E402
from tileseg.errors import ConfigError, ModelError  # noqa: E402
from tileseg.predictors.check import dry_run  # noqa: E402
from tileseg.predictors.conventions import Conventions, upsample_linear  # noqa: E402
from tileseg.predictors.torch import TorchPredictor  # noqa: E402


class Heads(torch.nn.Module):
    """Two 3x3 convolutions; returns what ``mode`` asks: a dict, a tuple, NHWC, probabilities, or stride 2."""

    def __init__(self, mode: str, classes: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.mode = mode
        self.a = torch.nn.Conv2d(2, classes, 3, padding=1)
        self.b = torch.nn.Conv2d(2, classes, 3, padding=1)

    def logits(self, x):
        if self.mode == "nhwc":
            x = x.permute(0, 3, 1, 2)
        y = self.a(x)
        return y if self.mode != "stride2" else torch.nn.functional.avg_pool2d(y, 2)

    def forward(self, x):
        y = self.logits(x)
        if self.mode == "dict":
            return {"aux": self.b(x), "seg": y}
        if self.mode == "tuple":
            return (self.b(x), y)
        if self.mode == "nhwc":
            return y.permute(0, 2, 3, 1)
        if self.mode == "probs":
            return torch.softmax(y, 1)
        return y


@pytest.fixture
def batch():
    return np.random.default_rng(1).normal(size=(3, 2, 16, 24)).astype(np.float32)


def _direct(module, batch, nhwc=False):
    x = torch.from_numpy(np.moveaxis(batch, 1, -1).copy() if nhwc else batch)
    with torch.no_grad():
        return module.logits(x).numpy()


@pytest.mark.parametrize("mode,conv", [("dict", {"output": "seg"}), ("tuple", {"output": 1}),
                                       ("nhwc", {"layout": "NHWC"})])
def test_output_selection_and_layout_equal_direct_call(mode, conv, batch):
    m = Heads(mode).eval()
    p = TorchPredictor(m, device="cpu", conventions=Conventions(**conv))
    np.testing.assert_allclose(p(batch), _direct(m, batch, nhwc=mode == "nhwc"), rtol=1e-6, atol=1e-6)
    assert (p.in_channels, p.out_channels) == (2, 3)


def test_unselected_dict_and_wrong_layout_are_clear_errors(batch):
    with pytest.raises(ModelError, match=r"keys \['aux', 'seg'\].*output: <key>"):
        TorchPredictor(Heads("dict").eval(), device="cpu")(batch)
    with pytest.raises(ModelError, match="model output 'sag' not found.*'seg'"):
        TorchPredictor(Heads("dict").eval(), device="cpu", conventions=Conventions(output="sag"))(batch)
    nhwc = np.moveaxis(batch, 1, -1)
    with pytest.raises(ModelError):  # channels-last model fed channels-first: refused, never silently transposed
        TorchPredictor(Heads("nhwc").eval(), device="cpu")(np.ascontiguousarray(nhwc))


def test_activation_none_gives_the_models_probabilities_back(batch):
    m = Heads("probs").eval()
    probs = torch.softmax(torch.from_numpy(_direct(m, batch)), 1).numpy()
    p = TorchPredictor(m, device="cpu", conventions=Conventions(activation="none"))
    logits = p(batch)
    np.testing.assert_allclose(np.log(probs), logits, rtol=1e-5, atol=1e-5)
    # one patch covering the image, output probabilities: exactly what the model returned
    img = batch[0]
    out = tileseg.segment(img, p, patch_size=(16, 24), blend="constant", output="probabilities")
    np.testing.assert_allclose(out.data.compute(), probs[0], rtol=1e-5, atol=1e-6)


def test_sigmoid_over_several_channels_is_refused(batch):
    p = TorchPredictor(Heads("plain").eval(), device="cpu", conventions=Conventions(activation="sigmoid"))
    with pytest.raises(ModelError, match="sigmoid.*3 output channels"):
        p(batch)


def test_output_stride_upsamples_like_torch_interpolate(batch):
    m = Heads("stride2").eval()
    small = torch.from_numpy(_direct(m, batch))
    want = torch.nn.functional.interpolate(small, scale_factor=2, mode="bilinear", align_corners=False).numpy()
    p = TorchPredictor(m, device="cpu", conventions=Conventions(output_stride=2))
    np.testing.assert_allclose(p(batch), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ModelError, match="2x smaller: set output_stride"):
        TorchPredictor(m, device="cpu")(batch)
    with pytest.raises(ModelError, match="multiples of it"):
        p(batch[:, :, :15])


def test_upsample_linear_3d_matches_trilinear():
    a = np.random.default_rng(0).normal(size=(2, 3, 4, 5, 6)).astype(np.float32)
    want = torch.nn.functional.interpolate(torch.from_numpy(a), scale_factor=4, mode="trilinear",
                                           align_corners=False).numpy()
    np.testing.assert_allclose(upsample_linear(a, 4), want, rtol=1e-5, atol=1e-5)


def test_fixed_size_and_dry_run_errors(batch):
    m = Heads("plain").eval()
    p = TorchPredictor(m, device="cpu", conventions=Conventions(patch_size=(16, 24)))
    assert dry_run(p, 2, (16, 24), class_names=["a", "b", "c"]) == 3
    with pytest.raises(ModelError, match=r"only patches of size \[16, 24\].*tiling.patch_size: \[16, 24\]"):
        dry_run(p, 2, (32, 32))
    with pytest.raises(ModelError, match="expects 2 input channels, image has 1"):
        dry_run(p, 1, (16, 24))
    with pytest.raises(ModelError, match="model.classes lists 2 classes.*outputs 3 channels"):
        dry_run(p, 2, (16, 24), class_names=["a", "b"])
    # a model that lies about its channels is corrected by the forward
    q = TorchPredictor(m, device="cpu", out_channels=5)
    assert dry_run(q, 2, (16, 24)) == 3 and q.out_channels == 3


def test_bad_convention_values_are_config_errors():
    for bad in ({"layout": "HWC"}, {"output_stride": 0}, {"activation": "relu"}, {"patch_size": [0, 4]},
                {"output": 1.5}):
        with pytest.raises(ConfigError):
            Conventions(**bad)


def test_dry_run_on_a_cluster_runs_in_a_worker_with_the_resources():
    distributed = pytest.importorskip("distributed")
    from distributed import Scheduler, SpecCluster, Worker

    from tileseg.predictors.check import dry_run_on

    p = TorchPredictor(Heads("plain").eval(), device="cpu")
    workers = {"gpu": {"cls": Worker, "options": {"nthreads": 1, "resources": {"GPU": 1}}},
               "cpu": {"cls": Worker, "options": {"nthreads": 1}}}
    with SpecCluster(workers=workers, scheduler={"cls": Scheduler, "options": {"dashboard_address": None}}) as c, \
            distributed.Client(c) as client:
        client.wait_for_workers(2)
        gpu = [a for a, w in client.scheduler_info()["workers"].items() if w["name"] == "gpu"]
        for _ in range(3):  # never on the worker without the resource
            q = TorchPredictor(Heads("plain").eval(), device="cpu")
            with distributed.get_task_stream(client) as ts:
                assert dry_run_on(client, q, 2, (16, 24), resources={"GPU": 1}, class_names=["a", "b", "c"]) == 3
            assert [t["worker"] for t in ts.data if str(t["key"]).startswith("tileseg-dry-run")] == gpu
        assert dry_run_on(client, p, 2, (16, 24)) == 3
        with distributed.get_task_stream(client) as ts:
            assert dry_run_on(client, p, 2, (16, 24)) == 3
        assert not ts.data  # remembered: no second forward
        with pytest.raises(ModelError, match="expects 2 input channels, image has 1"):
            dry_run_on(client, p, 1, (16, 24))
        with pytest.raises(ModelError, match="model.classes lists 2 classes"):
            dry_run_on(client, p, 2, (16, 24), class_names=["a", "b"])
