"""The tileseg command: exit codes, messages, plan figures, run reports."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
import zarr
from click.testing import CliRunner

from tileseg.cli import main

# shared generators and oracles (tests/pipeline_helpers.py); the suite uses --import-mode=importlib
sys.path.insert(0, str(Path(__file__).parent))
from pipeline_helpers import (  # noqa: E402
    argmax_labels,
    assert_labels_match,
    dice_numpy,
    monai_logits,
    n_patches,
    save_conv_model,
    write_pipeline,
    write_scene,
)


@pytest.fixture
def project(tmp_path):
    pytest.importorskip("torch")
    save_conv_model(tmp_path / "model.pt")
    images = {
        "a": write_scene(tmp_path / "a.zarr", shape=(70, 90), seed=1)[0],
        "b": write_scene(tmp_path / "b.zarr", shape=(130, 45), seed=2)[0],
    }
    return tmp_path, images


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_validate_ok(project):
    root, _ = project
    pipe = write_pipeline(root / "p.yaml", "*.zarr")
    res = invoke("validate", str(pipe))
    assert res.exit_code == 0, res.output
    assert res.output.startswith(f"valid: {pipe}")
    assert "patch [24, 24]" in res.output and "engine output: labels" in res.output


def test_validate_errors_exit_2_and_list_every_problem(project):
    root, _ = project
    pipe = write_pipeline(root / "p.yaml", "*.zarr", overlap=-0.1, post="[argmx]")
    pipe.write_text(pipe.read_text().replace("batch_size: 4", "batch_sise: 4"))
    res = invoke("validate", str(pipe))
    assert res.exit_code == 2
    assert "3 problems" in res.output
    assert "tiling.overlap: must be >= 0 and < 1, a fraction of the patch (got -0.1)" in res.output
    assert "model.batch_sise: unknown key; did you mean 'batch_size'?" in res.output
    assert "postprocess[0]: unknown postprocess step 'argmx'; did you mean 'argmax'?" in res.output


def test_validate_yaml_syntax_error_exit_2(project):
    root, _ = project
    pipe = root / "bad.yaml"
    pipe.write_text("version: 1\ninput: {path: [a\n")
    res = invoke("validate", str(pipe))
    assert res.exit_code == 2 and "invalid YAML" in res.output and f"{pipe}:" in res.output


def test_missing_pipeline_file_exit_2(tmp_path):
    res = invoke("validate", str(tmp_path / "none.yaml"))
    assert res.exit_code == 2 and "pipeline file not found" in res.output


def test_plan_counts_patches(project):
    root, images = project
    pipe = write_pipeline(root / "p.yaml", "*.zarr", patch=(32, 24), overlap=0.3, chunks=(40, 50))
    res = invoke("plan", str(pipe))
    assert res.exit_code == 0, res.output
    rows = [line.split() for line in res.output.splitlines()[2:]]
    assert len(rows) == 2
    for row, name in zip(rows, ["a", "b"]):
        shape = images[name].shape
        assert row[1].endswith(f"{name}.zarr")
        assert row[2] == f"{shape[0]}x{shape[1]}"
        assert int(row[5]) == n_patches(shape, (32, 24), 0.3)
    data = json.loads(invoke("plan", str(pipe), "--json").output)
    assert [d["n_patches"] for d in data] == [n_patches(images[n].shape, (32, 24), 0.3) for n in "ab"]
    assert all(d["est_peak_task_bytes"] > 0 and d["out_channels"] == 2 for d in data)
    assert not (root / "out").exists()  # plan writes nothing


def test_run_exit_0_with_report(project):
    root, images = project
    pipe = write_pipeline(root / "p.yaml", "*.zarr")
    res = invoke("run", str(pipe), "--quiet")
    assert res.exit_code == 0, res.output
    report_path = root / "out" / "tileseg-report.json"
    assert f"report: {report_path}" in res.output
    assert "2 ok, 0 skipped (already complete), 0 failed" in res.output
    assert re.search(r"dice \[0\] .*a\.zarr: background=\d\.\d{4}, object=\d\.\d{4}", res.output)
    report = json.loads(report_path.read_text())
    assert [i["status"] for i in report["items"]] == ["ok", "ok"]
    for item, name in zip(report["items"], "ab"):
        out = zarr.open_group(item["output"], mode="r")["0"][...]
        # MONAI's sliding window with write_pipeline's patch (24, 24) and overlap 0.25, Gaussian blending
        assert_labels_match(out, *argmax_labels(monai_logits(images[name], (24, 24), 0.25)))
    # a second run resumes: both skipped, still exit 0
    res = invoke("run", str(pipe), "--quiet")
    assert res.exit_code == 0 and "0 ok, 2 skipped" in res.output
    res = invoke("run", str(pipe), "--quiet", "--no-resume")
    assert res.exit_code == 0 and "2 ok, 0 skipped" in res.output


def test_run_with_a_bad_item_exits_1(project):
    root, images = project
    (root / "broken.zarr").mkdir()
    (root / "broken.zarr" / "zarr.json").write_text("[1, 2")
    pipe = write_pipeline(root / "p.yaml", ["a.zarr", "broken.zarr", "gone.zarr"])
    res = CliRunner().invoke(main, ["run", str(pipe), "--quiet"], catch_exceptions=False)
    assert res.exit_code == 1
    assert "1 ok, 0 skipped (already complete), 2 failed" in res.output
    report = json.loads((root / "out" / "tileseg-report.json").read_text())
    by_name = {os.path.basename(i["input"]): i for i in report["items"]}
    assert by_name["a.zarr"]["status"] == "ok"
    assert by_name["broken.zarr"]["status"] == "failed" and "broken.zarr" in by_name["broken.zarr"]["error"]
    assert by_name["gone.zarr"]["status"] == "failed" and "gone.zarr" in by_name["gone.zarr"]["error"]
    from tileseg.writers import is_complete

    assert is_complete(by_name["a.zarr"]["output"])
    assert not os.path.exists(by_name["broken.zarr"]["output"])
    from tileseg.manifest import Manifest

    manifest = Manifest(str(root / "out" / "tileseg-run.sqlite"))
    assert manifest.by_output(by_name["a.zarr"]["output"])["status"] == "done"
    assert manifest.by_output(by_name["broken.zarr"]["output"])["status"] == "failed"
    # fix the broken item: the rerun skips a.zarr and redoes only the failed ones
    write_scene(root / "broken.zarr", seed=9)
    pipe = write_pipeline(root / "p.yaml", ["a.zarr", "broken.zarr"])
    res = invoke("run", str(pipe), "--quiet")
    assert res.exit_code == 0 and "1 ok, 1 skipped" in res.output


def test_run_config_error_exit_2(project):
    root, _ = project
    pipe = write_pipeline(root / "p.yaml", "*.zarr", output='"out/{stm}.zarr"')
    res = invoke("run", str(pipe))
    assert res.exit_code == 2 and "output.path: unknown placeholder {stm}" in res.output


def test_run_bad_scheduler_exit_2(project):
    root, _ = project
    pipe = write_pipeline(root / "p.yaml", "*.zarr")
    res = invoke("run", str(pipe), "--scheduler", "thread")
    assert res.exit_code == 2 and "did you mean 'threads'" in res.output


def test_info_shows_what_open_sees(project):
    root, images = project
    res = invoke("info", str(root / "b.zarr"), "--array", "image")
    assert res.exit_code == 0, res.output
    assert "shape: [130, 45]" in res.output and "dtype: float32" in res.output
    desc = json.loads(invoke("info", str(root / "a.zarr"), "--array", "labels", "--json").output)
    assert desc["shape"] == [70, 90] and desc["dtype"] == "uint8" and desc["axes"] == ["y", "x"]
    res = invoke("info", str(root / "nothing.zarr"))
    assert res.exit_code == 1 and "nothing.zarr" in res.output


def test_verbose_flag_logs_to_stderr(project):
    root, _ = project
    pipe = write_pipeline(root / "p.yaml", ["a.zarr"])
    res = CliRunner().invoke(main, ["-v", "run", str(pipe)], catch_exceptions=False)
    assert res.exit_code == 0 and "INFO tileseg.runner: item 0 ok" in res.output
    assert "INFO tileseg.runner: item 0 (a.zarr): open ..." in res.output  # -v: a line per stage
    res = CliRunner().invoke(main, ["run", str(pipe), "--quiet", "--no-resume"], catch_exceptions=False)
    assert res.exit_code == 0 and "INFO" not in res.output


def test_evaluate_command_matches_numpy(project):
    root, _ = project
    pipe = write_pipeline(root / "p.yaml", ["a.zarr"])
    assert invoke("run", str(pipe), "--quiet").exit_code == 0
    pred = str(root / "out" / "a_seg.zarr")
    res = invoke("evaluate", pred, str(root / "a.zarr"), "--ref-array", "labels", "--json")
    assert res.exit_code == 0, res.output
    scores = json.loads(res.output)
    ref = zarr.open_group(str(root / "a.zarr"), mode="r")["labels"][...]
    got = zarr.open_group(pred, mode="r")["0"][...]
    for c in (0, 1):
        assert scores["classes"][str(c)]["dice"] == pytest.approx(dice_numpy(got, ref, c), abs=1e-12)
    assert 0 < scores["classes"]["1"]["dice"] < 1
    text = invoke("evaluate", pred, str(root / "a.zarr"), "--ref-array", "labels").output
    assert f"{scores['classes']['1']['dice']:.4f}" in text
    # the run report holds the same Dice
    report = json.loads((root / "out" / "tileseg-report.json").read_text())
    assert report["items"][0]["dice"]["object"] == pytest.approx(scores["classes"]["1"]["dice"])
    # a float image is not a label image
    res = invoke("evaluate", str(root / "a.zarr"), str(root / "a.zarr"), "--pred-array", "image",
                 "--ref-array", "labels")
    assert res.exit_code != 0 and "integer class labels" in res.output


def test_corrupt_model_file_exit_1_naming_it(project):
    root, _ = project
    (root / "bad.pt").write_bytes(b"this is not a TorchScript archive")
    pipe = write_pipeline(root / "p.yaml", ["a.zarr"], model="bad.pt")
    assert invoke("validate", str(pipe)).exit_code == 0  # the file exists; its content is checked on load
    res = invoke("run", str(pipe), "--quiet")
    assert res.exit_code == 1 and "bad.pt" in res.output
    assert not (root / "out" / "a_seg.zarr").exists()


def test_info_hints_name_cli_options(tmp_path):
    """Errors printed by the CLI name its options (--array), not the library's keyword arguments."""
    g = zarr.open_group(str(tmp_path / "two.zarr"), mode="w")
    g.create_array("image", shape=(1, 8, 8), chunks=(1, 8, 8), dtype="uint8")
    g.create_array("labels", shape=(8, 8), chunks=(8, 8), dtype="uint8")
    res = invoke("info", str(tmp_path / "two.zarr"))
    assert res.exit_code == 1 and "--array ..." in res.output and "array=" not in res.output
    res = invoke("info", str(tmp_path / "two.zarr"), "--array", "image", "--axes", "cyx", "--json")
    assert res.exit_code == 0, res.output
    desc = json.loads(res.output)
    assert desc["axes"] == ["c", "y", "x"] and desc["shape"] == [1, 8, 8]
    res = invoke("info", str(tmp_path / "two.zarr"), "--array", "image", "--axes", "yyx")
    assert res.exit_code == 1 and "axes 'yyx'" in res.output and "at most once" in res.output


def test_run_on_a_scheduler_address_prints_its_dashboard(project):
    distributed = pytest.importorskip("distributed")
    root, images = project
    pipe = write_pipeline(root / "p.yaml", ["a.zarr"])
    with distributed.LocalCluster(n_workers=1, processes=False, protocol="tcp://",
                                  dashboard_address="127.0.0.1:0") as cluster:
        res = invoke("run", str(pipe), "--quiet", "--scheduler", cluster.scheduler_address)
        with distributed.Client(cluster.scheduler_address) as client:
            link = client.dashboard_link
    assert res.exit_code == 0, res.output
    assert f"dashboard: {link}" in res.output and link.startswith("http://127.0.0.1:")
    out = zarr.open_group(str(root / "out" / "a_seg.zarr"), mode="r")["0"][...]
    assert_labels_match(out, *argmax_labels(monai_logits(images["a"], (24, 24), 0.25)))


def test_plan_reports_chunks_that_do_not_fit_an_items_axes(tmp_path):
    """A method pipeline's tiling.chunks is checked per item by plan, as run checks it (not shown as if valid)."""
    import numpy as np

    rng = np.random.default_rng(0)
    zarr.save_array(str(tmp_path / "flat.zarr"), rng.integers(0, 255, (40, 50), dtype=np.uint8))
    zarr.save_array(str(tmp_path / "vol.zarr"), rng.integers(0, 255, (8, 40, 50), dtype=np.uint8))
    pipe = tmp_path / "p.yaml"
    pipe.write_text("version: 1\ninput: {path: ['flat.zarr', 'vol.zarr']}\ntiling: {chunks: [16, 16]}\n"
                    "method: {otsu: {}}\noutput: {path: 'out/{stem}.zarr'}\n")
    res = invoke("plan", str(pipe), "--json")
    assert res.exit_code == 1
    flat, vol = json.loads(res.output)
    assert "error" not in flat and flat["chunks"] == [16, 16]
    assert "tiling.chunks: [16, 16] has 2 entries but the image has 3 spatial axes" in vol["error"]
    assert "chunks" not in vol
    table = invoke("plan", str(pipe))  # the table: the error below it, its columns as wide as the rows
    lines = table.output.splitlines()
    assert table.exit_code == 1 and lines[-1].startswith("item 1 (") and vol["error"] in lines[-1]
    assert max(len(line) for line in lines[:-1]) < len(lines[-1])
    run = invoke("run", str(pipe), "--quiet")  # run fails the same item with the same message
    assert run.exit_code == 1
    assert "tiling.chunks: [16, 16] has 2 entries but the image has 3 spatial axes" in run.output


@pytest.mark.parametrize("case", ["collision", "self"])
def test_plan_refuses_outputs_that_run_refuses(tmp_path, case):
    """Two items writing one output, or an output replacing its input: plan exits 2 with run's message."""
    import numpy as np

    data = np.random.default_rng(1).integers(0, 255, (40, 50), dtype=np.uint8)
    zarr.save_array(str(tmp_path / "a.zarr"), data)
    if case == "collision":
        zarr.save_array(str(tmp_path / "sub" / "a.zarr"), data)
        inputs, out, expect = "['a.zarr', 'sub/a.zarr']", "out/{stem}_seg.zarr", "both write to"
    else:
        inputs, out, expect = "a.zarr", "{stem}.zarr", "is the input"
    pipe = tmp_path / "p.yaml"
    pipe.write_text(f"version: 1\ninput: {{path: {inputs}}}\nmethod: {{otsu: {{}}}}\n"
                    f"output: {{path: '{out}', overwrite: true}}\n")
    run = invoke("run", str(pipe), "--quiet")
    plan = invoke("plan", str(pipe))
    assert run.exit_code == 2 and expect in run.output
    assert plan.exit_code == 2 and expect in plan.output
    assert plan.output == run.output
