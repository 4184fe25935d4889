"""Every model kind gives what calling the model directly gives; zoo models run end to end through ``tileseg run``."""

from __future__ import annotations

import textwrap
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tileseg.errors import ConfigError, ModelError  # noqa: E402
from tileseg.predictors import load_predictor  # noqa: E402
from tileseg.predictors.unet import UNet  # noqa: E402

CFG = {"in_channels": 1, "out_channels": 2, "spatial_dims": 2, "depth": 2, "base_features": 4}


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    m = UNet(**CFG)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    return m.eval()


@pytest.fixture(scope="module")
def exported(net, tmp_path_factory):
    """The U-Net exported by ``tileseg export`` to .pt2 and .onnx (32 x 32 patches)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from tileseg.export import export_model

    d = tmp_path_factory.mktemp("export")
    torch.save(net.state_dict(), d / "w.pt")
    spec = {"state_dict": {"path": str(d / "w.pt"), "architecture": {"unet": CFG}}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = export_model(spec, patch_size=(32, 32), pt2=d / "net.pt2", onnx=d / "net.onnx")
    return d, report


def _direct(module, batch):
    with torch.no_grad():
        return module(torch.from_numpy(batch)).numpy()


def _batch(n=3, c=1, shape=(32, 32), seed=0):
    return np.random.default_rng(seed).normal(size=(n, c, *shape)).astype(np.float32)


# --------------------------------------------------------------------------- exported programs, ONNX


def test_exported_program_equals_module_any_batch(net, exported):
    d, report = exported
    assert report.max_abs_diff["pt2"] < 1e-5
    p = load_predictor({"exported": {"path": str(d / "net.pt2")}}, device="cpu")
    assert (p.in_channels, p.out_channels, p.conventions.patch_size) == (1, 2, (32, 32))
    for n in (1, 5):  # exported with a batch of 2: the batch axis is dynamic
        b = _batch(n)
        np.testing.assert_allclose(p(b), _direct(net, b), rtol=1e-5, atol=1e-5)
    with pytest.raises(ModelError, match=r"only patches of size \[32, 32\]"):
        p(_batch(1, shape=(48, 48)))


def test_onnx_equals_pytorch_within_tolerance(net, exported):
    d, _ = exported
    p = load_predictor({"onnx": {"path": str(d / "net.onnx")}})
    assert (p.in_channels, p.out_channels, p.conventions.patch_size) == (1, 2, (32, 32))
    b = _batch(7, seed=3)  # any batch size
    np.testing.assert_allclose(p(b), _direct(net, b), rtol=1e-4, atol=1e-4)


def test_onnx_providers_in_order_missing_ones_named(exported):
    import onnxruntime as ort

    d, _ = exported
    path = str(d / "net.onnx")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: the missing-provider path cannot be shown")
    with pytest.warns(RuntimeWarning, match=r"\['TensorrtExecutionProvider', 'CUDAExecutionProvider'\] not available"):
        p = load_predictor({"onnx": {"path": path, "providers": ["TensorRT", "CUDA", "CPU"]}})
    assert p.describe()["providers_used"] == ["CPUExecutionProvider"]
    with pytest.raises(ModelError, match=r"none of the execution providers \['CUDAExecutionProvider'\].*available: "):
        load_predictor({"onnx": {"path": path, "providers": ["CUDA"]}})
    with pytest.raises(ConfigError, match="providers: must be a list"):
        load_predictor({"onnx": {"path": path, "providers": [1]}})


def _onnx_model(shape, nodes, initializers=(), out_shape=None):
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape or shape)], list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_onnx_external_data_outside_the_model_folder_is_refused(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import helper, numpy_helper

    w = numpy_helper.from_array(np.full((1, 1, 1, 1), 3.0, np.float32), "w")
    model = _onnx_model(["n", 1, 8, 8], [helper.make_node("Conv", ["x", "w"], ["y"])], [w])
    inside = tmp_path / "ok"
    inside.mkdir()
    onnx.save_model(model, str(inside / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.bin", size_threshold=0)
    p = load_predictor({"onnx": {"path": str(inside / "m.onnx")}})
    b = _batch(2, shape=(8, 8))
    np.testing.assert_allclose(p(b), 3 * b, rtol=1e-6)
    # the same model pointing at ../secret.bin, and at an absolute path
    for location in ("../secret.bin", str(tmp_path / "secret.bin")):
        bad = tmp_path / f"bad{len(location)}"
        bad.mkdir()
        (tmp_path / "secret.bin").write_bytes((inside / "m.bin").read_bytes())
        proto = onnx.load(str(inside / "m.onnx"), load_external_data=False)
        for t in proto.graph.initializer:
            for e in t.external_data:
                if e.key == "location":
                    e.value = location
        onnx.save_model(proto, str(bad / "m.onnx"))
        with pytest.raises(ModelError, match="outside the model's folder.*refused"):
            load_predictor({"onnx": {"path": str(bad / "m.onnx")}})


def test_onnx_fixed_batch_channels_last_model(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import helper, numpy_helper

    # NHWC, batch fixed to 1: y = concat(2x, 1 - x) over the channel (last) axis
    two, one = (numpy_helper.from_array(np.float32(v).reshape(1), n) for v, n in ((2, "two"), (1, "one")))
    nodes = [helper.make_node("Mul", ["x", "two"], ["a"]), helper.make_node("Sub", ["one", "x"], ["b"]),
             helper.make_node("Concat", ["a", "b"], ["y"], axis=-1)]
    onnx.save_model(_onnx_model([1, 8, 12, 1], nodes, [two, one], out_shape=[1, 8, 12, 2]), str(tmp_path / "m.onnx"))
    p = load_predictor({"onnx": {"path": str(tmp_path / "m.onnx"), "layout": "NHWC"}})
    assert (p.in_channels, p.out_channels, p.fixed_batch, p.conventions.patch_size) == (1, 2, 1, (8, 12))
    b = _batch(3, shape=(8, 12))
    np.testing.assert_allclose(p(b), np.concatenate([2 * b, 1 - b], axis=1), rtol=1e-6)


# --------------------------------------------------------------------------- python, transformers


def test_python_kind_builds_the_users_module(net, tmp_path):
    torch.save(net.state_dict(), tmp_path / "w.pt")
    p = load_predictor({"python": {"callable": "tileseg.predictors.unet:UNet", "args": CFG,
                                   "path": str(tmp_path / "w.pt")}}, device="cpu")
    b = _batch()
    np.testing.assert_allclose(p(b), _direct(net, b), rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="'package.module:callable'"):
        load_predictor({"python": {"callable": "os.system('x')"}})


def test_python_kind_any_callable(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(textwrap.dedent("""\
        def make(scale):
            return lambda batch: batch * scale
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    p = load_predictor({"python": {"callable": "my_models:make", "args": {"scale": 3}}})
    b = _batch(2)
    np.testing.assert_allclose(p(b), 3 * b)


def test_transformers_segformer_logits_upsampled_from_stride_4(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    cfg = transformers.SegformerConfig(num_channels=1, num_labels=3, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1],
                                       num_attention_heads=[1, 1, 1, 1], decoder_hidden_size=16,
                                       id2label={0: "bg", 1: "cell", 2: "edge"}, label2id={"bg": 0, "cell": 1, "edge": 2})
    torch.manual_seed(0)
    ref = transformers.SegformerForSemanticSegmentation(cfg).eval()
    ref.save_pretrained(tmp_path / "seg")  # config.json + model.safetensors, as a saved model folder holds
    p = load_predictor({"transformers": {"config": str(tmp_path / "seg/config.json"),
                                         "path": str(tmp_path / "seg/model.safetensors")}}, device="cpu")
    assert p.conventions.output_stride == 4 and p.class_names == ("bg", "cell", "edge")
    b = _batch(2, shape=(32, 48))
    with torch.no_grad():
        logits = ref(pixel_values=torch.from_numpy(b)).logits
    want = torch.nn.functional.interpolate(logits, scale_factor=4, mode="bilinear", align_corners=False).numpy()
    np.testing.assert_allclose(p(b), want, rtol=1e-4, atol=1e-5)


def test_transformers_upernet_from_config_dict():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = {"model_type": "upernet", "num_labels": 2, "hidden_size": 16, "auxiliary_in_channels": 16,
           "use_auxiliary_head": False, "pool_scales": [1, 2],
           "backbone_config": {"model_type": "convnext", "num_channels": 1, "hidden_sizes": [8, 8, 16, 16],
                               "depths": [1, 1, 1, 1], "out_features": ["stage1", "stage2", "stage3", "stage4"]}}
    p = load_predictor({"transformers": {"config": cfg}}, device="cpu")
    b = _batch(2, shape=(64, 64))
    with torch.no_grad():
        want = p.module(pixel_values=torch.from_numpy(b)).logits.numpy()
    assert want.shape == (2, 2, 64, 64) and p.conventions.output_stride == 1
    np.testing.assert_array_equal(p(b), want)
    assert isinstance(transformers.__version__, str)


# --------------------------------------------------------------------------- zoo models end to end


def _zoo_model(name):
    if name == "smp":
        smp = pytest.importorskip("segmentation_models_pytorch")
        params = {"arch": "Unet", "encoder_name": "resnet18", "encoder_depth": 3, "decoder_channels": [16, 8, 4],
                  "in_channels": 1, "classes": 2}
        kw = {k: v for k, v in params.items() if k != "arch"}
        return params, smp.create_model("Unet", encoder_weights=None, **kw), None
    if name == "torchvision":
        tv = pytest.importorskip("torchvision")
        params = {"name": "lraspp_mobilenet_v3_large", "num_classes": 2}
        model = tv.models.get_model("lraspp_mobilenet_v3_large", weights=None, weights_backbone=None, num_classes=2)
        return params, model, "out"
    nets = pytest.importorskip("monai.networks.nets")
    params = {"name": "UNet", "spatial_dims": 2, "in_channels": 1, "out_channels": 2, "channels": [4, 8, 16],
              "strides": [2, 2], "num_res_units": 1}
    return params, nets.UNet(**{k: v for k, v in params.items() if k != "name"}), None


@pytest.mark.parametrize("name", ["smp", "torchvision", "monai"])
def test_zoo_model_end_to_end_through_tileseg_run(name, tmp_path):
    """Random weights (no downloads) in a state_dict; ``tileseg run`` logits == MONAI's sliding window."""
    inferers = pytest.importorskip("monai.inferers")
    zarr = pytest.importorskip("zarr")
    from click.testing import CliRunner

    from tileseg.cli import main
    from tileseg.testing import blobs_2d

    params, model, key = _zoo_model(name)
    torch.manual_seed(1)
    model = model.eval()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    image, _ = blobs_2d((100, 140), 0, dtype=np.float32, radius=(3.0, 10.0), coverage=0.25)
    if name == "torchvision":
        image = np.stack([image, image[::-1], image[:, ::-1]])  # three channels
    group = zarr.open_group(str(tmp_path / "img.zarr"), mode="w")
    group.create_array("image", shape=image.shape, chunks=image.shape[:-2] + (48, 48), dtype="float32")[:] = image
    axes = "cyx" if image.ndim == 3 else "yx"
    arch = "{" + ", ".join(f"{k}: {v!r}" if isinstance(v, str) else f"{k}: {v}" for k, v in params.items()) + "}"
    (tmp_path / "p.yaml").write_text(textwrap.dedent(f"""\
        version: 1
        input: {{path: img.zarr, array: image, axes: {axes}}}
        tiling: {{patch_size: [64, 64], overlap: 0.25, chunks: [48, 64]}}
        model:
          state_dict: {{path: w.pt, architecture: {{{name}: {arch}}}}}
          output: logits
          batch_size: 3
        output: {{path: out.zarr}}
        execution: {{scheduler: threads, workers: 2}}
        """))
    result = CliRunner().invoke(main, ["run", str(tmp_path / "p.yaml"), "--quiet"])
    assert result.exit_code == 0, result.output
    got = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")["0"][...]

    def net(x):
        y = model(x)
        return y[key] if key else y

    x = image if image.ndim == 3 else image[None]
    with torch.inference_mode():
        want = inferers.sliding_window_inference(torch.from_numpy(x[None].copy()), (64, 64), 3, net, overlap=0.25,
                                                 mode="gaussian")[0].numpy()
    assert got.shape == want.shape == (2, 100, 140)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert np.ptp(want) > 1e-3  # random weights still give a varying map


# --------------------------------------------------------------------------- more architectures, plugins, YAML


@pytest.mark.parametrize("arch,encoder", [("Unet", "resnet18"), ("FPN", "tu-resnet10t"), ("DeepLabV3Plus", "resnet18"),
                                          ("Segformer", "resnet18"), ("UPerNet", "resnet18"), ("Linknet", "resnet18")])
def test_smp_architectures_with_their_encoders_equal_direct_call(arch, encoder, tmp_path):
    smp = pytest.importorskip("segmentation_models_pytorch")
    torch.manual_seed(0)
    model = smp.create_model(arch, encoder_name=encoder, encoder_weights=None, in_channels=2, classes=3).eval()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    p = load_predictor({"state_dict": {"path": str(tmp_path / "w.pt"), "architecture": {
        "smp": {"arch": arch, "encoder_name": encoder, "in_channels": 2, "classes": 3}}}}, device="cpu")
    b = _batch(2, c=2, shape=(64, 64))
    np.testing.assert_allclose(p(b), _direct(model, b), rtol=1e-5, atol=1e-5)
    with pytest.raises(ModelError, match="patch sizes divisible by (16|32)"):
        p(_batch(1, c=2, shape=(40, 40)))


def test_smp_refuses_downloads_and_unknown_archs(tmp_path):
    pytest.importorskip("segmentation_models_pytorch")
    (tmp_path / "w.pt").write_bytes(b"")
    spec = {"state_dict": {"path": str(tmp_path / "w.pt"), "architecture": {"smp": {"arch": "Unet", "encoder_weights": "imagenet"}}}}
    with pytest.raises(ConfigError, match="would download weights"):
        load_predictor(spec, device="cpu")
    spec["state_dict"]["architecture"] = {"smp": {"arch": "Unett"}}
    with pytest.raises(ConfigError, match="unknown arch 'Unett'; did you mean"):
        load_predictor(spec, device="cpu")


@pytest.mark.parametrize("name,params", [
    ("SegResNet", {"init_filters": 8}),
    ("DynUNet", {"kernel_size": [3, 3, 3], "strides": [1, 2, 2], "upsample_kernel_size": [2, 2],
                 "filters": [8, 16, 32]}),
    ("SwinUNETR", {"feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1]}),
])
def test_monai_networks_equal_direct_call(name, params, tmp_path):
    nets = pytest.importorskip("monai.networks.nets")
    if name == "SwinUNETR":
        pytest.importorskip("einops")
    torch.manual_seed(0)
    common = {"spatial_dims": 2, "in_channels": 1, "out_channels": 2}
    model = getattr(nets, name)(**common, **params).eval()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    p = load_predictor({"state_dict": {"path": str(tmp_path / "w.pt"),
                                       "architecture": {"monai": {"name": name, **common, **params}}}}, device="cpu")
    b = _batch(2, shape=(64, 64))
    np.testing.assert_allclose(p(b), _direct(model, b), rtol=1e-5, atol=1e-5)


def test_third_party_architecture_by_entry_point(net, tmp_path, monkeypatch):
    import importlib.metadata as md

    from tileseg import registry

    real = md.entry_points

    def entry_points(**kw):
        if kw.get("group") == "tileseg.architectures":
            return [md.EntryPoint("their_unet", "tileseg.predictors.unet:UNet", "tileseg.architectures")]
        return real(**kw)

    monkeypatch.setattr(md, "entry_points", entry_points)
    registry._entry_points.cache_clear()
    try:
        assert "their_unet" in registry.available("architectures")
        torch.save(net.state_dict(), tmp_path / "w.pt")
        p = load_predictor({"state_dict": {"path": str(tmp_path / "w.pt"), "architecture": {"their_unet": CFG}}},
                           device="cpu")
        b = _batch()
        np.testing.assert_allclose(p(b), _direct(net, b), rtol=1e-5, atol=1e-5)
    finally:
        registry._entry_points.cache_clear()


def test_conventions_in_a_pipeline_file_are_validated(tmp_path):
    from tileseg.config import load_pipeline

    (tmp_path / "m.onnx").write_bytes(b"")
    base = """\
        version: 1
        input: {path: in.zarr}
        tiling: {patch_size: [1024, 1024]}
        model:
          onnx: {path: m.onnx, providers: [CUDA, CPU], layout: NHWC, patch_size: [1024, 1024], activation: none%s}
        output: {path: out.zarr}
        """
    (tmp_path / "p.yaml").write_text(textwrap.dedent(base % ""))
    cfg = load_pipeline(tmp_path / "p.yaml")
    assert cfg.model.params["layout"] == "NHWC" and cfg.model.files() == {"path": str(tmp_path / "m.onnx")}
    (tmp_path / "p.yaml").write_text(textwrap.dedent(base % ", output_strid: 4"))
    with pytest.raises(ConfigError, match="model.onnx: unknown parameter 'output_strid'.*did you mean 'output_stride'"):
        load_pipeline(tmp_path / "p.yaml")


def test_onnx_device_picks_default_providers_and_precision_is_refused(exported):
    import onnxruntime as ort

    d, _ = exported
    kind = {"onnx": {"path": str(d / "net.onnx")}}
    assert load_predictor(kind, device="cpu").providers == ("CPUExecutionProvider",)
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.warns(RuntimeWarning, match="CUDAExecutionProvider"):
            p = load_predictor(kind, device="cuda")
        assert p.providers == ("CUDAExecutionProvider", "CPUExecutionProvider")
    with pytest.raises(ConfigError, match="precision 'fp16'.*ONNX"):
        load_predictor(kind, precision="fp16")
