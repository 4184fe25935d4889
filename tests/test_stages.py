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
    # Otsu's histogram and one components pass are computed while building: reported apart
    assert item.timings["statistics"] > 0 and item.timings["graph"] >= 0
    lines = [r.getMessage() for r in caplog.records if r.name == "tileseg.runner"]
    for stage in ("open", "graph", "compute_write", "finalize"):
        assert any(f": {stage} ..." in m for m in lines) and any(f": {stage} done in" in m for m in lines)
    assert any("computing whole-image statistics" in m for m in lines)
