"""Archive runs in one process: changed inputs, failed items and --retry-failed, items in flight,
outputs that never touch inputs, a model that fails to load, full disks and unwritable folders.

The method is a block-wise threshold (registered for the test), so every
output equals ``image > value`` computed with NumPy; a counter records which
items were processed (the method is called once per processed item).
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from tileseg import registry
from tileseg.cli import main
from tileseg.errors import ConfigError, OutputError
from tileseg.runner import run_pipeline

sys.path.insert(0, str(Path(__file__).parent))
from archive_helpers import write_items, write_method_pipeline  # noqa: E402


@pytest.fixture
def method(monkeypatch):
    """Registers ``slow_threshold``; returns the list of first pixels of the items it processed."""
    calls: list[float] = []
    barrier: dict[str, threading.Barrier] = {}

    def slow_threshold(data, *, spacing=None, value=0.5, delay=0.0, log=""):
        calls.append(float(data[0, 0].compute()))
        # items in flight meet here: fails (BrokenBarrierError) unless they overlap; the run's first call
        # is the warm-up item, which runs alone (runner._warm_up)
        if "b" in barrier and len(calls) > 1:
            barrier["b"].wait(timeout=20)
        return (data > value).astype(np.uint8)

    monkeypatch.setitem(registry._EXTRA["methods"], "slow_threshold", slow_threshold)
    slow_threshold.calls, slow_threshold.barrier = calls, barrier
    return slow_threshold


def out_of(path) -> np.ndarray:
    return zarr.open_group(str(path), mode="r")["0"][...]


def invoke(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_input_changed_in_place_is_recomputed(tmp_path, method):
    images = write_items(tmp_path / "in", 3)
    pipe = write_method_pipeline(tmp_path / "p.yaml", "in/*.zarr")
    assert [i.status for i in run_pipeline(pipe).items] == ["ok"] * 3
    # new pixels in one chunk of item_01, same shape and dtype
    arr = zarr.open_group(str(tmp_path / "in" / "item_01.zarr"), mode="r+")["image"]
    arr[16:32, 16:32] = 1 - arr[16:32, 16:32]
    new = arr[...]
    method.calls.clear()
    report = run_pipeline(pipe)
    assert [i.status for i in report.items] == ["skipped", "ok", "skipped"]
    assert method.calls == [11.0]  # only item_01 processed
    np.testing.assert_array_equal(out_of(tmp_path / "out" / "item_01.zarr"), (new > 0.5).astype(np.uint8))
    np.testing.assert_array_equal(out_of(tmp_path / "out" / "item_00.zarr"), images["item_00"] > 0.5)
    assert report.items[0].skipped_reason.startswith("complete")


def test_twenty_items_three_corrupt_then_retry_failed(tmp_path, method):
    images = write_items(tmp_path / "in", 20)
    (tmp_path / "in" / "item_03.zarr" / "image" / "zarr.json").write_text("{not json")  # corrupt metadata
    (tmp_path / "in" / "item_09.zarr" / "zarr.json").unlink()  # not a zarr store any more
    (tmp_path / "in" / "item_09.zarr" / "image" / "zarr.json").unlink()
    chunk = tmp_path / "in" / "item_14.zarr" / "image" / "c" / "1" / "2"
    assert chunk.is_file()
    chunk.write_bytes(b"garbage" * 20)  # a corrupt region: fails while computing
    pipe = write_method_pipeline(tmp_path / "p.yaml", "in/*.zarr",
                                 execution="{scheduler: threads, workers: 2, max_items_in_flight: 4}")
    res = invoke("run", str(pipe), "--quiet")
    assert res.exit_code == 1
    assert "17 ok, 0 skipped (already complete), 3 failed" in res.output
    report = json.loads((tmp_path / "out" / "tileseg-report.json").read_text())
    by = {Path(i["input"]).name: i for i in report["items"]}
    failed = sorted(n for n, i in by.items() if i["status"] == "failed")
    assert failed == ["item_03.zarr", "item_09.zarr", "item_14.zarr"]
    assert "item_03.zarr" in by["item_03.zarr"]["error"] and "JSON" in by["item_03.zarr"]["error"]
    assert "item_09.zarr" in by["item_09.zarr"]["error"] and "no zarr metadata" in by["item_09.zarr"]["error"]
    err = by["item_14.zarr"]["error"]  # names the file and the region (chunk 1, 2 of 16 x 16)
    assert "item_14.zarr" in err and "cannot read chunk region" in err and "slice(16, 32" in err
    assert "slice(32, 48" in err
    for name, image in images.items():
        if f"{name}.zarr" not in failed:
            np.testing.assert_array_equal(out_of(tmp_path / "out" / f"{name}.zarr"), image > 0.5)
    assert not (tmp_path / "out" / "item_14.zarr").exists()
    assert sorted(method.calls) == sorted(10.0 + i for i in range(20) if i not in (3, 9))  # opened ones
    # a plain rerun: nothing changed, nothing runs; the failures are reported again (exit 1)
    method.calls.clear()
    res = invoke("run", str(pipe), "--quiet")
    assert res.exit_code == 1 and "0 ok, 17 skipped" in res.output and "--retry-failed" in res.output
    assert method.calls == []
    # fix item_14: --retry-failed processes it; the two still broken fail again at opening; the 17 stay
    g = zarr.open_group(str(tmp_path / "in" / "item_14.zarr"), mode="r+")
    g["image"][...] = images["item_14"]
    stamp = os.stat(tmp_path / "out" / "item_00.zarr" / "zarr.json").st_mtime_ns
    res = invoke("run", str(pipe), "--quiet", "--retry-failed")
    assert res.exit_code == 1 and "1 ok, 17 skipped (already complete), 2 failed" in res.output
    assert method.calls == [24.0]  # only item_14 was processed
    np.testing.assert_array_equal(out_of(tmp_path / "out" / "item_14.zarr"), images["item_14"] > 0.5)
    assert os.stat(tmp_path / "out" / "item_00.zarr" / "zarr.json").st_mtime_ns == stamp
    with sqlite3.connect(tmp_path / "out" / "tileseg-run.sqlite") as db:
        rows = dict(db.execute("SELECT input, status FROM items").fetchall())
    assert sorted(Path(k).name for k, v in rows.items() if v == "failed") == ["item_03.zarr", "item_09.zarr"]
    assert sum(v == "done" for v in rows.values()) == 18


def test_failed_item_stays_failed_when_only_the_input_list_changes(tmp_path, method):
    """Which other inputs a run lists is not part of an item: a narrower glob does not retry a failed one."""
    images = write_items(tmp_path / "in", 3)
    (tmp_path / "in" / "item_01.zarr" / "image" / "c" / "1" / "2").write_bytes(b"garbage" * 20)
    pipe = write_method_pipeline(tmp_path / "p.yaml", "in/*.zarr")
    assert invoke("run", str(pipe), "--quiet").exit_code == 1
    method.calls.clear()
    res = invoke("run", str(pipe), "--quiet", "--set", "input.path=in/item_0[01].zarr")
    assert res.exit_code == 1 and "0 ok, 1 skipped (already complete), 1 failed" in res.output
    assert method.calls == []  # neither opened nor computed
    report = json.loads((tmp_path / "out" / "tileseg-report.json").read_text())
    failed = [i for i in report["items"] if i["status"] == "failed"]
    assert len(failed) == 1 and "recorded by an earlier run" in failed[0]["error"]
    # a changed pipeline setting (not the list of inputs) does retry it
    res = invoke("run", str(pipe), "--quiet", "--set", "input.path=in/item_0[01].zarr", "--set",
                 "method.slow_threshold.value=0.25")
    assert res.exit_code == 1 and sorted(method.calls) == [10.0, 11.0]
    np.testing.assert_array_equal(out_of(tmp_path / "out" / "item_00.zarr"), images["item_00"] > 0.25)


def test_items_in_flight_overlap_and_one_failure_stops_nothing(tmp_path, method):
    images = write_items(tmp_path / "in", 5)
    (tmp_path / "in" / "item_02.zarr" / "image" / "zarr.json").write_text("[1")
    method.barrier["b"] = threading.Barrier(3)  # after the warm-up item, three items must be in flight at once
    pipe = write_method_pipeline(tmp_path / "p.yaml", "in/*.zarr",
                                 execution="{scheduler: threads, workers: 2, max_items_in_flight: 4}")
    report = run_pipeline(pipe)
    assert [i.status for i in report.items] == ["ok", "ok", "failed", "ok", "ok"], [i.error for i in report.items]
    for name in ("item_00", "item_01", "item_03", "item_04"):
        np.testing.assert_array_equal(out_of(tmp_path / "out" / f"{name}.zarr"), images[name] > 0.5)
    method.barrier["b"] = threading.Barrier(2)
    pipe = write_method_pipeline(tmp_path / "p.yaml", "in/*.zarr", output="out2/{stem}.zarr",
                                 execution="{scheduler: threads, workers: 2, max_items_in_flight: 1}")
    report = run_pipeline(pipe)  # one at a time: the barrier cannot be met
    assert {i.status for i in report.items} == {"failed"} and "BrokenBarrierError" in report.items[0].error


def test_outputs_never_replace_inputs(tmp_path, method):
    write_items(tmp_path / "in", 2)

    def snapshot():
        return {str(p): p.read_bytes() for p in (tmp_path / "in").rglob("*") if p.is_file()}

    before = snapshot()
    for output, inputs in (("in/{name}", "in/*.zarr"), ("in/{name}/seg", "in/*.zarr"), ("in", "in/item_00.zarr")):
        text = write_method_pipeline(tmp_path / "p.yaml", inputs, output=output).read_text()
        (tmp_path / "p.yaml").write_text(text.replace("options:", "overwrite: true, options:"))
        with pytest.raises(ConfigError, match=r"output.path: the output .* (is|lies inside|contains) the input"):
            run_pipeline(tmp_path / "p.yaml")
    assert snapshot() == before
    assert not (tmp_path / "in" / "tileseg-run.sqlite").exists() and not (tmp_path / "out").exists()


def test_an_input_named_dotdot_cannot_write_outside(tmp_path, method):
    g = zarr.open_group(str(tmp_path / "data"), mode="w")
    g.create_array("image", shape=(32, 32), chunks=(16, 16), dtype="float32")[:] = 1
    (tmp_path / "data" / "sub").mkdir()
    write_items(tmp_path / "in", 1)
    pipe = write_method_pipeline(tmp_path / "p.yaml", "x", output="out/{stem}/seg.zarr")
    text = pipe.read_text().replace('"x"', f'["file://{tmp_path}/data/sub/..", "in/item_00.zarr"]')
    pipe.write_text(text)
    before = sorted(str(p) for p in tmp_path.rglob("*") if "out" not in p.relative_to(tmp_path).parts)
    report = run_pipeline(pipe)
    bad, good = report.items
    assert bad.status == "failed" and "data/sub/..: the input's stem '.' cannot name an output" in bad.error
    assert "{index}" in bad.error
    assert good.status == "ok"
    after = sorted(str(p) for p in tmp_path.rglob("*") if "out" not in p.relative_to(tmp_path).parts)
    assert after == before  # nothing written outside out/
    assert not (tmp_path / "seg.zarr").exists()


def test_model_that_fails_to_load_exits_1_with_a_report(tmp_path):
    pytest.importorskip("torch")
    sys.path.insert(0, str(Path(__file__).parent))
    from pipeline_helpers import save_conv_model, write_pipeline, write_scene

    write_scene(tmp_path / "a.zarr", seed=1)
    write_scene(tmp_path / "b.zarr", seed=2)
    (tmp_path / "bad.pt").write_bytes(b"PK\x03\x04 not a TorchScript archive")
    pipe = write_pipeline(tmp_path / "p.yaml", "*.zarr", model="bad.pt")
    res = invoke("run", str(pipe), "--quiet")
    assert res.exit_code == 1
    assert "error: the model failed to load" in res.output and "bad.pt" in res.output
    report = json.loads((tmp_path / "out" / "tileseg-report.json").read_text())
    assert "the model failed to load" in report["error"] and "bad.pt" in report["error"]
    assert [i["status"] for i in report["items"]] == ["failed", "failed"]
    assert all(i["error"].startswith("not run: the model failed to load") for i in report["items"])
    assert not (tmp_path / "out" / "a_seg.zarr").exists()
    # the items were not at fault: a good model runs them without --retry-failed
    save_conv_model(tmp_path / "bad.pt")
    res = invoke("run", str(pipe), "--quiet")
    assert res.exit_code == 0 and "2 ok" in res.output


def test_full_disk_and_unwritable_folder_fail_before_work(tmp_path, method, monkeypatch):
    from collections import namedtuple

    from tileseg import outputs

    write_items(tmp_path / "in", 2)
    pipe = write_method_pipeline(tmp_path / "p.yaml", "in/*.zarr")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda p: usage(2**30, 2**30, 1000))
    report = run_pipeline(pipe)
    assert {i.status for i in report.items} == {"failed"}
    assert "not enough free space" in report.items[0].error and "check_free_space" in report.items[0].error
    assert [n for n in os.listdir(tmp_path / "out") if ".zarr" in n] == []  # no output, no partial folder
    monkeypatch.undo()
    monkeypatch.setitem(registry._EXTRA["methods"], "slow_threshold", method)
    (tmp_path / "blocked").write_text("a file where the output folder should be")
    pipe = write_method_pipeline(tmp_path / "p.yaml", "in/*.zarr", output="blocked/{stem}.zarr")
    method.calls.clear()
    with pytest.raises(OutputError, match="blocked.* is not writable"):
        run_pipeline(pipe)
    assert method.calls == []
    res = invoke("run", str(pipe), "--quiet")
    assert res.exit_code == 1 and "is not writable" in res.output


def test_stale_partials_of_killed_runs_are_removed_when_claimed(tmp_path, method):
    images = write_items(tmp_path / "in", 1)
    out = tmp_path / "out"
    out.mkdir()
    stale = [out / ".item_00.zarr.partial-0123456789ab", out / ".item_00.zarr.old-fedcba987654"]
    keyed = out / f".item_00.zarr.partial-{'a' * 32}"  # named by a resume key: the writer's to reuse or remove
    for p in [*stale, keyed]:
        (p / "c").mkdir(parents=True)
    other = out / ".item_99.zarr.partial-0123456789ab"  # another item's: not ours to touch
    other.mkdir()
    pipe = write_method_pipeline(tmp_path / "p.yaml", "in/*.zarr")
    assert run_pipeline(pipe).ok
    assert not any(p.exists() for p in stale) and other.exists()
    np.testing.assert_array_equal(out_of(out / "item_00.zarr"), images["item_00"] > 0.5)
    from tileseg.writers.base import stale_siblings

    assert keyed not in map(Path, stale_siblings(str(out / "item_00.zarr")))


def test_a_manifest_inside_an_input_is_refused(tmp_path, method):
    """``execution.manifest`` gets the outputs' rule: never written into what the run reads (it would also
    change the input's fingerprint, so every rerun recomputed the item)."""
    write_items(tmp_path / "in", 1)
    pipe = write_method_pipeline(tmp_path / "p.yaml", "in/*.zarr",
                                 execution='{scheduler: threads, manifest: "in/item_00.zarr/run.sqlite"}')
    with pytest.raises(ConfigError, match=r"execution.manifest: the run manifest .* lies inside the input"):
        run_pipeline(pipe)
    assert not (tmp_path / "in" / "item_00.zarr" / "run.sqlite").exists()
