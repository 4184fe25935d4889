"""Set-up that does not dominate, and shows: per-stage log lines and the statistics split out of "graph"."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import zarr

from tileseg.runner import run_pipeline


def test_stage_lines_and_statistics_time(tmp_path, caplog):
    pytest.importorskip("skimage")
    from skimage.filters import threshold_otsu
    from skimage.measure import label
    from skimage.morphology import remove_small_objects

    rng = np.random.default_rng(2)
    image = (rng.normal(100, 20, size=(120, 150)) + 60 * (rng.random((120, 150)) > 0.7)).clip(0, 255)
    image = image.astype(np.uint8)
    zarr.open_group(str(tmp_path / "s.zarr"), mode="w").create_array(
        "image", shape=image.shape, chunks=(32, 32), dtype="uint8")[:] = image
    (tmp_path / "p.yaml").write_text(
        "version: 1\ninput: {path: s.zarr, array: image}\nmethod: otsu\n"
        "postprocess: [{remove_small_objects: {min_size_px: 3}}, label]\n"
        "tiling: {chunks: [40, 50]}\noutput: {path: 'out/{stem}.zarr'}\nexecution: {scheduler: threads}\n")
    with caplog.at_level(logging.INFO, logger="tileseg.runner"):
        report = run_pipeline(tmp_path / "p.yaml")
    item = report.items[0]
    assert report.ok, item.error
    want = label(remove_small_objects(image > threshold_otsu(image), max_size=2), connectivity=1)
    np.testing.assert_array_equal(zarr.open_group(item.output, mode="r")["0"][...], want)
    # Otsu's histogram (set-up) and the components pass (computing the result) run while building:
    # each reported apart from "graph", with start and end lines
    assert item.timings["statistics"] > 0 and item.timings["components"] > 0 and item.timings["graph"] >= 0
    lines = [r.getMessage() for r in caplog.records if r.name == "tileseg.runner"]
    for stage in ("open", "graph", "write graph", "compute_write", "finalize"):
        assert sum(f": {stage} ..." in m for m in lines) == 1 and sum(f": {stage} done in" in m for m in lines) == 1
    for kind in ("statistics", "components"):
        assert any(f"{kind} pass" in m and "tasks)" in m for m in lines)
        assert any(f"{kind} pass done in" in m for m in lines)
        assert any(f"whole-image passes ({kind})" in m for m in lines)
    # the throughput is over the time computing the result, the components pass included
    px = image.size
    assert item.pixels_per_s == pytest.approx(px / (item.timings["components"] + item.timings["compute_write"]),
                                              rel=1e-3)


def test_whole_image_passes_show_progress(tmp_path, monkeypatch):
    from tileseg.progress import RunProgress

    calls = []
    monkeypatch.setattr(RunProgress, "pass_progress",
                        lambda self, index, kind, done, total: calls.append((index, kind, done, total)))
    rng = np.random.default_rng(3)
    image = (rng.random((96, 80)) * 255).astype(np.uint8)
    zarr.open_group(str(tmp_path / "s.zarr"), mode="w").create_array(
        "image", shape=image.shape, chunks=(32, 32), dtype="uint8")[:] = image
    (tmp_path / "p.yaml").write_text(
        "version: 1\ninput: {path: s.zarr, array: image}\nmethod: otsu\n"
        "postprocess: [{remove_small_objects: {min_size_px: 3}}]\n"
        "tiling: {chunks: [32, 32]}\noutput: {path: 'out/{stem}.zarr'}\nexecution: {scheduler: threads}\n")
    report = run_pipeline(tmp_path / "p.yaml", progress=True)
    assert report.ok, report.items[0].error
    for kind in ("statistics", "components"):
        mine = [c for c in calls if c[1] == kind]
        assert mine, calls
        totals = {c[3] for c in mine}
        assert len(totals) == 1 and min(totals) > 0
        # from 0 tasks done at the start to all of them at the end, never backwards
        done = [c[2] for c in mine]
        assert done[0] == 0 and done[-1] == mine[0][3] and done == sorted(done)
    # the components pass: one task per chunk at least (3 x 3 chunks)
    assert next(c[3] for c in calls if c[1] == "components") >= 9


def test_passes_from_other_threads_are_not_counted(tmp_path):
    """A compute started by another thread (another item in flight) is not this item's pass."""
    import threading

    import dask
    import dask.array as da

    from tileseg.runner import _EagerComputes

    x = da.ones((64, 64), chunks=16)
    with _EagerComputes("item") as eager:
        t = threading.Thread(target=lambda: dask.compute(x.sum(), scheduler="threads"))
        t.start()
        t.join()
        assert eager.seconds == {}
        dask.compute(x.sum(), scheduler="threads")
    assert set(eager.seconds) == {"statistics"}
