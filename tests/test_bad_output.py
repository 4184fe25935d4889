"""NaN/Inf in a model's output: an error naming the image and patch, or nodata that is counted."""

from __future__ import annotations

import numpy as np
import pytest

import tileseg
from tileseg import counters
from tileseg.errors import ModelError

SHAPE, PATCH = (60, 70), (20, 20)
BAD = (slice(31, 36), slice(40, 44))  # where the model's output is not finite (image pixels)


def _model(x_ref):
    """Logits (x - 0.5, 0.5 - x) except NaN/Inf where the patch covers the BAD pixels of ``x_ref``."""
    marker = np.zeros_like(x_ref, dtype=bool)
    marker[BAD] = True

    def forward(batch):
        out = np.concatenate([batch - 0.5, 0.5 - batch], axis=1).astype(np.float32)
        # the input carries the marker as a value only the BAD pixels have
        hit = batch[:, 0] == -7.0
        out[:, 0][hit] = np.nan
        out[:, 1][hit] = np.inf
        return out
    return forward


def _image():
    x = np.random.default_rng(1).random(SHAPE, dtype=np.float32)
    x[BAD] = -7.0
    return x


def test_bad_output_is_an_error_naming_the_image_and_box():
    x = _image()
    with pytest.raises(ModelError, match=r"scan\.zarr: model output contains NaN or Inf .* pixel box \(\(\d+, \d+\), "
                                         r"\(\d+, \d+\)\)"):
        import dask.array as da

        from tileseg.image import Image

        img = Image(data=da.from_array(x, chunks=30), axes=("y", "x"), source="scan.zarr")
        tileseg.segment(img, _model(x), patch_size=PATCH, chunks=30).data.compute(scheduler="threads")


@pytest.mark.parametrize("output", ["labels", "probabilities"])
def test_bad_output_as_nodata(output):
    x = _image()
    counters.reset()
    res = tileseg.segment(x, _model(x), patch_size=PATCH, chunks=30, output=output, bad_output="nodata")
    got = res.data.compute(scheduler="threads")
    good = x > 0.5  # argmax of (x - 0.5, 0.5 - x) is 1 where x < 0.5
    bad = np.zeros(SHAPE, bool)
    bad[BAD] = True
    if output == "labels":
        assert res.nodata == np.iinfo(got.dtype).max
        np.testing.assert_array_equal(got == res.nodata, bad)
        np.testing.assert_array_equal(got[~bad], np.where(good, 0, 1)[~bad])
    else:
        assert np.isnan(res.nodata)
        np.testing.assert_array_equal(np.isnan(got).any(axis=0), bad)
        e = np.exp(np.stack([x - 0.5, 0.5 - x]))
        np.testing.assert_allclose(got[:, ~bad], (e / e.sum(0))[:, ~bad], rtol=1e-5)
    # counted once per patch that predicted the pixel (the grid's own starts; the grid is checked against MONAI)
    from tileseg.tiling.grid import make_grid

    grid = make_grid(SHAPE, PATCH, overlap=0.25, chunks=30)
    per_axis = [np.array([((a.starts <= i) & (i < a.starts + a.patch)).sum() for i in range(n)])
                for a, n in zip(grid.axes, SHAPE)]
    cover = np.outer(*per_axis)
    assert counters.snapshot()["bad_output_px"]["image"] == cover[bad].sum() > bad.sum()


def test_pipeline_option_counts_bad_pixels(tmp_path):
    import zarr

    from tileseg import registry
    from tileseg.predictors.base import CallablePredictor
    from tileseg.predictors.kinds import ModelKind

    x = _image()
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="w")
    group.create_array("image", shape=x.shape, dtype=x.dtype, chunks=(30, 35))[:] = x

    class Marked(ModelKind):
        name = "marked"

        def load(self, *, device=None, precision="fp32"):
            return CallablePredictor(_model(x), in_channels=1, out_channels=2)

    registry.register("models", "marked", Marked)
    try:
        text = ("version: 1\ninput: {path: s.zarr, array: image}\n"
                "tiling: {patch_size: [20, 20], overlap_px: [0, 0], blend: crop, chunks: [30, 35]}\n"
                "model: {marked: {}, bad_output: %s}\noutput: {path: 'out/{stem}.zarr'}\n")
        (tmp_path / "p.yaml").write_text(text % "nodata")
        report = tileseg.run(tmp_path / "p.yaml")
        (tmp_path / "e.yaml").write_text(text.replace("out/", "err/") % "error")
        failed = tileseg.run(tmp_path / "e.yaml")
    finally:
        registry._EXTRA["models"].pop("marked", None)
    item = report.items[0]
    assert item.status == "ok", item.error
    assert item.bad_output_px == 20  # crop: each pixel predicted by exactly one patch
    got = np.asarray(tileseg.open(item.output).data.compute())
    assert (got == np.iinfo(got.dtype).max).sum() == 20
    assert failed.items[0].status == "failed" and "NaN or Inf" in failed.items[0].error
    assert "s.zarr" in failed.items[0].error
