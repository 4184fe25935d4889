"""``tileseg export``: .pt2 and .onnx verified against PyTorch before writing; INT8 with its accuracy change."""

from __future__ import annotations

import json
import textwrap
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from click.testing import CliRunner  # noqa: E402

from tileseg.cli import main  # noqa: E402
from tileseg.errors import ModelError  # noqa: E402
from tileseg.export import export_model  # noqa: E402
from tileseg.predictors import load_predictor  # noqa: E402
from tileseg.predictors.unet import UNet  # noqa: E402

CFG = {"in_channels": 1, "out_channels": 3, "spatial_dims": 2, "depth": 2, "base_features": 4}


def _pipeline(tmp_path):
    torch.manual_seed(0)
    net = UNet(**CFG).eval()
    torch.save(net.state_dict(), tmp_path / "w.pt")
    (tmp_path / "p.yaml").write_text(textwrap.dedent(f"""\
        version: 1
        input: {{path: in.zarr}}
        tiling: {{patch_size: [32, 32]}}
        model: {{state_dict: {{path: w.pt, architecture: {{unet: {json.dumps(CFG)}}}}}}}
        output: {{path: out.zarr}}
        """))
    return net


def test_export_cli_writes_verified_pt2_onnx_and_int8(tmp_path):
    net = _pipeline(tmp_path)
    rng = np.random.default_rng(0)
    np.save(tmp_path / "samples.npy", rng.normal(size=(6, 1, 32, 32)).astype(np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = CliRunner().invoke(main, ["export", str(tmp_path / "p.yaml"), "--pt2", str(tmp_path / "m.pt2"),
                                           "--onnx", str(tmp_path / "m.onnx"), "--int8", str(tmp_path / "m8.onnx"),
                                           "--samples", str(tmp_path / "samples.npy"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert report["max_abs_diff"]["onnx"] < 1e-4 and report["max_abs_diff"]["pt2"] < 1e-5
    q = report["quantization"]
    assert q["n_samples"] == 6 and 0 < q["max_abs_diff"] and 0.5 < q["label_agreement"] <= 1 and q["pre_processed"]
    # the written files run in tileseg and agree with the PyTorch model (INT8 within what it reported)
    b = rng.normal(size=(4, 1, 32, 32)).astype(np.float32)
    with torch.no_grad():
        want = net(torch.from_numpy(b)).numpy()
    for path, tol in (("m.pt2", 1e-5), ("m.onnx", 1e-4)):
        kind = "exported" if path.endswith("pt2") else "onnx"
        np.testing.assert_allclose(load_predictor({kind: str(tmp_path / path)}, device="cpu")(b), want, atol=tol,
                                   rtol=tol)
    import onnx

    q8 = onnx.load(str(tmp_path / "m8.onnx"))
    assert any(n.op_type == "QuantizeLinear" for n in q8.graph.node)
    got8 = load_predictor({"onnx": str(tmp_path / "m8.onnx")})(b)
    assert np.abs(got8 - want).max() < 10 * q["max_abs_diff"] + 1e-3


def test_export_that_does_not_match_is_not_written(tmp_path):
    _pipeline(tmp_path)
    spec = {"state_dict": {"path": str(tmp_path / "w.pt"), "architecture": {"unet": CFG}}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ModelError, match="not written: its output differs"):
            export_model(spec, patch_size=(32, 32), onnx=tmp_path / "m.onnx", rtol=0, atol=0)
    assert not (tmp_path / "m.onnx").exists()
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".onnx"] == []


def test_export_dict_output_model_returns_the_selected_tensor(tmp_path, monkeypatch):
    (tmp_path / "dict_models.py").write_text(textwrap.dedent("""\
        import torch

        class Two(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.a, self.b = torch.nn.Conv2d(3, 2, 3, padding=1), torch.nn.Conv2d(3, 4, 1)

            def forward(self, x):
                return {"aux": self.b(x), "out": self.a(x)}
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(0)
    from dict_models import Two

    model = Two().eval()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    spec = {"python": {"callable": "dict_models:Two", "path": str(tmp_path / "w.pt"), "output": "out"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_model(spec, patch_size=(16, 16), onnx=tmp_path / "d.onnx")
    b = np.random.default_rng(1).normal(size=(2, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(b))["out"].numpy()
    p = load_predictor({"onnx": str(tmp_path / "d.onnx")})
    assert p.out_channels == 2
    np.testing.assert_allclose(p(b), want, rtol=1e-4, atol=1e-5)


def test_compiled_models_are_refused_with_what_to_do(tmp_path):
    """A TorchScript (or .pt2) model cannot be exported again: said up front, not as torch internals."""
    from pathlib import Path

    from tileseg.errors import ConfigError

    root = Path(__file__).resolve().parents[1]
    with pytest.raises(ConfigError, match="already compiled .* state_dict with its architecture"):
        export_model({"torchscript": {"path": str(root / "examples" / "models" / "unet2d.pt")}},
                     patch_size=(64, 64), pt2=str(tmp_path / "m.pt2"))
    assert not (tmp_path / "m.pt2").exists()
