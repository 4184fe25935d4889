"""Inference placed on the workers that offer its resources, on a real multi-process cluster.

The cluster has two worker processes that differ: ``gpu`` declares a fake
``GPU`` resource, ``cpu`` declares none. Every forward records the worker
that ran it (:mod:`tileseg.testing.placement`).
"""

from __future__ import annotations

import os

import dask
import numpy as np
import pytest

import tileseg
from tileseg import placement
from tileseg.errors import PlacementError
from tileseg.testing import blobs_2d
from tileseg.testing.placement import RecordingModel, RecordingPredictor, forward_workers

distributed = pytest.importorskip("distributed")

SHAPE, INPUT_CHUNKS, PATCH, CHUNKS = (96, 128), (48, 64), (24, 24), (32, 32)
GPU = {"GPU": 1}


@pytest.fixture(scope="module")
def cluster():
    """Two worker processes: one offers a fake GPU, one does not."""
    from distributed import Nanny, Scheduler, SpecCluster

    workers = {
        "gpu": {"cls": Nanny, "options": {"nthreads": 2, "resources": {"GPU": 1}, "dashboard_address": None}},
        "cpu": {"cls": Nanny, "options": {"nthreads": 2, "dashboard_address": None}},
    }
    with SpecCluster(workers=workers, scheduler={"cls": Scheduler, "options": {"dashboard_address": None}}) as c:
        with distributed.Client(c, set_as_default=False) as client:
            client.wait_for_workers(2)
            addr = {info["name"]: a for a, info in client.scheduler_info(n_workers=-1)["workers"].items()}
        yield c, addr


@pytest.fixture()
def scene(tmp_path):
    import zarr

    image, _ = blobs_2d(SHAPE, 3, dtype=np.float32, radius=(3.0, 9.0), coverage=0.3)
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="w")
    group.create_array("image", shape=SHAPE, chunks=INPUT_CHUNKS, dtype="float32")[:] = image
    return tmp_path, image


def _segment(image, log_dir, resources=None):
    return tileseg.segment(image, RecordingPredictor(log_dir), patch_size=PATCH, chunks=CHUNKS, overlap=0.25,
                           resources=resources, output="logits")


def _threaded(image, log_dir):
    with dask.config.set(scheduler="threads"):
        return _segment(image, log_dir).data.compute()


def _split(stream):
    """Workers of the inference tasks and of all other tasks, from a task stream."""
    infer, other = set(), set()
    for t in stream:
        (infer if "tileseg-predict" in str(t["key"]) else other).add(t["worker"])
    return infer, other


@pytest.mark.parametrize("how", ["compute", "dask.compute", "write", "client-after-segment-write"])
def test_inference_only_on_the_gpu_worker_on_a_users_client(cluster, scene, tmp_path, how):
    c, addr = cluster
    root, _ = scene
    logs = tmp_path / "forwards"
    logs.mkdir()
    image = tileseg.open(str(root / "s.zarr"), array="image")
    assert max(image.data.chunks[-1]) > CHUNKS[-1]  # shared input blocks: reading tasks free to go anywhere
    expected = _threaded(image, tmp_path)
    for f in os.listdir(tmp_path):
        if f.endswith(".txt"):
            os.remove(tmp_path / f)
    early = _segment(image, logs, GPU) if how == "client-after-segment-write" else None
    with distributed.Client(c) as client:  # the user's default client; graph optimisation left on
        result = early if early is not None else _segment(image, logs, GPU)
        with distributed.get_task_stream(client) as ts:
            if how == "compute":
                got = result.data.compute()
            elif how == "dask.compute":
                (got,) = dask.compute(result.data)
            else:  # tileseg.write places the inference of the segmentation it computes
                job = tileseg.write(result, tmp_path / "out.zarr")
                got = tileseg.open(job.handle.path).data.compute()
    seen = forward_workers(logs)
    assert seen and set(seen) == {addr["gpu"]}  # every forward on the GPU worker
    infer, other = _split(ts.data)
    assert infer == {addr["gpu"]}
    assert other == {addr["gpu"], addr["cpu"]}  # reading/stitching/writing ran on both
    np.testing.assert_array_equal(np.asarray(got), expected)


def _pipeline(root, model: str, scheduler: str, resources: str = "{GPU: 1}") -> str:
    path = root / "p.yaml"
    path.write_text(
        "version: 1\n"
        "input: {path: s.zarr, array: image}\n"
        f"tiling: {{patch_size: {list(PATCH)}, overlap: 0.25, chunks: {list(CHUNKS)}}}\n"
        f"model: {{{model}, output: logits}}\n"
        "output: {path: 'out/{stem}.zarr'}\n"
        f"execution: {{scheduler: '{scheduler}', resources: {resources}}}\n")
    return str(path)


def test_tileseg_run_places_inference_on_the_gpu_worker(cluster, scene, monkeypatch):
    from tileseg import registry

    c, addr = cluster
    root, _ = scene
    monkeypatch.setitem(registry._EXTRA["models"], "recording", RecordingModel)
    logs = root / "forwards"
    logs.mkdir()
    image = tileseg.open(str(root / "s.zarr"), array="image")
    expected = _threaded(image, root)
    with distributed.Client(c) as watcher:
        start = __import__("time").time()
        report = tileseg.run(_pipeline(root, f"recording: {{log_dir: '{logs}'}}", c.scheduler_address))
        stream = watcher.get_task_stream(start=start)
    assert report.ok, report.items[0].error
    assert set(forward_workers(logs)) == {addr["gpu"]}
    infer, other = _split(stream)
    assert infer == {addr["gpu"]} and other == {addr["gpu"], addr["cpu"]}
    got = tileseg.open(report.items[0].output).data.compute()
    np.testing.assert_array_equal(np.asarray(got), expected)


def test_model_loaded_once_per_worker_process(cluster, scene, tmp_path):
    torch = pytest.importorskip("torch")
    c, addr = cluster
    root, _ = scene
    conv = torch.nn.Conv2d(1, 2, 3, padding=1)
    torch.jit.save(torch.jit.script(conv), str(root / "m.pt"))
    report = tileseg.run(_pipeline(root, "torchscript: {path: m.pt}", c.scheduler_address))
    assert report.ok, report.items[0].error
    loads = report.model_loads
    # the inference worker loaded it once for its 2 threads and many tasks; the other never
    assert loads[addr["gpu"]] == 1 and loads[addr["cpu"]] == 0, loads
    with dask.config.set(scheduler="threads"):
        expected = tileseg.segment(tileseg.open(str(root / "s.zarr"), array="image"), str(root / "m.pt"),
                                   patch_size=PATCH, chunks=CHUNKS, output="logits", device="cpu").data.compute()
    got = tileseg.open(report.items[0].output).data.compute()
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- no worker offers it


@pytest.fixture(scope="module")
def cpu_only():
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tcp://",
                                  dashboard_address=None) as c:
        yield c


def test_segment_fails_early_without_a_gpu_worker(cpu_only, scene, tmp_path):
    root, _ = scene
    image = tileseg.open(str(root / "s.zarr"), array="image")
    with distributed.Client(cpu_only):
        with pytest.raises(PlacementError, match=r"needs \{'GPU': 1\} but no worker .* offers it"):
            _segment(image, tmp_path, GPU)


def test_run_fails_early_without_a_gpu_worker(cpu_only, scene, monkeypatch):
    from click.testing import CliRunner

    from tileseg import registry
    from tileseg.cli import main

    root, _ = scene
    monkeypatch.setitem(registry._EXTRA["models"], "recording", RecordingModel)
    pipe = _pipeline(root, f"recording: {{log_dir: '{root}'}}", cpu_only.scheduler_address)
    with pytest.raises(PlacementError, match=rf"no worker of the cluster at {cpu_only.scheduler_address}"):
        tileseg.run(pipe)
    res = CliRunner().invoke(main, ["run", pipe, "--quiet"])  # `tileseg run`: an error message, no traceback
    assert res.exit_code != 0
    assert res.output.startswith("error: model inference needs {'GPU': 1.0} but no worker")
    assert "Traceback" not in res.output
    assert not (root / "out" / "s.zarr").exists()


def test_inference_fails_when_the_gpu_worker_leaves(tmp_path):
    """Inference waiting for a resource no worker offers any more fails with a PlacementError (user's client)."""
    from distributed import Scheduler, SpecCluster, Worker

    quiet = {"nthreads": 1, "dashboard_address": None}
    workers = {"gpu": {"cls": Worker, "options": {**quiet, "resources": {"GPU": 1}}},
               "cpu": {"cls": Worker, "options": quiet}}
    x = np.random.default_rng(0).random((64, 64), dtype=np.float32)
    with SpecCluster(workers=workers, scheduler={"cls": Scheduler, "options": {"dashboard_address": None}}) as c:
        with distributed.Client(c) as client:
            client.wait_for_workers(2)
            placement.install(client, grace_s=0.5)
            result = _segment(x, tmp_path, GPU)  # a GPU worker is there: accepted
            gpu = [a for a, w in client.scheduler_info(n_workers=-1)["workers"].items() if w["resources"]]
            client.retire_workers(gpu, close_workers=True)
            client.wait_for_workers(1)
            with pytest.raises(PlacementError, match=r"needs \{'GPU': 1.0\} but no worker of the cluster offers "
                                                     r"it any more"):
                result.data.compute()


# --------------------------------------------------------------------------- pieces


def test_resources_found_in_a_segmentation_graph(tmp_path):
    x = np.random.default_rng(0).random((40, 50), dtype=np.float32)
    result = tileseg.segment(x, RecordingPredictor(tmp_path), patch_size=(16, 16), resources={"GPU": 2})
    assert placement.resources_in(result.data) == {"GPU": 2.0}
    assert placement.resources_in((result.data + 1).astype("f4")) == {"GPU": 2.0}  # further graph on top
    plain = tileseg.segment(x, RecordingPredictor(tmp_path), patch_size=(16, 16))
    assert placement.resources_in(plain.data) is None


def test_model_key_carries_the_resources():
    key = placement.model_key("t", {"GPU": 1, "MEM": 2e9})
    assert key == ("tileseg-model-t", "GPU", 1.0, "MEM", 2e9)
    assert placement.key_resources(key) == {"GPU": 1.0, "MEM": 2e9}
    assert placement.key_resources(placement.model_key("t", None)) is None
    assert placement.key_resources(("tileseg-final-t", 0, 1)) is None
    assert placement.task_resources([("x", 0), key]) == {"GPU": 1.0, "MEM": 2e9}
    assert placement.task_resources([("x", 0)]) is None


def test_inference_tasks_depend_on_the_model_key_after_optimisation(tmp_path):
    """Fusion may rename or merge tasks; each one holding a forward still depends on the model key."""
    from dask.core import get_dependencies

    x = np.random.default_rng(0).random((40, 50), dtype=np.float32)
    result = tileseg.segment(x, RecordingPredictor(tmp_path), patch_size=(16, 16), chunks=(20, 50), resources=GPU)
    (opt,) = dask.optimize(result.data)
    dsk = dict(opt.__dask_graph__())
    with_model = {k for k in dsk if placement.task_resources(get_dependencies(dsk, k)) == {"GPU": 1.0}}
    holding = {k for k, v in dsk.items() if "predict_owner" in repr(v)}
    assert holding and holding <= with_model
    assert len(with_model) < len(dsk) // 2  # the rest stays free


def test_offering_workers():
    workers = {"tcp://a": {"resources": {"GPU": 2}}, "tcp://b": {"resources": {"GPU": 0.5}}, "tcp://c": {}}
    assert placement.offering_workers(workers, {"GPU": 1}) == ["tcp://a"]
    assert placement.offering_workers(workers, {"GPU": 0.5}) == ["tcp://a", "tcp://b"]
    assert placement.offering_workers(workers, {"TPU": 1}) == []


def test_visible_devices_and_worker_specs():
    assert placement.visible_devices(3, {}) == ["0", "1", "2"]
    assert placement.visible_devices(2, {"CUDA_VISIBLE_DEVICES": "4, 6,7"}) == ["4", "6"]
    specs = placement.gpu_worker_specs(["4", "6"], 2, {"MEM": 1})
    assert {n: s["options"]["env"]["CUDA_VISIBLE_DEVICES"] for n, s in specs.items()} == {"gpu-4": "4", "gpu-6": "6"}
    assert all(s["options"]["resources"] == {"MEM": 1.0, "GPU": 1.0} and s["options"]["nthreads"] == 2
               for s in specs.values())


def test_local_scheduler_starts_one_pinned_worker_per_gpu(monkeypatch):
    """Two (faked) GPUs: two worker processes, each seeing only its own device and declaring GPU: 1."""
    from tileseg import execution

    monkeypatch.setattr(placement, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with execution.scheduler_context({"scheduler": "local", "resources": GPU, "workers": 5}) as info:
        seen = info.client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
        res = {a: w["resources"] for a, w in info.client.scheduler_info(n_workers=-1)["workers"].items()}
    assert sorted(seen.values()) == ["0", "1"]
    assert all(r == {"GPU": 1.0} for r in res.values()) and set(res) == set(seen)


def test_local_scheduler_without_gpus_keeps_a_local_cluster(monkeypatch):
    from tileseg import execution

    monkeypatch.setattr(placement, "device_count", lambda: 0)
    called = []
    monkeypatch.setattr(placement, "local_gpu_cluster", lambda *a: called.append(a))
    with execution.scheduler_context({"scheduler": "local", "resources": GPU, "workers": 1}) as info:
        assert len(info.client.scheduler_info(n_workers=-1)["workers"]) == 1
    assert not called


def test_a_scheduler_that_cannot_load_the_plugin_is_a_clear_error():
    class Client:
        class scheduler:  # noqa: N801 - mimics client.scheduler.address
            address = "tcp://sched:8786"

        def register_plugin(self, plugin, name=None):
            raise ModuleNotFoundError("No module named 'tileseg'")

    with pytest.raises(PlacementError, match=r"tcp://sched:8786 .*No module named 'tileseg'.*install tileseg"):
        placement.install(Client())
