"""examples/embed_dask.py: open -> segment -> a user's step -> write, as one graph on the user's cluster.

Run on a real LocalCluster with two worker processes; the written outlines
must equal the user's step applied to the whole-image segmentation computed
with threads, and the tasks must have run on the cluster's workers.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import dask
import numpy as np
import pytest
import zarr

sys.path.insert(0, str(Path(__file__).parent))
from pipeline_helpers import save_conv_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("torch")
pytest.importorskip("skimage")
distributed = pytest.importorskip("distributed")


def _example():
    spec = importlib.util.spec_from_file_location("embed_dask", ROOT / "examples" / "embed_dask.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_embedded_graph_runs_on_the_users_cluster(tmp_path):
    from tileseg.testing.synthetic import write_blobs_zarr
    from tileseg.writers import get_writer, is_complete

    ex = _example()
    src = tmp_path / "scene.zarr"
    write_blobs_zarr(src, (300, 380), (128, 128), seed=5)
    model = save_conv_model(tmp_path / "model.pt")
    out = tmp_path / "out" / "outlines.zarr"
    with dask.config.set(scheduler="threads"):  # the reference: same graph, local threads, whole image at the end
        reference, _ = ex.build(str(src), str(model), str(tmp_path / "unused.zarr"), patch=64)
        seg_ref = reference.data.compute()
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            distributed.Client(cluster) as client:
        with distributed.get_task_stream(client) as ts:
            _, job = ex.build(str(src), str(model), str(out), patch=64)
            client.compute(job.task).result()
        get_writer("zarr").finalize(job.handle)
        workers = {t["worker"] for t in ts.data}
        assert workers and workers <= set(cluster.scheduler.workers)  # every task ran on the user's workers
        assert len(workers) == 2
    assert is_complete(str(out))
    got = zarr.open_group(str(out), mode="r")["0"][...]
    np.testing.assert_array_equal(got, seg_ref)
    # and the step itself is what the user wrote, on the whole segmentation (no seams at chunk borders)
    import tileseg

    seg = tileseg.segment(tileseg.open(str(src), array="image"), {"torchscript": {"path": str(model)}},
                          patch_size=(64, 64), overlap=0.25, preprocess=["zscore"])
    with dask.config.set(scheduler="threads"):
        whole = seg.data.compute()
    assert whole.max() == 1 and got.sum() > 100
    np.testing.assert_array_equal(got, ex.outlines(whole))
