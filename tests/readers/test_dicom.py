"""DICOM reader: values against pydicom's own decoding, geometry against the headers, defects, items, privacy."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

from tileseg.errors import FormatError, InputError  # noqa: E402
from tileseg.geometry import world_affine  # noqa: E402
from tileseg.readers import expand_inputs, item_stem, open_image  # noqa: E402
from tileseg.testing.dicom import write_ct_series  # noqa: E402

SHAPE = (12, 24, 20)


def pydicom_volume(files: list[str]) -> np.ndarray:
    """Independent oracle: pydicom's per-slice decoding, rescaled, stacked in the given order."""
    planes = []
    for f in files:
        ds = pydicom.dcmread(f)
        planes.append(ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept))
    return np.stack(planes)


def sorted_by_normal(folder: Path) -> list[str]:
    files = [str(p) for p in folder.iterdir()]
    hdrs = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    iop = np.asarray(hdrs[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    return [f for _, f in sorted(zip([np.dot(np.asarray(h.ImagePositionPatient, float), normal) for h in hdrs], files))]


def test_volume_equals_pydicom_decoding_in_normal_order(tmp_path):
    truth = write_ct_series(tmp_path / "s", shape=SHAPE, seed=3)
    img = open_image(str(tmp_path / "s"), chunks=5)
    assert img.format == "dicom" and img.axes == ("z", "y", "x") and img.data.chunks[0] == (5, 5, 2)
    vol = img.data.compute()
    oracle = pydicom_volume(sorted_by_normal(tmp_path / "s"))
    np.testing.assert_array_equal(vol, oracle)
    np.testing.assert_array_equal(vol, truth.hu)
    assert vol.dtype == np.int16 and vol.min() < -990 and vol.max() > 690
    assert img.reader_info["files"] == truth.files
    meta = img.attrs["dicom"]
    assert meta["SOPInstanceUIDs"] == truth.sop_uids and meta["SeriesInstanceUID"] == truth.series_uid
    assert meta["rescale_applied"] is True and meta["rescale"] == {"slope": 1.0, "intercept": -1024.0}
    assert "Secret" not in repr(img.attrs) and "SECRET" not in repr(img.attrs)


def test_shuffled_file_order_gives_the_same_volume(tmp_path):
    a = write_ct_series(tmp_path / "a", shape=SHAPE, seed=1)
    b = write_ct_series(tmp_path / "b", shape=SHAPE, seed=2, series_uid=a.series_uid)
    assert [os.path.basename(f) for f in a.files] != [os.path.basename(f) for f in b.files]
    np.testing.assert_array_equal(open_image(str(tmp_path / "a")).data.compute(),
                                  open_image(str(tmp_path / "b")).data.compute())


def test_float_rescale_gives_float32(tmp_path):
    truth = write_ct_series(tmp_path / "s", shape=SHAPE, slope=0.5, intercept=-1024.25)
    vol = open_image(str(tmp_path / "s")).data.compute()
    assert vol.dtype == np.float32
    np.testing.assert_allclose(vol, truth.hu, atol=1e-3)


@pytest.mark.parametrize("orientation", [(1, 0, 0, 0, 1, 0), (0.8660254, 0.5, 0, -0.5, 0.8660254, 0),
                                         (1, 0, 0, 0, 0, -1), (0.6, 0.0, 0.8, 0.0, 1.0, 0.0)])
def test_geometry_maps_indices_to_image_position_patient(tmp_path, orientation):
    truth = write_ct_series(tmp_path / "s", shape=SHAPE, spacing=(3.3, 0.6, 0.9), orientation=orientation)
    img = open_image(str(tmp_path / "s"))
    assert img.spacing == pytest.approx((3.3, 0.6, 0.9), abs=1e-3)
    assert img.origin == pytest.approx(truth.origin, abs=1e-3)
    np.testing.assert_allclose(img.direction, truth.direction, atol=1e-5)
    assert img.units == ("millimeter",) * 3
    aff = np.array(world_affine(img.spacing, img.origin, img.direction))
    for k in range(SHAPE[0]):
        np.testing.assert_allclose((aff @ [0, 0, k, 1])[:3], truth.positions[k], atol=2e-3)
    # a column step moves along IOP[0:3] by the column spacing, a row step along IOP[3:6]
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    np.testing.assert_allclose(aff[:3, 0], row / np.linalg.norm(row) * 0.9, atol=1e-5)
    np.testing.assert_allclose(aff[:3, 1], col / np.linalg.norm(col) * 0.6, atol=1e-5)


@pytest.mark.parametrize("defect, match", [
    ("drop", r"missing slice"), ("duplicate", r"duplicate slice positions"), ("truncate", r"truncated"),
    ("rows", r"mixed size"), ("oblique_one", r"mixed orientation"), ("spacing", r"non-uniform slice spacing"),
])
def test_each_defect_names_the_series_and_the_file(tmp_path, defect, match):
    truth = write_ct_series(tmp_path / "s", shape=SHAPE, defects=[defect])
    with pytest.raises(InputError, match=match) as info:
        open_image(str(tmp_path / "s"))
    text = str(info.value)
    assert truth.series_uid in text and ".dcm" in text and "Secret" not in text and "SECRET" not in text
    assert repr(str(tmp_path / "s")) in text  # the folder too: file names alone do not say which series folder


def test_repair_hint_names_the_pipeline_key(tmp_path):
    from click.testing import CliRunner

    from tileseg.cli import main

    write_ct_series(tmp_path / "s", shape=SHAPE, defects=["rows"])
    (tmp_path / "p.yaml").write_text("version: 1\ninput: {path: s}\nmethod: {otsu: {}}\noutput: {path: out/x.zarr}\n")
    res = CliRunner().invoke(main, ["run", str(tmp_path / "p.yaml"), "--quiet"], catch_exceptions=False)
    assert res.exit_code == 1
    assert "mixed size" in res.output and "input.options.repair: ['size'] keeps the majority" in res.output


def test_defect_file_names_are_the_offending_ones(tmp_path):
    write_ct_series(tmp_path / "s", shape=SHAPE, defects=["rows"])
    odd = [f.name for f in (tmp_path / "s").iterdir() if pydicom.dcmread(f, stop_before_pixels=True).Rows != SHAPE[1]]
    with pytest.raises(InputError) as info:
        open_image(str(tmp_path / "s"))
    assert len(odd) == 1 and repr(odd[0]) in str(info.value)


def test_opt_in_repairs(tmp_path):
    truth = write_ct_series(tmp_path / "d", shape=SHAPE, defects=["duplicate"])
    with pytest.raises(InputError, match="missing slice"):  # the duplicate stands where a slice is missing
        open_image(str(tmp_path / "d"), repair=["duplicates"])
    img = open_image(str(tmp_path / "d"), repair=["duplicates", "spacing"])
    assert img.shape[0] == SHAPE[0] - 1
    write_ct_series(tmp_path / "r", shape=SHAPE, defects=["rows"])
    assert open_image(str(tmp_path / "r"), repair=["size", "spacing"]).shape == (SHAPE[0] - 1,) + SHAPE[1:]
    write_ct_series(tmp_path / "g", shape=SHAPE, defects=["drop"])
    img = open_image(str(tmp_path / "g"), repair=["spacing"])
    assert img.attrs["dicom"]["irregular_spacing"] is True and img.shape[0] == SHAPE[0] - 1
    assert truth.series_uid


def test_truncation_is_caught_at_decode_time_too(tmp_path):
    truth = write_ct_series(tmp_path / "s", shape=SHAPE)
    img = open_image(str(tmp_path / "s"), chunks=4)
    victim = truth.files[-1]
    with open(victim, "r+b") as fh:
        fh.truncate(os.path.getsize(victim) - 10)
    with pytest.raises(InputError, match=rf"{truth.series_uid}.*{os.path.basename(victim)}.*truncated"):
        img.data.compute()


def make_study(root: Path) -> list:
    out = []
    for i, (desc, shape) in enumerate([("chest", SHAPE), ("abdomen", (8, 16, 16)), ("head", (6, 20, 16))]):
        out.append(write_ct_series(root / f"series{i}", shape=shape, seed=i, series_description=desc))
    return out


def test_study_folder_expands_to_one_item_per_series(tmp_path):
    series = make_study(tmp_path / "study")
    items = expand_inputs(str(tmp_path / "study"))
    assert len(items) == 3
    assert sorted(item_stem(i) for i in items) == sorted(s.series_uid for s in series)
    for item in items:
        img = open_image(item)
        match = [s for s in series if s.series_uid == img.attrs["dicom"]["SeriesInstanceUID"]]
        np.testing.assert_array_equal(img.data.compute(), match[0].hu)
    with pytest.raises(InputError, match="holds 3 DICOM series"):
        open_image(str(tmp_path / "study"))
    assert open_image(str(tmp_path / "study"), series="largest").shape == SHAPE
    assert open_image(str(tmp_path / "study"), series_description="HEAD").shape == (6, 20, 16)


def test_pipeline_over_a_study_writes_one_output_per_series(tmp_path):
    import zarr

    from tileseg.runner import run_pipeline

    series = make_study(tmp_path / "study")
    (tmp_path / "p.yaml").write_text(
        "version: 1\ninput: {path: study/}\nmethod: {fixed_physical: {threshold: 300}}\n"
        "output: {path: 'out/{stem}.zarr'}\n")
    report = run_pipeline(tmp_path / "p.yaml", scheduler="synchronous")
    assert report.ok, [i.error for i in report.items]
    names = sorted(os.listdir(tmp_path / "out"))
    assert [n for n in names if n.endswith(".zarr")] == sorted(f"{s.series_uid}.zarr" for s in series)
    for s in series:
        got = zarr.open_group(str(tmp_path / "out" / f"{s.series_uid}.zarr"), mode="r")["0"][...]
        np.testing.assert_array_equal(got, (s.hu > 300).astype(got.dtype))
        assert got.sum() > 0


def test_hostile_uid_and_description_never_reach_a_path(tmp_path):
    write_ct_series(tmp_path / "study" / "a", shape=(6, 16, 16), series_uid="../evil", series_description="../evil")
    write_ct_series(tmp_path / "study" / "b", shape=(6, 16, 16), series_description="../../evil2")
    items = expand_inputs(str(tmp_path / "study"))
    stems = [item_stem(i) for i in items]
    assert len(items) == 2 and all(".." not in s and "/" not in s and "evil" not in s for s in stems)
    from tileseg.runner import run_pipeline

    (tmp_path / "p.yaml").write_text(
        "version: 1\ninput: {path: study/}\nmethod: {fixed_physical: {threshold: 300}}\n"
        "output: {path: 'out/{stem}.zarr'}\n")
    report = run_pipeline(tmp_path / "p.yaml", scheduler="synchronous")
    assert report.ok, [i.error for i in report.items]
    for root, dirs, files in os.walk(tmp_path):
        assert not any("evil" in n for n in dirs + files), (root, dirs, files)
    assert len(os.listdir(tmp_path / "out")) >= 2


def test_real_ct_file_matches_pydicom_in_hu():
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    img = open_image(path)
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(img.data.compute()[0], expected)
    assert img.spacing[1:] == tuple(float(v) for v in ds.PixelSpacing)
    assert img.origin == pytest.approx(tuple(float(v) for v in ds.ImagePositionPatient)[::-1])
    assert img.attrs["dicom"]["Modality"] == "CT" and "PatientName" not in repr(img.attrs)


@pytest.mark.parametrize("name", ["MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm"])
def test_real_mr_files_including_compressed(name):
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    try:
        expected = pydicom.dcmread(path).pixel_array
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"no decoder for {name} here: {exc}")
    np.testing.assert_array_equal(open_image(path).data.compute()[0], expected)


def test_missing_decoder_names_the_transfer_syntax(tmp_path):
    from pydicom.data import get_testdata_file

    src = get_testdata_file("JPEG-lossy.dcm")  # 12-bit JPEG Extended: Pillow cannot decode it
    shutil.copy(src, tmp_path / "x.dcm")
    try:
        _ = pydicom.dcmread(src).pixel_array
        pytest.skip("a decoder for JPEG Extended 12-bit is installed here")
    except Exception:  # noqa: BLE001
        pass
    img = open_image(str(tmp_path / "x.dcm"))
    with pytest.raises(FormatError, match=r"JPEG Extended.*1\.2\.840\.10008\.1\.2\.4\.51.*tileseg\[medical-codecs\]"):
        img.data.compute()


def test_detection_and_non_dicom_folders(tmp_path):
    from tileseg.readers import detect_reader
    from tileseg.readers.dicom import DicomReader

    write_ct_series(tmp_path / "s", shape=(3, 8, 8))
    f = next((tmp_path / "s").iterdir())
    f.rename(tmp_path / "s" / "noext")
    assert detect_reader(str(tmp_path / "s")) is DicomReader
    assert detect_reader(str(tmp_path / "s" / "noext")) is DicomReader
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "a.txt").write_text("x" * 200)
    assert not DicomReader.can_open(str(tmp_path / "other"))


def test_item_stem_keeps_hash_in_real_file_names(tmp_path):
    (tmp_path / "scan#2.zarr").mkdir()
    assert item_stem(str(tmp_path / "scan#2.zarr")) == "scan#2"
    assert item_stem(str(tmp_path / "study#1.2.3")) == "1.2.3"


def test_enhanced_multiframe_ct_from_highdicom_equals_the_single_frame_series(tmp_path):
    hd_legacy = pytest.importorskip("highdicom.legacy")
    from pydicom.uid import generate_uid

    truth = write_ct_series(tmp_path / "src", shape=SHAPE, spacing=(2.0, 0.7, 0.8),
                            orientation=(0.8660254, 0.5, 0, -0.5, 0.8660254, 0))
    shuffled = [pydicom.dcmread(f) for f in truth.files[::2] + truth.files[1::2]]  # frames out of order
    enhanced = hd_legacy.LegacyConvertedEnhancedCTImage(shuffled, generate_uid(), 2, generate_uid(), 1)
    (tmp_path / "mf").mkdir()
    enhanced.save_as(tmp_path / "mf" / "enhanced.dcm")
    img = open_image(str(tmp_path / "mf" / "enhanced.dcm"), chunks=5)
    np.testing.assert_array_equal(img.data.compute(), truth.hu)
    single = open_image(str(tmp_path / "src"))
    assert img.spacing == pytest.approx(single.spacing) and img.origin == pytest.approx(single.origin)
    np.testing.assert_allclose(img.direction, single.direction, atol=1e-6)
    frames = img.attrs["dicom"]["FrameNumbers"]
    assert sorted(frames) == list(range(1, SHAPE[0] + 1)) and frames != sorted(frames)


def test_each_chunk_decodes_only_its_own_slices(tmp_path, spy_dcmread):
    import pickle

    truth = write_ct_series(tmp_path / "s", shape=SHAPE)
    img = open_image(str(tmp_path / "s"), chunks=5)
    opened = spy_dcmread()
    block = img.data.blocks[1].compute(scheduler="synchronous")
    np.testing.assert_array_equal(block, truth.hu[5:10])
    assert opened == truth.files[5:10]
    restored = pickle.loads(pickle.dumps(img.data))
    np.testing.assert_array_equal(restored.compute(scheduler="synchronous"), truth.hu)


def test_selection_by_modality_and_unknown_series(tmp_path):
    make_study(tmp_path / "study")
    with pytest.raises(InputError, match="holds 3 DICOM series"):
        open_image(str(tmp_path / "study"), modality="CT")
    with pytest.raises(InputError, match="no DICOM series matches"):
        open_image(str(tmp_path / "study"), modality="MR")
    with pytest.raises(InputError, match="no DICOM series matches"):
        open_image(str(tmp_path / "study"), series="1.2.3.4")
    items = expand_inputs(str(tmp_path / "study") + "/")
    assert all(i.startswith(str(tmp_path / "study") + "#") for i in items)


@pytest.mark.parametrize("name", ["image_dfl.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm", "MR_small_padded.dcm"])
def test_real_files_in_other_uncompressed_syntaxes(name):
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    ds = pydicom.dcmread(path)
    expected = ds.pixel_array * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    np.testing.assert_array_equal(open_image(path).data.compute()[0], expected)


def test_malformed_and_truncated_real_files_name_the_file():
    from pydicom.data import get_testdata_file

    with pytest.raises(InputError, match=r"'badVR\.dcm'"):
        open_image(get_testdata_file("badVR.dcm"))
    with pytest.raises(InputError, match=r"'MR_truncated\.dcm' is truncated: 8130 bytes"):
        open_image(get_testdata_file("MR_truncated.dcm"))
    with pytest.raises(InputError, match="samples per pixel"):
        open_image(get_testdata_file("SC_ybr_full_422_uncompressed.dcm"))


def test_per_slice_rescale_is_applied_slice_by_slice(tmp_path):
    truth = write_ct_series(tmp_path / "s", shape=SHAPE)
    ds = pydicom.dcmread(truth.files[3])
    ds.RescaleIntercept, ds.RescaleSlope = "-1000", "2"
    ds.save_as(truth.files[3])
    img = open_image(str(tmp_path / "s"))
    vol = img.data.compute()
    np.testing.assert_array_equal(vol, pydicom_volume(truth.files))
    assert vol.dtype == np.int16 and img.attrs["dicom"]["rescale"]["intercept"][3] == -1000.0


def test_selection_options_filter_the_items_of_a_study(tmp_path):
    from tileseg.runner import run_pipeline

    make_study(tmp_path / "study")
    mr = write_ct_series(tmp_path / "study" / "mr", shape=(5, 16, 16), modality="MR")
    assert len(expand_inputs(str(tmp_path / "study"))) == 4
    assert len(expand_inputs(str(tmp_path / "study"), options={"modality": "CT"})) == 3
    assert [item_stem(i) for i in expand_inputs(str(tmp_path / "study"), options={"modality": "mr"})] == [mr.series_uid]
    assert len(expand_inputs(str(tmp_path / "study"), options={"series": "largest"})) == 1
    (tmp_path / "p.yaml").write_text(
        "version: 1\ninput: {path: study, options: {modality: CT}}\nmethod: {fixed_physical: {threshold: 300}}\n"
        "output: {path: 'out/{stem}.zarr'}\n")
    report = run_pipeline(tmp_path / "p.yaml", scheduler="synchronous")
    assert report.ok and len(report.items) == 3, [i.error for i in report.items]
    assert f"{mr.series_uid}.zarr" not in os.listdir(tmp_path / "out")


def fileset_series(path: str) -> dict[str, list[str]]:
    """Oracle: the image files of a DICOMDIR by SeriesInstanceUID, from pydicom's FileSet alone."""
    from pydicom.fileset import FileSet

    out: dict[str, list[str]] = {}
    for instance in FileSet(path):
        ds = instance.load()
        if "Rows" in ds and "PixelData" in ds:
            out.setdefault(str(ds.SeriesInstanceUID), []).append(str(instance.path))
    return out


def test_dicomdir_of_pydicoms_file_set_expands_to_its_series():
    from pydicom.data import get_testdata_file

    path = get_testdata_file("DICOMDIR")
    if path is None:
        pytest.skip("pydicom's DICOMDIR test file-set is not installed")
    expected = fileset_series(path)
    items = expand_inputs(path)
    assert len(items) == len(expected) > 3
    assert sorted(item_stem(i) for i in items) == sorted(expected)
    assert all(i.startswith(path + "#") for i in items)
    # a real five-slice CT series of the file-set, read through its DICOMDIR item, equals pydicom's decoding
    uid, files = max(((u, f) for u, f in expected.items() if len(f) == 5), key=lambda t: t[0])
    img = open_image(f"{path}#{uid}")
    np.testing.assert_array_equal(img.data.compute(), pydicom_volume(sorted_by_normal_files(files)))
    assert "Doe" not in repr(img.attrs) and "Doe" not in " ".join(items)  # the file-set's patient names


def sorted_by_normal_files(files: list[str]) -> list[str]:
    hdrs = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    iop = np.asarray(hdrs[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    return [f for _, f in sorted(zip([np.dot(np.asarray(h.ImagePositionPatient, float), normal) for h in hdrs], files))]


def test_dicomdir_written_by_pydicom_lists_its_series_and_refuses_missing_files(tmp_path):
    from pydicom.fileset import FileSet

    series = make_study(tmp_path / "src")
    fileset = FileSet()
    for s in series:
        for f in s.files:
            fileset.add(f)
    fileset.write(str(tmp_path / "media"))  # PS3.10 names (PT000000/ST000000/...), no .dcm suffix
    dicomdir = str(tmp_path / "media" / "DICOMDIR")
    items = expand_inputs(dicomdir)
    assert sorted(item_stem(i) for i in items) == sorted(s.series_uid for s in series)
    for item in items:
        match = [s for s in series if s.series_uid == item_stem(item)][0]
        np.testing.assert_array_equal(open_image(item).data.compute(), match.hu)
    assert len(expand_inputs(str(tmp_path / "media"))) == 3  # the folder holding it: the same series
    victim = fileset_series(dicomdir)[series[1].series_uid][0]
    os.remove(victim)
    with pytest.raises(InputError, match=r"DICOMDIR.*1 referenced file\(s\) missing .*" + os.path.basename(victim)):
        expand_inputs(dicomdir)
    # a Referenced File ID climbing out of the file-set's folder is refused, not followed
    ds = pydicom.dcmread(dicomdir)
    record = next(r for r in ds.DirectoryRecordSequence if "ReferencedFileID" in r)
    with warnings.catch_warnings():  # pydicom warns that these are not valid CS values
        warnings.simplefilter("ignore", UserWarning)
        record.ReferencedFileID = ["..", "src", "series0", os.path.basename(series[0].files[0])]
    ds.save_as(dicomdir)
    with pytest.raises(InputError, match="outside its folder"):
        expand_inputs(dicomdir)


def test_siemens_mosaic_is_refused_not_read_as_one_slice():
    nibabel = pytest.importorskip("nibabel")

    path = os.path.join(os.path.dirname(nibabel.__file__), "nicom", "tests", "data", "0.dcm")
    assert "MOSAIC" in pydicom.dcmread(path, stop_before_pixels=True).ImageType  # nibabel's real Siemens mosaic
    with pytest.raises(InputError, match=r"'0.dcm' are Siemens mosaics"):
        open_image(path)
