"""Pipeline runs end to end: outputs, report, failures per item, resume.

Written pixels are compared with oracles that do not use tileseg (see
tests/pipeline_helpers.py): MONAI's sliding window with the same patch grid
and Gaussian blending, or one whole-image forward pass for ``blend: crop``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from tileseg.errors import ConfigError
from tileseg.image import Image
from tileseg.runner import Manifest, render_output, run_pipeline
from tileseg.writers import is_complete

# shared generators and oracles (tests/pipeline_helpers.py); the suite uses --import-mode=importlib
sys.path.insert(0, str(Path(__file__).parent))
from pipeline_helpers import (  # noqa: E402
    argmax_labels,
    assert_labels_match,
    dice_numpy,
    monai_logits,
    n_patches,
    save_conv_model,
    softmax,
    threshold_labels,
    whole_image_logits,
    write_pipeline,
    write_scene,
)

PATCH, OVERLAP, CHUNKS = (24, 24), 0.25, (40, 40)  # write_pipeline's defaults


def read_output(path: str) -> np.ndarray:
    return zarr.open_group(path, mode="r")["0"][...]


def assert_matches_monai(pred: np.ndarray, image: np.ndarray) -> None:
    """Labels written by a default pipeline equal the argmax of MONAI's sliding-window logits."""
    assert_labels_match(pred, *argmax_labels(monai_logits(image, PATCH, OVERLAP)))


@pytest.fixture
def scenes(tmp_path):
    pytest.importorskip("torch")
    save_conv_model(tmp_path / "model.pt")
    a = write_scene(tmp_path / "a.zarr", shape=(70, 90), seed=1)  # 4 x 5 patches, 2 x 3 output chunks
    b = write_scene(tmp_path / "b.zarr", shape=(50, 45), seed=2)  # 3 x 3 patches, 2 x 2 output chunks
    return tmp_path, {"a": a, "b": b}


def test_run_writes_labels_report_and_dice(scenes):
    root, data = scenes
    pipe = write_pipeline(root / "p.yaml", "*.zarr")
    report = run_pipeline(pipe)
    assert [i.status for i in report.items] == ["ok", "ok"]
    for item in report.items:
        stem = os.path.basename(item.input)[:-5]
        image, labels = data[stem]
        assert item.output == str(root / "out" / f"{stem}_seg.zarr")
        assert is_complete(item.output)
        out = zarr.open_group(item.output, mode="r")["0"]
        assert out.chunks == CHUNKS and out.dtype == np.uint8
        pred = out[...]
        assert_matches_monai(pred, image)
        assert item.shape == list(image.shape)
        assert item.n_patches == n_patches(image.shape, PATCH, OVERLAP) >= 9
        for c, name in enumerate(["background", "object"]):
            assert item.dice[name] == pytest.approx(dice_numpy(pred, labels, c), abs=1e-12)
        assert 0.5 < item.dice["object"] < 1.0
        assert set(item.timings) >= {"open", "graph", "compute_write", "finalize", "evaluate"}
        assert item.pixels_per_s > 0 and item.peak_rss_bytes > 0
    # the report on disk says the same
    saved = json.loads((root / "out" / "tileseg-report.json").read_text())
    assert report.report_path == str(root / "out" / "tileseg-report.json")
    assert [i["status"] for i in saved["items"]] == ["ok", "ok"]
    assert saved["summary"] == {"ok": 2, "skipped": 0, "failed": 0}
    assert saved["pipeline"]["tiling"]["patch_size"] == list(PATCH)
    assert saved["pipeline"]["model"]["torchscript"] == {"path": str(root / "model.pt")}
    assert {"tileseg", "dask", "zarr", "numpy", "torch"} <= set(saved["versions"])
    assert saved["items"][0]["timings"]["compute_write"] >= 0


def test_probabilities_without_argmax(scenes):
    root, data = scenes
    pipe = write_pipeline(root / "p.yaml", ["a.zarr"], engine="probabilities")
    text = pipe.read_text().replace("evaluate: {reference: {array: labels}}\n", "")
    pipe.write_text(text)
    report = run_pipeline(pipe)
    assert report.ok
    prob = read_output(report.items[0].output)
    image = data["a"][0]
    assert prob.shape == (2,) + image.shape and prob.dtype == np.float32
    np.testing.assert_allclose(prob, softmax(monai_logits(image, PATCH, OVERLAP)), rtol=0, atol=1e-5)


def test_threshold_other_than_half(tmp_path):
    pytest.importorskip("torch")
    save_conv_model(tmp_path / "one.pt", classes=1)
    image, _ = write_scene(tmp_path / "a.zarr", seed=3)
    pipe = write_pipeline(tmp_path / "p.yaml", ["a.zarr"], model="one.pt",
                          post="[{threshold: {value: 0.7}}]", engine="probabilities")
    report = run_pipeline(pipe)
    assert report.ok, report.items[0].error
    pred = read_output(report.items[0].output)
    assert pred.dtype == np.uint8
    logit = monai_logits(image, PATCH, OVERLAP, classes=1)[0]
    want, margin = threshold_labels(logit, 0.7)
    assert_labels_match(pred, want, margin)
    assert (want != threshold_labels(logit, 0.5)[0]).sum() > 50  # the value matters here


def test_bad_items_fail_alone(scenes):
    root, data = scenes
    # corrupt: metadata that is not JSON; missing: a path that does not exist
    (root / "corrupt.zarr").mkdir()
    (root / "corrupt.zarr" / "zarr.json").write_text("{not json")
    pipe = write_pipeline(root / "p.yaml", ["a.zarr", "missing.zarr", "corrupt.zarr", "b.zarr"])
    report = run_pipeline(pipe)
    status = {os.path.basename(i.input): i for i in report.items}
    assert status["a.zarr"].status == "ok" and status["b.zarr"].status == "ok"
    assert status["missing.zarr"].status == "failed" and "missing.zarr" in status["missing.zarr"].error
    assert status["corrupt.zarr"].status == "failed" and "corrupt.zarr" in status["corrupt.zarr"].error
    assert not report.ok and report.n_failed == 2
    assert_matches_monai(read_output(status["a.zarr"].output), data["a"][0])
    assert is_complete(status["b.zarr"].output)
    assert not os.path.exists(root / "out" / "corrupt_seg.zarr")
    saved = json.loads((root / "out" / "tileseg-report.json").read_text())
    assert saved["summary"] == {"ok": 2, "skipped": 0, "failed": 2}
    failed = [i for i in saved["items"] if i["status"] == "failed"]
    assert all(i["error"] for i in failed)
    manifest = Manifest(report.manifest_path)
    assert report.manifest_path == str(root / "out" / "tileseg-run.sqlite")
    assert manifest.by_output(str(root / "out" / "a_seg.zarr"))["status"] == "done"
    corrupt = manifest.by_output(str(root / "out" / "corrupt_seg.zarr"))
    assert corrupt["status"] == "failed" and "corrupt.zarr" in corrupt["error"]
    assert manifest.by_output(str(root / "out" / "missing_seg.zarr")) is None  # never listed, never claimed


def test_failure_while_computing_leaves_no_complete_output(scenes):
    root, _ = scenes
    # a chunk file that exists but cannot be decoded fails only at compute time
    chunk = next(p for p in (root / "b.zarr" / "image").rglob("*") if p.is_file() and p.name != "zarr.json")
    chunk.write_bytes(b"garbage" * 10)
    pipe = write_pipeline(root / "p.yaml", "*.zarr")
    report = run_pipeline(pipe)
    a, b = report.items
    assert a.status == "ok" and b.status == "failed"
    assert "b.zarr" in b.error
    assert not is_complete(b.output) and not os.path.exists(b.output)
    manifest = Manifest(report.manifest_path)
    assert manifest.by_output(b.output)["status"] == "failed" and "b.zarr" in manifest.by_output(b.output)["error"]
    assert manifest.by_output(a.output)["status"] == "done"


def test_resume_skips_complete_and_reruns_incomplete(scenes):
    root, data = scenes
    pipe = write_pipeline(root / "p.yaml", "*.zarr")
    first = run_pipeline(pipe)
    assert first.ok
    a_out, b_out = (i.output for i in first.items)
    a_run_id = zarr.open_group(a_out, mode="r").attrs["tileseg"]["run_id"]
    # b's output disappears (e.g. deleted by hand): the manifest alone must not make it count as done
    shutil.rmtree(b_out)
    second = run_pipeline(pipe)
    assert [i.status for i in second.items] == ["skipped", "ok"]
    assert second.items[0].dice is not None  # evaluation still reported for skipped items
    assert zarr.open_group(a_out, mode="r").attrs["tileseg"]["run_id"] == a_run_id  # not rewritten
    assert is_complete(b_out)
    assert_matches_monai(read_output(b_out), data["b"][0])
    # a claim held by a process that no longer exists (a crash) is taken over, even though the output exists
    import socket
    import sqlite3
    import time

    with sqlite3.connect(second.manifest_path) as db:
        db.execute("UPDATE items SET status = 'running', owner = ?, heartbeat = ? WHERE outputs LIKE ?",
                   (f"{socket.gethostname()}:999999999:0:dead", time.time(), f"%{a_out}%"))
    third = run_pipeline(pipe)
    assert [i.status for i in third.items] == ["ok", "skipped"]
    # no resume: everything recomputed
    assert [i.status for i in run_pipeline(pipe, resume=False).items] == ["ok", "ok"]


def test_changed_config_is_not_skipped(scenes):
    root, _ = scenes
    pipe = write_pipeline(root / "p.yaml", "*.zarr")
    first = run_pipeline(pipe)
    write_pipeline(root / "p.yaml", "*.zarr", overlap=0.5)
    second = run_pipeline(pipe)
    assert [i.status for i in second.items] == ["ok", "ok"]
    assert {i.config_hash for i in second.items}.isdisjoint({i.config_hash for i in first.items})
    # execution settings do not change the hash
    text = pipe.read_text().replace("workers: 2", "workers: 1")
    pipe.write_text(text)
    assert [i.status for i in run_pipeline(pipe).items] == ["skipped", "skipped"]


def test_foreign_output_is_not_overwritten(scenes):
    root, data = scenes
    import dask.array as da

    from tileseg.writers import get_writer

    target = root / "out" / "a_seg.zarr"
    get_writer("zarr").write(Image(da.full((4, 4), 7, dtype="uint8", chunks=2), axes=("y", "x")), str(target))
    pipe = write_pipeline(root / "p.yaml", ["a.zarr"])
    report = run_pipeline(pipe)
    assert report.items[0].status == "failed" and "already exists" in report.items[0].error
    assert read_output(str(target)).tolist() == [[7] * 4] * 4  # untouched
    # overwrite: true replaces it
    write_pipeline(root / "p.yaml", ["a.zarr"], output='"out/{stem}_seg.zarr", overwrite: true')
    assert run_pipeline(pipe).ok
    assert_matches_monai(read_output(str(target)), data["a"][0])


def test_output_collisions_and_empty_inputs_are_config_errors(scenes):
    root, _ = scenes
    pipe = write_pipeline(root / "p.yaml", "*.zarr", output='"out/seg.zarr"')
    with pytest.raises(ConfigError, match="both write to"):
        run_pipeline(pipe)
    pipe = write_pipeline(root / "p.yaml", "nothing_here_*.zarr")
    with pytest.raises(ConfigError, match="input.path"):
        run_pipeline(pipe)


def test_3d_volume(tmp_path):
    pytest.importorskip("torch")
    save_conv_model(tmp_path / "m3.pt", ndim=3)
    image, labels = write_scene(tmp_path / "v.zarr", shape=(20, 24, 18), chunks=(8, 8, 8), seed=6)
    pipe = write_pipeline(tmp_path / "p.yaml", ["v.zarr"], patch=(8, 16, 8), overlap=0.5,
                          chunks=(10, 10, 10), model="m3.pt")
    report = run_pipeline(pipe)
    item = report.items[0]
    assert item.status == "ok", item.error
    pred = read_output(item.output)
    assert_labels_match(pred, *argmax_labels(monai_logits(image, (8, 16, 8), 0.5)))
    assert item.n_patches == n_patches(image.shape, (8, 16, 8), 0.5) == 4 * 2 * 4
    assert item.dice["object"] == pytest.approx(dice_numpy(pred, labels, 1))


def test_method_pipeline_with_registered_steps(tmp_path, monkeypatch):
    from tileseg import registry

    def above(data, *, spacing=None, value=0.5):
        return (data > value).astype(np.uint8)

    def invert(data, *, spacing=None):
        return (1 - data).astype(np.uint8)

    monkeypatch.setitem(registry._EXTRA["methods"], "test_above", above)
    monkeypatch.setitem(registry._EXTRA["postprocess"], "test_invert", invert)
    image, _ = write_scene(tmp_path / "a.zarr", seed=5)
    (tmp_path / "p.yaml").write_text(
        "version: 1\ninput: {path: a.zarr, array: image}\nmethod: {test_above: {value: 0.5}}\n"
        "postprocess: [test_invert]\noutput: {path: 'out/{stem}.zarr'}\ntiling: {patch_size: [8, 8], chunks: [16, 16]}\n")
    report = run_pipeline(tmp_path / "p.yaml", scheduler="synchronous")
    assert report.ok, report.items[0].error
    out = report.items[0].output
    np.testing.assert_array_equal(read_output(out), (image <= 0.5).astype(np.uint8))
    assert zarr.open_group(out, mode="r")["0"].chunks == (16, 16)


def test_classical_pipeline_matches_scikit_image(tmp_path):
    pytest.importorskip("skimage")
    from skimage.filters import threshold_otsu
    from skimage.measure import label

    rng = np.random.default_rng(6)
    image = (rng.normal(100, 20, size=(61, 77)) + 60 * (rng.random((61, 77)) > 0.7)).clip(0, 255).astype(np.uint8)
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="w")
    group.create_array("image", shape=image.shape, chunks=(16, 16), dtype="uint8")[:] = image
    (tmp_path / "p.yaml").write_text(
        "version: 1\ninput: {path: s.zarr, array: image}\nmethod: otsu\npostprocess: [{label: {connectivity: 1}}]\n"
        "tiling: {chunks: [20, 30]}\noutput: {path: 'out/{stem}.zarr'}\n")
    report = run_pipeline(tmp_path / "p.yaml")
    assert report.ok, report.items[0].error
    assert report.items[0].n_patches is None
    expected = label(image > threshold_otsu(image), connectivity=1)
    got = read_output(report.items[0].output)
    assert got.max() == expected.max() > 10
    np.testing.assert_array_equal(got, expected)


def test_local_cluster_scheduler(scenes):
    pytest.importorskip("distributed")
    root, data = scenes
    pipe = write_pipeline(root / "p.yaml", ["a.zarr"])
    # one worker process (faster start) declaring a GPU resource that the model tasks ask for; the memory
    # limit leaves room for torch (a worker over 80% of it is paused by distributed and the run would wait)
    pipe.write_text(pipe.read_text().replace("workers: 2", "workers: 1, resources: {GPU: 1}, memory_limit: 2GiB"))
    report = run_pipeline(pipe, scheduler="local")
    assert report.ok, report.items[0].error
    assert report.scheduler["scheduler"] == "local" and report.scheduler["resources"] == {"GPU": 1}
    assert report.scheduler["n_workers"] == 1 and report.scheduler["memory_limit"] == 2 * 2**30
    assert_matches_monai(read_output(report.items[0].output), data["a"][0])


def test_crop_blend_equals_one_whole_image_forward(scenes):
    # receptive-field radius 2 <= overlap_px / 2: each kept pixel saw the same context as in the whole image
    root, data = scenes
    pipe = write_pipeline(root / "p.yaml", "*.zarr", engine="probabilities")
    text = pipe.read_text().replace("overlap: 0.25", "overlap_px: [8, 8], blend: crop")
    pipe.write_text(text.replace("evaluate: {reference: {array: labels}}\n", ""))
    report = run_pipeline(pipe)
    assert [i.status for i in report.items] == ["ok", "ok"], [i.error for i in report.items]
    for item in report.items:
        image = data[os.path.basename(item.input)[:-5]][0]
        # stride 16: ceil((size - 24) / 16) + 1 windows per axis
        assert item.n_patches == np.prod([-(-(s - 24) // 16) + 1 for s in image.shape]) >= 9
        prob = read_output(item.output)
        np.testing.assert_allclose(prob, softmax(whole_image_logits(image)), rtol=0, atol=1e-5)


def test_render_output_fields():
    assert render_output("/o/{stem}/{name}-{index:02d}", "/d/scan.ome.zarr", 3) == "/o/scan/scan.ome.zarr-03"


def test_class_names_must_match_the_model(scenes):
    root, _ = scenes
    pipe = write_pipeline(root / "p.yaml", ["a.zarr"])
    pipe.write_text(pipe.read_text().replace("classes: [background, object]", "classes: [a, b, c]"))
    item = run_pipeline(pipe).items[0]
    assert item.status == "failed"
    assert "model.classes lists 3 classes" in item.error and "outputs 2 channels" in item.error
    assert not os.path.exists(item.output)


def test_reference_from_a_path_template(scenes):
    root, data = scenes
    _, labels = data["a"]
    gt = zarr.open_group(str(root / "gt_a.zarr"), mode="w")
    gt.create_array("mask", shape=labels.shape, chunks=(25, 25), dtype="uint8")[:] = 1 - labels
    pipe = write_pipeline(root / "p.yaml", ["a.zarr"])
    pipe.write_text(pipe.read_text().replace("evaluate: {reference: {array: labels}}",
                                             "evaluate: {reference: {path: 'gt_{stem}.zarr', array: mask}}"))
    item = run_pipeline(pipe).items[0]
    assert item.status == "ok", item.error
    pred = read_output(item.output)
    assert item.dice["object"] == pytest.approx(dice_numpy(pred, 1 - labels, 1), abs=1e-12)
    assert item.dice["object"] < 0.5  # scored against the inverted mask, not the input's labels


def test_several_outputs_from_one_model_run(scenes, monkeypatch):
    """outputs: labels after postprocess and the raw probabilities, the model run once, both recorded."""
    from tileseg.stitching import overlap_add

    root, data = scenes
    calls = []
    real = overlap_add.predict_owner
    monkeypatch.setattr(overlap_add, "predict_owner", lambda *a: calls.append(1) or real(*a))
    pipe = write_pipeline(root / "p.yaml", ["a.zarr"], engine="probabilities", post="[argmax]")
    text = pipe.read_text().replace(
        'output: {path: "out/{stem}_seg.zarr"}',
        'outputs: [{path: "out/{stem}_seg.zarr"}, {path: "out/{stem}_prob.zarr", content: raw}]')
    pipe.write_text(text)
    report = run_pipeline(pipe, scheduler="synchronous")
    assert report.ok, report.items[0].error
    item = report.items[0]
    assert item.outputs == [str(root / "out" / "a_seg.zarr"), str(root / "out" / "a_prob.zarr")]
    image, labels = data["a"]
    logits = monai_logits(image, PATCH, OVERLAP)
    prob = read_output(item.outputs[1])
    np.testing.assert_allclose(prob, softmax(logits), rtol=0, atol=1e-5)
    pred = read_output(item.outputs[0])
    assert_labels_match(pred, *argmax_labels(logits))
    assert item.dice["object"] == pytest.approx(dice_numpy(pred, labels, 1), abs=1e-12)  # scored: the labels
    from tileseg.tiling.grid import make_grid

    owners = len(list(make_grid(image.shape, PATCH, overlap=OVERLAP, chunks=CHUNKS).owners()))
    assert len(calls) == owners  # one model task per owner block, not one per output
    manifest = Manifest(report.manifest_path)
    assert manifest.by_output(item.outputs[0]) == manifest.by_output(item.outputs[1])  # one row per item
    assert manifest.by_output(item.outputs[1])["status"] == "done"
    import tileseg

    back = tileseg.open(item.outputs[0])
    assert back.class_names == ("background", "object") and tileseg.open(item.outputs[1]).axes == ("c", "y", "x")
    # resumed: both complete, nothing recomputed; one output removed: the item runs again
    again = run_pipeline(pipe, scheduler="synchronous")
    assert again.items[0].status == "skipped" and len(calls) == owners
    shutil.rmtree(item.outputs[1])
    third = run_pipeline(pipe, scheduler="synchronous")
    assert third.items[0].status == "ok" and is_complete(item.outputs[1])


def test_nan_input_error_names_the_yaml_key_and_fill_works(tmp_path):
    import tileseg

    raw = np.linspace(0, 1, 40 * 30, dtype=np.float32).reshape(40, 30)
    raw[5, 7] = np.nan
    zarr.create_array(str(tmp_path / "n.zarr"), shape=raw.shape, chunks=(16, 16), dtype="float32")[:] = raw
    base = ("version: 1\ninput: {path: n.zarr%s}\ntiling: {patch_size: [16, 16]}\n"
            "model: {torchscript: {path: m.pt}}\noutput: {path: 'out/{stem}.zarr', overwrite: true}\n")
    pytest.importorskip("torch")
    save_conv_model(tmp_path / "m.pt")
    (tmp_path / "p.yaml").write_text(base % "")
    report = tileseg.run(tmp_path / "p.yaml", scheduler="synchronous")
    err = report.items[0].error
    assert "n.zarr" in err and "NaN" in err and "input.nan_policy: fill" in err and "nan_policy=" not in err
    assert not (tmp_path / "out" / "n.zarr").exists()
    (tmp_path / "p.yaml").write_text(base % ", nan_policy: fill, fill_value: 0.5")
    report = tileseg.run(tmp_path / "p.yaml", scheduler="synchronous")
    assert report.ok, report.items[0].error
    filled = np.nan_to_num(raw, nan=0.5)
    got = read_output(str(tmp_path / "out" / "n.zarr"))
    assert_labels_match(got, *argmax_labels(monai_logits(filled, (16, 16), 0.25)))


def test_axes_key_reads_a_leading_channel(tmp_path):
    """A (1, H, W) array without axis names is z, y, x unless input.axes says cyx."""
    import tileseg

    pytest.importorskip("torch")
    save_conv_model(tmp_path / "m.pt")
    image, _ = write_scene(tmp_path / "s.zarr", shape=(40, 50), seed=4)
    zarr.create_array(str(tmp_path / "c.zarr"), shape=(1, 40, 50), chunks=(1, 20, 20), dtype="float32")[:] = image[None]
    text = ("version: 1\ninput: {path: c.zarr%s}\ntiling: {patch_size: [24, 24]}\n"
            "model: {torchscript: {path: m.pt}}\noutput: {path: 'out/{stem}.zarr', overwrite: true}\n")
    (tmp_path / "p.yaml").write_text(text % "")
    err = tileseg.run(tmp_path / "p.yaml", scheduler="synchronous").items[0].error
    assert "patch_size" in err and "('z', 'y', 'x')" in err
    (tmp_path / "p.yaml").write_text(text % ", axes: cyx")
    report = tileseg.run(tmp_path / "p.yaml", scheduler="synchronous")
    assert report.ok, report.items[0].error
    assert_labels_match(read_output(str(tmp_path / "out" / "c.zarr")), *argmax_labels(monai_logits(image, (24, 24), 0.25)))
