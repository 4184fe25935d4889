"""Archive runs with real processes: `tileseg run` stopped by SIGTERM, two runs into one folder at once,
a `dask scheduler` + `dask worker` cluster on 127.0.0.1 that loses a worker mid-run, and a user's Client.

Items are small zarr stores thresholded by the ``slow_threshold`` plugin
(tests/archive_helpers.py), installed by entry point for the child processes;
its blocks sleep so runs last long enough to be interrupted, and it logs
each processed item so processing counts are exact across processes.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

sys.path.insert(0, str(Path(__file__).parent))
from archive_helpers import (  # noqa: E402
    CliCluster,
    env_with,
    install_plugin,
    processed_counts,
    tileseg_cli,
    wait_for,
    write_items,
    write_method_pipeline,
)

pytestmark = pytest.mark.slow


def out_of(path) -> np.ndarray:
    return zarr.open_group(str(path), mode="r")["0"][...]


def partial_chunks(folder: Path) -> int:
    """Chunk files written so far into hidden partial outputs under ``folder``."""
    if not folder.exists():
        return 0
    return sum(1 for d in folder.iterdir() if ".partial-" in d.name
               for p in d.rglob("*") if p.is_file() and p.parent.name.isdigit())


def test_sigterm_stops_cleanly_and_the_rerun_finishes(tmp_path):
    env = env_with(install_plugin(tmp_path / "plug"))
    images = write_items(tmp_path / "in", 1, shape=(64, 64))
    log = tmp_path / "calls.log"
    pipe = write_method_pipeline(tmp_path / "p.yaml", "in/*.zarr", delay=0.4, log=log,
                                 execution="{scheduler: threads, workers: 1}")
    proc = tileseg_cli("run", str(pipe), "--quiet", env=env)
    try:
        wait_for(lambda: partial_chunks(tmp_path / "out") >= 2, 120, "the first chunks")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "interrupted (SIGTERM)" in out and "run the same command again" in out
    final = tmp_path / "out" / "item_00.zarr"
    assert not final.exists()  # no final-named partial output
    assert partial_chunks(tmp_path / "out") < 16
    with sqlite3.connect(tmp_path / "out" / "tileseg-run.sqlite") as db:
        status, error, owner = db.execute("SELECT status, error, owner FROM items").fetchone()
    assert status == "pending" and "SIGTERM" in error and owner is None
    report = json.loads((tmp_path / "out" / "tileseg-report.json").read_text())
    assert report["interrupted"] and report["items"][0]["status"] == "interrupted"
    rerun = tileseg_cli("run", str(pipe), "--quiet", env=env)
    out, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, out
    np.testing.assert_array_equal(out_of(final), images["item_00"] > 0.5)


def test_two_runs_at_once_process_every_item_exactly_once(tmp_path):
    env = env_with(install_plugin(tmp_path / "plug"))
    images = write_items(tmp_path / "in", 8)
    log = tmp_path / "calls.log"
    pipe = write_method_pipeline(tmp_path / "p.yaml", "in/*.zarr", delay=0.1, log=log,
                                 execution="{scheduler: threads, workers: 1, max_items_in_flight: 2}")
    procs = [tileseg_cli("run", str(pipe), "--quiet", env=env) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    counts = processed_counts(log)
    assert counts == {10.0 + i: 1 for i in range(8)}  # every item processed once, by one of the two runs
    with sqlite3.connect(tmp_path / "out" / "tileseg-run.sqlite") as db:
        rows = db.execute("SELECT status, attempts, owner FROM items").fetchall()
    assert len(rows) == 8 and set(rows) == {("done", 1, None)}
    runs = [json.loads(p.read_text()) for p in sorted((tmp_path / "out" / "tileseg-runs").glob("*.json"))]
    done = [r["summary"]["ok"] for r in runs]
    assert len(runs) == 2 and sum(done) == 8 and min(done) > 0, done  # both worked, on different items
    for name, image in images.items():
        np.testing.assert_array_equal(out_of(tmp_path / "out" / f"{name}.zarr"), image > 0.5)


def test_worker_killed_mid_run_gives_the_same_bytes(tmp_path):
    pytest.importorskip("distributed")
    env = env_with(install_plugin(tmp_path / "plug"))
    images = write_items(tmp_path / "in", 2, shape=(96, 96))
    clean = write_method_pipeline(tmp_path / "clean.yaml", "in/*.zarr", output="clean/{stem}.zarr",
                                  execution="{scheduler: synchronous}")
    res = tileseg_cli("run", str(clean), "--quiet", env=env)
    assert res.wait(timeout=300) == 0, res.stdout.read()
    pipe = write_method_pipeline(tmp_path / "p.yaml", "in/*.zarr", delay=0.15, output="out/{stem}.zarr",
                                 execution="{retries: 1}")
    with CliCluster(tmp_path / "cluster", 2, env) as cluster:
        proc = tileseg_cli("run", str(pipe), "--quiet", "--scheduler", cluster.address, env=env)
        try:
            wait_for(lambda: partial_chunks(tmp_path / "out") >= 6, 180, "chunks written on the cluster")
            assert proc.poll() is None  # killed mid-run, not after
            cluster.kill_worker("w1")
            out, _ = proc.communicate(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, out
        from distributed import Client

        with Client(cluster.address, timeout="20s") as client:
            assert [w["name"] for w in client.scheduler_info()["workers"].values()] == ["w0"]
    for name, image in images.items():
        got = out_of(tmp_path / "out" / f"{name}.zarr")
        ref = out_of(tmp_path / "clean" / f"{name}.zarr")
        assert got.tobytes() == ref.tobytes()  # bit-identical to the clean run
        np.testing.assert_array_equal(got, image > 0.5)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    pytest.importorskip("distributed")
    root = tmp_path_factory.mktemp("user-cluster")
    env = env_with(install_plugin(root / "plug"))
    with CliCluster(root / "cluster", 2, env) as c:
        c.plugin = root / "plug"
        yield c


def _worker_addresses(client) -> set[str]:
    return set(client.scheduler_info()["workers"])


def test_run_inside_a_users_client_computes_on_that_cluster(tmp_path, cluster, monkeypatch):
    from distributed import Client, get_task_stream

    from tileseg import registry
    from tileseg.runner import run_pipeline

    monkeypatch.syspath_prepend(str(cluster.plugin))
    import tileseg_testplug

    monkeypatch.setitem(registry._EXTRA["methods"], "slow_threshold", tileseg_testplug.slow_threshold)
    images = write_items(tmp_path / "in", 2)
    pipe = write_method_pipeline(tmp_path / "p.yaml", "in/*.zarr", execution="{workers: 2}")  # no scheduler named
    with Client(cluster.address, timeout="20s") as client:
        with get_task_stream(client) as ts:
            report = run_pipeline(pipe)
        assert report.ok, [i.error for i in report.items]
        assert report.scheduler["scheduler"] == "client"
        assert client.status == "running"  # the user's client is left open
        ran_on = {t["worker"] for t in ts.data}
        assert ran_on and ran_on <= _worker_addresses(client)
        names = {t["key"][0] if isinstance(t["key"], tuple) else t["key"] for t in ts.data}
        assert any(str(n).startswith("tileseg-store-") for n in names), names  # the chunk writes ran there
        # the pipeline naming a scheduler wins over the client: nothing more reaches the cluster
        # (another threshold, so its tasks have keys of their own: distributed 2024.8 can still report the
        # first run's last task-finished events inside the next task-stream window)
        local = write_method_pipeline(tmp_path / "q.yaml", "in/*.zarr", output="local/{stem}.zarr", value=0.25,
                                      execution="{scheduler: threads, workers: 1}")
        first = {str(t["key"]) for t in ts.data}
        with get_task_stream(client) as ts2:
            assert run_pipeline(local).ok
        assert [t["key"] for t in ts2.data if str(t["key"]) not in first] == []
    for name, image in images.items():
        np.testing.assert_array_equal(out_of(tmp_path / "out" / f"{name}.zarr"), image > 0.5)
        np.testing.assert_array_equal(out_of(tmp_path / "local" / f"{name}.zarr"), image > 0.25)


def test_segment_compute_inside_a_users_client_runs_on_the_cluster(tmp_path, cluster):
    pytest.importorskip("torch")
    from distributed import Client, get_task_stream
    from pipeline_helpers import (
        argmax_labels,
        assert_labels_match,
        monai_logits,
        save_conv_model,
        write_scene,
    )

    import tileseg

    save_conv_model(tmp_path / "m.pt")
    image, _ = write_scene(tmp_path / "s.zarr", shape=(70, 90), seed=3)
    with Client(cluster.address, timeout="20s") as client:
        img = tileseg.open(str(tmp_path / "s.zarr"), array="image")
        with get_task_stream(client) as ts:
            labels = tileseg.segment(img, {"torchscript": {"path": str(tmp_path / "m.pt")}}, patch_size=(24, 24),
                                     chunks=40).data.compute()
        ran_on = {t["worker"] for t in ts.data}
        assert ran_on and ran_on <= _worker_addresses(client)
    assert_labels_match(labels[0] if labels.ndim == 3 else labels, *argmax_labels(monai_logits(image, (24, 24), 0.25)))
