"""NIfTI writer: affine and values read back by nibabel, streaming slabs, recorded completion, pipelines."""

from __future__ import annotations

import gzip
import os

import dask.array as da
import numpy as np
import pytest

nib = pytest.importorskip("nibabel", reason="the nifti writer needs the 'medical' extra")

import tileseg  # noqa: E402
from tileseg.errors import OutputError  # noqa: E402
from tileseg.geometry import lps_from_ras_affine, ras_from_lps_affine, world_affine  # noqa: E402
from tileseg.image import Image  # noqa: E402
from tileseg.readers import open_image  # noqa: E402
from tileseg.writers import get_writer, is_complete  # noqa: E402

RNG = np.random.default_rng(11)
NAMES = ("background", "liver", "tumour")
OBLIQUE = ((0.9, 0.3, -0.3162277660168379), (0.0, 0.7251144, 0.6886250), (0.43588989, -0.6186516, 0.6536789))


def unit_rows(m):
    m = np.asarray(m, float)
    q, _ = np.linalg.qr(m.T)
    return tuple(tuple(r) for r in q.T)


def class_map(shape=(13, 21, 17), chunks=(5, 8, 9)):
    ref = RNG.integers(0, len(NAMES), size=shape).astype(np.int64)
    image = Image(da.from_array(ref, chunks=chunks), axes=("z", "y", "x"), spacing=(2.5, 0.8, 0.6),
                  origin=(-40.0, 12.0, 101.5), direction=unit_rows(OBLIQUE), class_names=NAMES,
                  units=("millimeter",) * 3)
    return ref, image


def expected_affine(image):
    return np.asarray(ras_from_lps_affine(world_affine(image.spacing, image.origin, image.direction)))


@pytest.mark.parametrize("name", ["seg.nii.gz", "seg.nii"])
def test_class_map_reads_back_with_affine_values_and_label_dtype(tmp_path, name):
    ref, image = class_map()
    out = tmp_path / name
    get_writer("nifti").write(image, str(out), options={"slab": 4})
    assert os.listdir(tmp_path) == [name]  # partial folder removed
    back = nib.load(str(out))
    assert back.get_data_dtype() == np.uint8 and back.shape == (17, 21, 13)
    np.testing.assert_array_equal(np.asanyarray(back.dataobj).transpose(2, 1, 0), ref)
    assert np.allclose(back.affine, expected_affine(image))
    assert np.allclose(back.get_qform(), expected_affine(image), atol=1e-5)
    assert int(back.header["sform_code"]) == int(back.header["qform_code"]) == 1
    assert back.header.get_intent()[0] == "label"
    assert is_complete(str(out), writer="nifti")
    again = open_image(str(out))  # tileseg's record gives the class names back
    assert again.class_names == NAMES


def test_probabilities_float32_channels_last(tmp_path):
    ref = RNG.random((3, 6, 7, 8))
    image = Image(da.from_array(ref, chunks=(3, 2, 7, 8)), axes=("c", "z", "y", "x"), spacing=(3.0, 1.0, 1.0))
    out = tmp_path / "p.nii.gz"
    get_writer("nifti").write(image, str(out), options={"slab": 4})
    back = nib.load(str(out))
    assert back.get_data_dtype() == np.float32 and back.shape == (8, 7, 6, 3)
    np.testing.assert_array_equal(np.asanyarray(back.dataobj).transpose(3, 2, 1, 0), ref.astype(np.float32))


def test_slabs_stream_one_gzip_and_rerun_gives_same_data(tmp_path):
    ref, image = class_map(shape=(30, 16, 16), chunks=(7, 16, 16))
    writer = get_writer("nifti")
    a, b = tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"
    writer.write(image, str(a), options={"slab": 4, "run_id": "r"})
    with gzip.open(a, "rb") as f:  # one valid gzip stream (gzip module reads to the end)
        raw = f.read()
    offset = int(nib.load(str(a)).dataobj.offset)
    assert len(raw) == offset + ref.size
    np.testing.assert_array_equal(np.frombuffer(raw[offset:], np.uint8).reshape(ref.shape), ref)
    job = writer.write(image, str(b), compute=False, options={"slab": 4, "run_id": "r"})
    import dask

    dask.compute(job.task)
    dask.compute(job.task)  # idempotent block writes
    writer.finalize(job.handle)
    assert np.array_equal(np.asanyarray(nib.load(str(b)).dataobj), np.asanyarray(nib.load(str(a)).dataobj))


def test_foreign_nifti_never_complete_nor_replaced(tmp_path):
    foreign = tmp_path / "seg.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.uint8), np.eye(4)), str(foreign))
    before = foreign.read_bytes()
    assert not is_complete(str(foreign), writer="nifti")
    _, image = class_map()
    with pytest.raises(OutputError, match="seg.nii.gz.*already exists"):
        get_writer("nifti").write(image, str(foreign))
    assert foreign.read_bytes() == before and os.listdir(tmp_path) == ["seg.nii.gz"]
    get_writer("nifti").write(image, str(foreign), overwrite=True)
    assert is_complete(str(foreign), writer="nifti")
    with pytest.raises(OutputError, match="already exists"):  # a finished output is kept too
        get_writer("nifti").write(image, str(foreign))
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"not a nifti")
    assert not is_complete(str(junk), writer="nifti")
    with pytest.raises(OutputError, match="not a NIfTI"):
        get_writer("nifti").write(image, str(junk), overwrite=True)


def test_abort_leaves_nothing_and_wrong_targets_refused(tmp_path):
    _, image = class_map()
    writer = get_writer("nifti")
    handle = writer.prepare(image, str(tmp_path / "x.nii.gz"))
    writer.abort(handle)
    assert os.listdir(tmp_path) == []
    with pytest.raises(OutputError, match="named"):
        writer.prepare(image, str(tmp_path / "x.tif"))
    flat = Image(da.zeros((5, 5), chunks=5), axes=("y", "x"))
    with pytest.raises(OutputError, match="3-D"):
        writer.prepare(flat, str(tmp_path / "f.nii.gz"))


def oblique_ras():
    a = np.deg2rad(20.0)
    m = np.eye(4)
    m[:3, :3] = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]) @ np.diag([0.9, 1.1, 3])
    m[:3, 3] = (10.0, -20.0, 30.0)
    return m


def test_pipeline_otsu_nifti_in_nifti_out(tmp_path):
    from skimage.filters import threshold_otsu

    vol = (RNG.normal(100, 15, (24, 30, 20)) + 80 * (RNG.random((24, 30, 20)) > 0.8)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, oblique_ras()), str(tmp_path / "vol.nii.gz"))
    (tmp_path / "p.yaml").write_text(
        "version: 1\ninput: {path: vol.nii.gz}\nmethod: {otsu: {}}\n"
        "output: {path: 'out/{stem}_seg.nii.gz', writer: nifti}\n")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        report = tileseg.run(tmp_path / "p.yaml", scheduler="synchronous")
    finally:
        os.chdir(cwd)
    assert report.ok, report.items[0].error
    back = nib.load(str(tmp_path / "out" / "vol_seg.nii.gz"))
    assert np.allclose(back.affine, oblique_ras())
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), vol > threshold_otsu(vol))


def test_nifti_to_zarr_to_nifti_keeps_geometry(tmp_path):
    vol = RNG.integers(0, 500, (9, 10, 11)).astype(np.int16)
    src = tmp_path / "in.nii.gz"
    nib.save(nib.Nifti1Image(vol, oblique_ras()), str(src))
    image = open_image(str(src))
    get_writer("zarr").write(image, str(tmp_path / "mid.zarr"))
    mid = open_image(str(tmp_path / "mid.zarr"))
    np.testing.assert_allclose(world_affine(mid.spacing, mid.origin, mid.direction),
                               lps_from_ras_affine(oblique_ras()), atol=1e-6)
    get_writer("nifti").write(mid, str(tmp_path / "out.nii.gz"))
    back = nib.load(str(tmp_path / "out.nii.gz"))
    assert np.allclose(back.affine, oblique_ras()) and back.get_data_dtype() == np.int16
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), vol)


def test_real_nibabel_file_round_trip(tmp_path):
    from nibabel.testing import data_path

    path = os.path.join(data_path, "example4d.nii.gz")
    image = open_image(path)
    get_writer("nifti").write(image, str(tmp_path / "copy.nii.gz"))
    back, ref = nib.load(str(tmp_path / "copy.nii.gz")), nib.load(path)
    assert back.shape == ref.shape and np.allclose(back.affine, ref.affine, atol=1e-5)
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), np.asanyarray(ref.dataobj))


def test_nodata_recorded_and_wide_image_written_as_nifti2(tmp_path):
    ref = RNG.integers(0, 3, size=(1, 2, 40000)).astype(np.uint8)
    ref[0, 0, :5] = 255
    image = Image(da.from_array(ref, chunks=(1, 2, 10000)), axes=("z", "y", "x"), class_names=NAMES,
                  nodata=np.uint8(255))
    out = tmp_path / "wide.nii.gz"
    get_writer("nifti").write(image, str(out))
    back = nib.load(str(out))
    assert isinstance(back, nib.Nifti2Image) and back.shape == (40000, 2, 1)
    np.testing.assert_array_equal(np.asanyarray(back.dataobj).transpose(2, 1, 0), ref)
    again = open_image(str(out))
    assert again.nodata == 255 and again.class_names == NAMES and is_complete(str(out), writer="nifti")


def test_rerun_skips_finished_nifti_output(tmp_path):
    vol = RNG.normal(0, 1, (8, 9, 10)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, oblique_ras()), str(tmp_path / "v.nii.gz"))
    pipeline = {"version": 1, "input": {"path": str(tmp_path / "v.nii.gz")}, "method": "otsu",
                "output": {"path": str(tmp_path / "out" / "{stem}.nii.gz"), "writer": "nifti"}}
    first = tileseg.run(pipeline, scheduler="synchronous")
    assert first.ok and first.items[0].status == "ok"
    second = tileseg.run(pipeline, scheduler="synchronous")
    assert second.items[0].status == "skipped"


def test_finalize_streams_one_slab_at_a_time(tmp_path):
    import tracemalloc

    import dask

    vol = RNG.random((32, 256, 256)).astype(np.float32)  # 8 MiB; slabs of 2 slices = 0.5 MiB
    image = Image(da.from_array(vol, chunks=(8, 256, 256)), axes=("z", "y", "x"))
    writer = get_writer("nifti")
    job = writer.write(image, str(tmp_path / "big.nii.gz"), compute=False, options={"slab": 2, "compresslevel": 1})
    dask.compute(job.task, scheduler="synchronous")
    del vol, image
    tracemalloc.start()
    try:
        writer.finalize(job.handle)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * 2**20, peak  # a few slabs, never the 8 MiB volume
    assert nib.load(str(tmp_path / "big.nii.gz")).shape == (256, 256, 32)
