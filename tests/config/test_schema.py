"""Pipeline schema and loader: every error names its YAML path and reason."""

from __future__ import annotations

import copy
import os
import textwrap

import pytest

from tileseg.config import PipelineConfig, load_pipeline
from tileseg.errors import ConfigError


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    """A file standing in for model weights (the loader only checks it exists)."""
    path = tmp_path_factory.mktemp("w") / "model.pt"
    path.write_bytes(b"not read by the schema")
    return str(path)


@pytest.fixture
def base(weights) -> dict:
    return {
        "version": 1,
        "input": {"path": "data/*.zarr", "array": "image"},
        "tiling": {"patch_size": [64, 64]},
        "model": {"torchscript": {"path": weights}, "batch_size": 4},
        "output": {"path": "out/{stem}_seg.zarr"},
    }


def errors_of(data: dict) -> str:
    with pytest.raises(ConfigError) as info:
        load_pipeline(data)
    return str(info.value)


def changed(base: dict, fn) -> dict:
    data = copy.deepcopy(base)
    fn(data)
    return data


def test_valid_pipeline_gets_defaults_and_absolute_paths(base, tmp_path):
    cfg = load_pipeline(base, base_dir=tmp_path)
    assert isinstance(cfg, PipelineConfig)
    assert cfg.tiling.overlap == 0.25 and cfg.tiling.overlap_px is None
    assert cfg.tiling.blend == "gaussian" and cfg.execution.scheduler == "threads"
    assert cfg.input.path == [str(tmp_path / "data" / "*.zarr")]
    assert cfg.output.path == str(tmp_path / "out" / "{stem}_seg.zarr")
    assert cfg.model.kind == "torchscript" and cfg.model.output == "labels"
    assert cfg.all_outputs() == [cfg.output] and cfg.output.content == "result"
    assert cfg.input.nan_policy == "error" and cfg.input.axes is None
    # the resolved pipeline dumps back in the form it is written in, and loads again
    dumped = cfg.model_dump(mode="json")
    assert dumped["model"]["torchscript"] == {"path": cfg.model.params["path"]}
    assert load_pipeline(dumped).model == cfg.model


def test_relative_paths_resolve_against_the_pipeline_file(tmp_path, weights):
    sub = tmp_path / "pipelines"
    sub.mkdir()
    os.symlink(weights, sub / "m.pt")
    (sub / "p.yaml").write_text(textwrap.dedent("""
        version: 1
        input: {path: ../data/a.zarr}
        tiling: {patch_size: [32, 32, 32], overlap_px: [8, 8, 8]}
        model: {torchscript: m.pt, output: probabilities}
        output: {path: "s3://bucket/{name}"}
        evaluate: {reference: {path: "../gt/{stem}.zarr", array: labels}}
    """))
    cfg = load_pipeline(sub / "p.yaml")
    assert cfg.input.path == [str(tmp_path / "data" / "a.zarr")]
    assert cfg.model.params == {"path": str(sub / "m.pt")}  # a bare path is {path: ...}
    assert cfg.output.path == "s3://bucket/{name}"  # URLs untouched
    assert cfg.evaluate.reference.path == str(tmp_path / "gt" / "{stem}.zarr")
    assert cfg.tiling.overlap is None and cfg.tiling.overlap_px == [8, 8, 8]
    assert cfg.model.output == "probabilities"


def test_unknown_key_is_named_with_suggestion(base):
    msg = errors_of(changed(base, lambda d: d["model"].update(batch_sise=3)))
    assert "model.batch_sise: unknown key; did you mean 'batch_size'?" in msg


def test_unknown_top_level_section(base):
    msg = errors_of(changed(base, lambda d: d.update(tilling={})))
    assert "tilling: unknown key; did you mean 'tiling'?" in msg


def test_wrong_type_is_named_and_not_coerced(base):
    msg = errors_of(changed(base, lambda d: d["model"].update(batch_size="16")))
    assert "model.batch_size: wrong type" in msg and "'16'" in msg
    msg = errors_of(changed(base, lambda d: d["tiling"].update(patch_size=[64, "64"])))
    assert "tiling.patch_size[1]: wrong type" in msg


def test_negative_overlap(base):
    msg = errors_of(changed(base, lambda d: d["tiling"].update(overlap=-0.1)))
    assert "tiling.overlap: must be >= 0 and < 1, a fraction of the patch (got -0.1)" in msg


def test_overlap_one_is_rejected(base):
    assert "tiling.overlap: must be >= 0 and < 1, a fraction of the patch (got 1.0)" in errors_of(
        changed(base, lambda d: d["tiling"].update(overlap=1.0)))


def test_overlap_and_overlap_px_together(base):
    msg = errors_of(changed(base, lambda d: d["tiling"].update(overlap=0.25, overlap_px=[8, 8])))
    assert "tiling.overlap_px: overlap and overlap_px are mutually exclusive" in msg


def test_overlap_px_must_be_smaller_than_patch(base):
    msg = errors_of(changed(base, lambda d: d["tiling"].update(overlap_px=[8, 64])))
    assert "tiling.overlap_px: entries must be >= 0 and < the patch size" in msg


@pytest.mark.parametrize("patch, reason", [
    ([64], "must have 2 (2D) or 3 (3D) entries"),
    ([64, 64, 64, 64], "must have 2 (2D) or 3 (3D) entries"),
    ([64, 0], "every entry must be > 0"),
    ([-1, 64], "every entry must be > 0"),
])
def test_bad_patch_size(base, patch, reason):
    msg = errors_of(changed(base, lambda d: d["tiling"].update(patch_size=patch)))
    assert f"tiling.patch_size: {reason}" in msg


def test_every_problem_is_listed(base):
    def bad(d):
        d["tiling"]["overlap"] = 2
        d["model"]["batch_size"] = 0
        d["model"]["precision"] = "fp8"
        d["output"]["extra"] = 1
    msg = errors_of(changed(base, bad))
    assert "4 problems" in msg, msg
    for path in ("tiling.overlap:", "model.batch_size:", "model.precision:", "output.extra: unknown key"):
        assert path in msg


def test_unknown_postprocess_name_suggests(base):
    msg = errors_of(changed(base, lambda d: d.update(postprocess=["fill_hole"])))
    assert "postprocess[0]: unknown postprocess step 'fill_hole'; did you mean 'fill_holes'?" in msg


def test_registered_postprocess_name_is_checked_against_registry(base, monkeypatch):
    from tileseg import registry

    def my_open(data, *, spacing=None, radius=1):
        return data

    monkeypatch.setitem(registry._EXTRA["postprocess"], "my_opening", my_open)
    cfg = load_pipeline(changed(base, lambda d: d.update(postprocess=[{"my_opening": {"radius": 2}}])))
    assert cfg.postprocess_steps() == [("my_opening", {"radius": 2})]
    msg = errors_of(changed(base, lambda d: d.update(postprocess=["fill_holes", "my_openin"])))
    assert "postprocess[1]: unknown postprocess step 'my_openin'; did you mean 'my_opening'?" in msg
    msg = errors_of(changed(base, lambda d: d.update(postprocess=[{"my_opening": {"radios": 2}}])))
    assert "postprocess[0]: unknown parameter 'radios' for postprocess step 'my_opening'; did you mean 'radius'?" in msg
    # image fields come from the image, never from parameters
    msg = errors_of(changed(base, lambda d: d.update(postprocess=[{"my_opening": {"spacing": [1, 1]}}])))
    assert "postprocess[0]: unknown parameter 'spacing'" in msg


def test_model_output_is_explicit_and_classify_steps_need_probabilities(base):
    msg = errors_of(changed(base, lambda d: d.update(postprocess=["argmax"])))
    assert "postprocess[0]: 'argmax' turns probabilities into classes, but model.output is 'labels'" in msg
    assert "set model.output: probabilities" in msg

    def probs(d):
        d["model"]["output"] = "probabilities"
        d["postprocess"] = [{"argmax": {"min_prob": 0.6}}, {"remove_small_objects": {"min_size_px": 5}}]
    cfg = load_pipeline(changed(base, probs))
    assert cfg.model.output == "probabilities"
    assert cfg.postprocess_steps() == [("argmax", {"min_prob": 0.6}), ("remove_small_objects", {"min_size_px": 5})]

    def typo(d):
        probs(d)
        d["postprocess"] = [{"argmax": {"min_prb": 0.6}}]
    msg = errors_of(changed(base, typo))
    assert "postprocess[0]: unknown parameter 'min_prb' for postprocess step 'argmax'; did you mean 'min_prob'?" in msg
    msg = errors_of(changed(base, lambda d: d["model"].update(output="label")))
    assert "model.output: wrong type or value" in msg


def test_model_is_one_registered_kind_with_its_parameters(base, weights):
    msg = errors_of(changed(base, lambda d: d.update(model={"batch_size": 4})))
    assert "model: give exactly one model kind (exported, onnx, python, state_dict, torchscript, transformers)" in msg
    msg = errors_of(changed(base, lambda d: d.update(model={"torchscrpt": {"path": weights}})))
    assert "model: unknown model kind 'torchscrpt'; did you mean 'torchscript'?" in msg
    msg = errors_of(changed(base, lambda d: d.update(model={"torchscript": {"pth": weights}})))
    assert "model.torchscript: unknown parameter 'pth' for model kind 'torchscript'; did you mean 'path'?" in msg
    msg = errors_of(changed(base, lambda d: d.update(model={"state_dict": {"path": weights}})))
    assert "model.state_dict: model kind 'state_dict' needs parameter(s) architecture" in msg
    cfg = load_pipeline(changed(base, lambda d: d.update(
        model={"state_dict": {"path": weights, "architecture": {"unet": {"in_channels": 1}}}})))
    assert cfg.model.kind == "state_dict" and cfg.model.files() == {"path": weights}
    assert cfg.model.spec() == {"state_dict": {"path": weights, "architecture": {"unet": {"in_channels": 1}}}}


def test_a_new_model_kind_needs_no_schema_or_loader_change(base, tmp_path, monkeypatch):
    from tileseg import registry
    from tileseg.predictors.kinds import ModelKind

    class Onnx(ModelKind):
        name = "onnx"
        file_params = ("path", "labels_file")

        def __init__(self, path: str, labels_file: str, providers: list | None = None) -> None:
            self.path, self.labels_file = path, labels_file

    monkeypatch.setitem(registry._EXTRA["models"], "onnx", Onnx)
    (tmp_path / "m.onnx").write_bytes(b"x")
    (tmp_path / "l.txt").write_text("a\nb\n")
    cfg = load_pipeline(changed(base, lambda d: d.update(model={"onnx": {"path": "m.onnx", "labels_file": "l.txt"}})),
                        base_dir=tmp_path)
    assert cfg.model.params == {"path": str(tmp_path / "m.onnx"), "labels_file": str(tmp_path / "l.txt")}
    (tmp_path / "l.txt").unlink()
    msg = errors_of_at(changed(base, lambda d: d.update(model={"onnx": {"path": "m.onnx", "labels_file": "l.txt"}})),
                       tmp_path)
    assert "model.onnx.labels_file: file not found" in msg


def errors_of_at(data: dict, base_dir) -> str:
    with pytest.raises(ConfigError) as info:
        load_pipeline(data, base_dir=base_dir)
    return str(info.value)


def test_outputs_list(base):
    def two(d):
        d.pop("output")
        d["model"]["output"] = "probabilities"
        d["postprocess"] = ["argmax"]
        d["outputs"] = [{"path": "out/{stem}_seg.zarr"}, {"path": "out/{stem}_prob.zarr", "content": "raw"}]
    cfg = load_pipeline(changed(base, two))
    assert [o.content for o in cfg.all_outputs()] == ["result", "raw"]
    msg = errors_of(changed(base, lambda d: d.update(outputs=[{"path": "x.zarr"}])))
    assert "give exactly one of output: (one output) or outputs: (a list)" in msg
    msg = errors_of(changed(base, lambda d: d["output"].update(content="probs")))
    assert "output.content: wrong type or value" in msg
    msg = errors_of(changed(base, lambda d: d["output"].update(options={"compresion": "zstd"})))
    assert "unknown parameter 'compresion' for writer 'zarr'; did you mean 'compressors'?" in msg


def test_input_keys_for_axes_nodata_and_nan_policy(base):
    cfg = load_pipeline(changed(base, lambda d: d["input"].update(axes="cyx", nodata=0, nan_policy="fill",
                                                                   fill_value=-1.5)))
    assert (cfg.input.axes, cfg.input.nodata, cfg.input.nan_policy, cfg.input.fill_value) == ("cyx", 0, "fill", -1.5)
    opts = cfg.inference_options()
    assert opts.nan_policy == "fill" and opts.fill_value == -1.5
    assert "input.axes: axes 'cyy'" in errors_of(changed(base, lambda d: d["input"].update(axes="cyy")))
    assert "input.nan_policy: wrong type or value" in errors_of(
        changed(base, lambda d: d["input"].update(nan_policy="ignore")))
    assert "input.options: 'axes' is an input key of its own" in errors_of(
        changed(base, lambda d: d["input"].update(options={"axes": "cyx"})))


def test_yaml_alias_bomb_is_refused_before_use(tmp_path):
    lines = ["version: 1", "input:", "  path: a.zarr", "  options:", '    a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for i in range(1, 9):
        prev = f"*a{i - 1}"
        lines.append(f"    a{i}: &a{i} [{', '.join([prev] * 10)}]")
    lines += ["method: otsu", "output: {path: o.zarr}"]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    assert path.stat().st_size < 2000  # a tiny file standing for 10^9 strings
    msg = str(pytest.raises(ConfigError, load_pipeline, path).value)
    assert str(path) in msg and "expands to more than 100000 values" in msg
    big = tmp_path / "big.yaml"
    big.write_text("version: 1\n" + "# padding\n" * 120_000)
    assert "over the 1048576-byte limit" in str(pytest.raises(ConfigError, load_pipeline, big).value)


def test_unknown_template_placeholder(base):
    msg = errors_of(changed(base, lambda d: d["output"].update(path="out/{sten}_seg.zarr")))
    assert "output.path: unknown placeholder {sten}" in msg and "did you mean 'stem'?" in msg
    msg = errors_of(changed(base, lambda d: d["output"].update(path="out/{0}.zarr")))
    assert "output.path: unknown placeholder {0}" in msg
    # format specs on allowed fields are fine
    cfg = load_pipeline(changed(base, lambda d: d["output"].update(path="out/{index:04d}_{name}")))
    assert cfg.output.path.endswith("{index:04d}_{name}")


def test_model_xor_method(base):
    msg = errors_of(changed(base, lambda d: d.pop("model")))
    assert "give exactly one of model: or method:" in msg


def test_unknown_method_is_named(base):
    def bad(d):
        d.pop("model")
        d["method"] = {"no_such_method": {}}
    msg = errors_of(changed(base, bad))
    assert "method: unknown method 'no_such_method'" in msg


def test_version_must_be_one(base):
    assert "version: must be 1 (got 2)" in errors_of(changed(base, lambda d: d.update(version=2)))
    assert "version: required key is missing" in errors_of(changed(base, lambda d: d.pop("version")))


def test_missing_weights_file(base, tmp_path):
    msg = errors_of(changed(base, lambda d: d["model"].update(torchscript={"path": str(tmp_path / "nope.pt")})))
    assert "model.torchscript.path: file not found" in msg and "nope.pt" in msg


def test_scheduler_names(base):
    msg = errors_of(changed(base, lambda d: d.update(execution={"scheduler": "thread"})))
    assert "execution.scheduler:" in msg and "did you mean 'threads'?" in msg
    cfg = load_pipeline(changed(base, lambda d: d.update(execution={"scheduler": "tcp://10.0.0.1:8786"})))
    assert cfg.execution.scheduler == "tcp://10.0.0.1:8786"


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("version: 1\ninput:\n  path: [a, b\noutput: {path: x}\n")
    with pytest.raises(ConfigError) as info:
        load_pipeline(path)
    msg = str(info.value)
    assert str(path) in msg and "invalid YAML" in msg
    assert f"{path}:4:" in msg  # the unclosed flow sequence is detected on line 4


def test_yaml_tab_error_line(tmp_path):
    path = tmp_path / "tab.yaml"
    path.write_text("version: 1\ninput:\n\tpath: a\n")
    msg = str(pytest.raises(ConfigError, load_pipeline, path).value)
    assert f"{path}:3:" in msg


def test_top_level_must_be_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    assert "top level must be a mapping" in str(pytest.raises(ConfigError, load_pipeline, path).value)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert "empty" in str(pytest.raises(ConfigError, load_pipeline, empty).value)


def test_missing_pipeline_file(tmp_path):
    assert "pipeline file not found" in str(pytest.raises(ConfigError, load_pipeline, tmp_path / "x.yaml").value)


def test_yaml_is_parsed_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("version: !!python/object/apply:os.system ['true']\n")
    msg = str(pytest.raises(ConfigError, load_pipeline, path).value)
    assert "invalid YAML" in msg


@pytest.mark.parametrize("text, key, line", [
    ("version: 1\ninput: {path: a.zarr}\nmethod: otsu\noutput: {path: o.zarr}\noutput: {path: p.zarr}\n",
     "output", 5),
    ("version: 1\ninput: {path: a.zarr}\nmethod: otsu\noutput: {path: o.zarr}\nexecution: {workers: 2, workers: 3}\n",
     "workers", 5),
    ("version: 1\ninput:\n  path: a.zarr\n  array: image\n  array: labels\nmethod: otsu\noutput: {path: o.zarr}\n",
     "array", 5),
])
def test_duplicate_yaml_keys_are_refused_with_their_line(tmp_path, text, key, line):
    """PyYAML keeps the last of two equal keys silently: a pasted second section would win unseen."""
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    msg = str(pytest.raises(ConfigError, load_pipeline, path).value)
    assert f"{path}:{line}:" in msg and f"duplicate key {key!r}" in msg


def test_yaml_merge_keys_may_still_be_overridden(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("version: 1\ninput: {path: a.zarr}\nmethod: otsu\noutputs:\n"
                    "  - &first {path: o.zarr, writer: zarr}\n  - {<<: *first, path: p.zarr}\n")
    cfg = load_pipeline(path)
    assert [os.path.basename(o.path) for o in cfg.all_outputs()] == ["o.zarr", "p.zarr"]
    assert [o.writer for o in cfg.all_outputs()] == ["zarr", "zarr"]


def test_repository_pipelines_are_valid():
    root = os.path.join(os.path.dirname(__file__), "..", "..", "pipelines")
    if not os.path.isdir(root):
        pytest.skip("no pipelines/ folder")
    names = sorted(n for n in os.listdir(root) if n.endswith(".yaml"))
    assert names
    for name in names:
        load_pipeline(os.path.join(root, name))


def test_preprocess_steps_and_parameters_are_checked(base):
    cfg = load_pipeline(changed(base, lambda d: d.update(preprocess=["zscore", {"percentile": {"lower": 1}}])))
    assert cfg.preprocess == [{"zscore": {}}, {"percentile": {"lower": 1}}]
    msg = errors_of(changed(base, lambda d: d.update(preprocess=[{"zscore": {"nodat": 0}}])))
    assert "preprocess[0]: unknown parameter 'nodat' for preprocess step 'zscore'; did you mean 'nodata'?" in msg
    msg = errors_of(changed(base, lambda d: d.update(preprocess=["zscore", {"fixed": {"mean": 1}}])))
    assert "preprocess[1]: preprocess step 'fixed' needs parameter(s) std" in msg
    msg = errors_of(changed(base, lambda d: d.update(preprocess=["zcore"])))
    assert "preprocess[0]: unknown preprocess step 'zcore'; did you mean 'zscore'?" in msg
