"""DICOM series read by region (the engine's owner tasks): values, one decode per file, engine results."""

from __future__ import annotations

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

import tileseg  # noqa: E402
from tileseg.readers import dicom as dicom_reader  # noqa: E402
from tileseg.readers import open_image  # noqa: E402
from tileseg.readers._slab_cache import SLAB_CACHE, SlabCache  # noqa: E402
from tileseg.testing.dicom import write_ct_series  # noqa: E402

SHAPE = (37, 40, 36)
CHUNKS = ((12, 12, 12, 1), (16, 16, 8), (20, 16))  # the engine's output chunks: parts of the planes


def pydicom_volume(folder) -> np.ndarray:
    """Oracle: pydicom's decoding of every file, rescaled, in the order of ImagePositionPatient's z."""
    dss = [pydicom.dcmread(f) for f in folder.iterdir()]
    dss.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    return np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in dss])


@pytest.fixture
def series(tmp_path):
    write_ct_series(tmp_path / "s", shape=SHAPE, seed=4)
    SLAB_CACHE.clear()
    yield tmp_path / "s"
    SLAB_CACHE.clear()


def test_region_chunks_equal_pydicom_and_decode_each_file_once(series, spy_dcmread):
    img = open_image(str(series), chunks=5)
    regions = dicom_reader.region_chunks(img.data, CHUNKS)
    assert regions.chunks[1:] == CHUNKS[1:] and regions.chunks[0] == (5,) * 7 + (2,)  # quarter of 12, in slabs
    truth = pydicom_volume(series)
    opened = spy_dcmread()
    got = regions.compute(scheduler="synchronous")
    np.testing.assert_array_equal(got, truth)
    assert got.dtype == img.dtype
    assert sorted(opened) == sorted(img.reader_info["files"])  # 6 region chunks per slab, one decode per file
    assert SLAB_CACHE.hits > SLAB_CACHE.misses == 8


def test_a_cache_too_small_decodes_again_with_the_same_values(series, monkeypatch):
    monkeypatch.setattr(dicom_reader, "SLAB_CACHE", SlabCache(limit=1))
    img = open_image(str(series), chunks=5)
    got = dicom_reader.region_chunks(img.data, CHUNKS).compute(scheduler="synchronous")
    np.testing.assert_array_equal(got, pydicom_volume(series))
    assert img.data[::3, 5:9].compute().tolist() == pydicom_volume(series)[::3, 5:9].tolist()  # strided z


def test_other_arrays_are_left_alone(series):
    img = open_image(str(series))
    assert dicom_reader.region_chunks(img.data[1:], CHUNKS) is None  # no longer the reader's array
    assert dicom_reader.region_chunks(img.data + 1, CHUNKS) is None
    assert dicom_reader.region_chunks(img.data, ((37,), (40,), (30,))) is None  # does not cover the planes


def test_engine_on_a_series_read_by_region_matches_monai(series, monkeypatch):
    torch = pytest.importorskip("torch")
    inferers = pytest.importorskip("monai.inferers")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.Tanh(),
                              torch.nn.Conv3d(4, 2, 3, padding=1)).eval()
    used = []
    real = dicom_reader.region_chunks

    def spy(data, chunks):
        out = real(data, chunks)
        used.append(out is not None)
        return out

    monkeypatch.setattr(dicom_reader, "region_chunks", spy)
    img = open_image(str(series), chunks=4)
    got = tileseg.segment(img, net, patch_size=(12, 12, 12), overlap=0.25, blend="gaussian", output="logits",
                          chunks=(9, 18, 18), batch_size=2).data.compute(scheduler="threads", num_workers=2)
    assert used == [True]
    vol = torch.from_numpy(pydicom_volume(series).astype(np.float32)[None, None])
    with torch.inference_mode():
        ref = inferers.sliding_window_inference(vol, (12, 12, 12), 2, net, overlap=0.25, mode="gaussian")
    np.testing.assert_allclose(got, ref[0].numpy(), rtol=1e-5, atol=1e-4)
