"""DICOM SEG writer: references, positions and pixels read back by highdicom, completion, privacy, pipelines."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess

import dask.array as da
import numpy as np
import pytest

hd = pytest.importorskip("highdicom", reason="the dicom_seg writer needs the 'medical' extra")

import pydicom  # noqa: E402

import tileseg  # noqa: E402
from tileseg.errors import OutputError  # noqa: E402
from tileseg.testing.dicom_series import PATIENT, series_image, write_ct_series  # noqa: E402
from tileseg.writers import get_writer, is_complete  # noqa: E402
from tileseg.writers.dicom_seg import scrub  # noqa: E402

NAMES = ("background", "soft tissue", "bone")
COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
          "StudyTime", "StudyID", "AccessionNumber", "FrameOfReferenceUID")


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    return write_ct_series(str(tmp_path_factory.mktemp("ct") / "series"), shape=(6, 16, 20), seed=3)


def labels_of(series):
    vol = series.volume
    lab = (vol > 300).astype(np.uint8) + (vol > 600)
    return lab


def class_map_image(series, chunks=(2, -1, -1)):
    image = series_image(series)
    lab = labels_of(series)
    return lab, image.with_data(da.from_array(lab, chunks=chunks), class_names=NAMES)


def frame_facts(seg):
    """(slice index by position, segment number, referenced SOP instance UID, position) of each frame."""
    out = []
    for fg in seg.PerFrameFunctionalGroupsSequence:
        ref = fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        pos = np.array([float(v) for v in fg.PlanePositionSequence[0].ImagePositionPatient])
        ident = fg.get("SegmentIdentificationSequence") or seg.SharedFunctionalGroupsSequence[0].SegmentIdentificationSequence
        out.append((ident[0].ReferencedSegmentNumber, str(ref), pos))  # shared when there is one segment
    return out


def test_seg_references_positions_pixels_labels_and_patient(series, tmp_path):
    lab, image = class_map_image(series)
    out = tmp_path / "seg.dcm"
    get_writer("dicom_seg").write(image, str(out), options={"slab": 2})
    assert os.listdir(tmp_path) == ["seg.dcm"]  # partial folder removed
    seg = hd.seg.segread(str(out))
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["soft tissue", "bone"]
    assert seg.SegmentationType == "BINARY"
    facts = frame_facts(seg)
    frames = seg.pixel_array if seg.NumberOfFrames > 1 else seg.pixel_array[None]
    seen = set()
    for (number, ref, pos), frame in zip(facts, frames, strict=True):
        k = series.sop_instance_uids.index(ref)  # the referenced source slice ...
        np.testing.assert_allclose(pos, series.positions[k], atol=1e-4)  # ... is the one at that position
        np.testing.assert_array_equal(frame, lab[k] == number)
        seen.add((k, number))
    expected = {(k, n) for k in range(lab.shape[0]) for n in (1, 2) if (lab[k] == n).any()}
    assert seen == expected and (1, 1) not in seen  # empty frames omitted (slice 1 is all air)
    src = pydicom.dcmread(series.files[0], stop_before_pixels=True)
    for key in COPIED:
        assert str(seg.get(key)) == str(src.get(key)), key
    assert is_complete(str(out), writer="dicom_seg")


def test_fractional_probabilities(series, tmp_path):
    image = series_image(series)
    prob = np.clip((series.volume.astype(np.float32) + 200) / 1000, 0, 1)
    prob[1] = 0
    out = tmp_path / "p.dcm"
    get_writer("dicom_seg").write(image.with_data(da.from_array(prob, chunks=(3, -1, -1))), str(out),
                                  options={"segmentation_type": "fractional"})
    seg = hd.seg.segread(str(out))
    assert seg.SegmentationType == "FRACTIONAL" and seg.NumberOfFrames == prob.shape[0] - 1
    for (_, ref, _), frame in zip(frame_facts(seg), seg.pixel_array, strict=True):
        k = series.sop_instance_uids.index(ref)
        np.testing.assert_allclose(frame / 255.0, prob[k], atol=1 / 255)


def test_refuses_images_without_or_with_mismatched_references(series, tmp_path):
    lab, image = class_map_image(series)
    writer = get_writer("dicom_seg")
    bare = image.with_data(image.data)
    object.__setattr__(bare, "attrs", {})
    with pytest.raises(OutputError, match="a.dcm.*attrs\\['dicom'\\]"):
        writer.write(bare, str(tmp_path / "a.dcm"))
    short = image.with_data(image.data[:-1])
    with pytest.raises(OutputError, match="b.dcm.*5 slices.*6 files"):
        writer.write(short, str(tmp_path / "b.dcm"))
    assert os.listdir(tmp_path) == []


def test_write_task_is_idempotent(series, tmp_path):
    import dask
    import zarr

    lab, image = class_map_image(series, chunks=(4, -1, -1))
    writer = get_writer("dicom_seg")
    handle = writer.prepare(image, str(tmp_path / "s.dcm"), slab=2)
    task = writer.write_task(handle, image)
    dask.compute(task)
    store = os.path.join(handle.target, "slabs.zarr")
    first = zarr.open_array(store, mode="r")[:]
    dask.compute(task)
    np.testing.assert_array_equal(zarr.open_array(store, mode="r")[:], first)
    np.testing.assert_array_equal(first, lab)
    writer.finalize(handle)
    assert is_complete(str(tmp_path / "s.dcm"), writer="dicom_seg")


@pytest.mark.parametrize("block_z, target, slab", [(3, None, 3), (4, None, 4), (4, 2 * 16 * 20, 2), (5, 4 * 320, 1)])
def test_default_slabs_divide_the_blocks(series, tmp_path, monkeypatch, block_z, target, slab):
    """Each block boundary is a slab boundary (a slab never gathers two layers of blocks), as in the NIfTI writer."""
    import tileseg.writers.dicom_seg as mod

    if target is not None:  # bytes of `target // 320` uint8 slices of 16 x 20
        monkeypatch.setattr(mod, "TARGET_SLAB_BYTES", target)
    lab, image = class_map_image(series, chunks=(block_z, -1, -1))
    out = tmp_path / "s.dcm"
    writer = get_writer("dicom_seg")
    handle = writer.prepare(image, str(out))
    assert handle.chunks[-3] == slab
    block_edges = set(np.cumsum(image.data.chunks[0]).tolist())
    slab_edges = set(range(slab, lab.shape[0], slab)) | {lab.shape[0]}
    assert block_edges <= slab_edges
    import dask

    dask.compute(writer.write_task(handle, image))
    writer.finalize(handle)
    seg = hd.seg.segread(str(out))
    frames = seg.pixel_array if seg.NumberOfFrames > 1 else seg.pixel_array[None]
    for (number, ref, _), frame in zip(frame_facts(seg), frames, strict=True):
        np.testing.assert_array_equal(frame, lab[series.sop_instance_uids.index(ref)] == number)


def test_failures_leave_nothing_at_the_final_path(series, tmp_path):
    lab, image = class_map_image(series)

    def boom(block, block_info=None):
        if block_info[0]["chunk-location"][0] == 1:
            raise RuntimeError("boom")
        return block

    bad = image.with_data(image.data.map_blocks(boom, dtype=image.dtype))
    with pytest.raises(RuntimeError, match="boom"):
        get_writer("dicom_seg").write(bad, str(tmp_path / "out" / "x.dcm"))
    assert os.listdir(tmp_path / "out") == []
    # a source file gone at finalize: OutputError naming it, nothing at the final path
    copy = tmp_path / "copy"
    shutil.copytree(series.folder, copy)
    image2 = image.with_data(image.data)
    refs = dict(image2.attrs["dicom"], files=[str(copy / os.path.basename(f)) for f in series.files])
    object.__setattr__(image2, "attrs", {"dicom": refs})
    writer = get_writer("dicom_seg")
    job = writer.write(image2, str(tmp_path / "out" / "y.dcm"), compute=False)
    import dask

    dask.compute(job.task)
    os.remove(refs["files"][3])
    with pytest.raises(OutputError, match="source slice 3"):
        writer.finalize(job.handle)
    writer.abort(job.handle)
    assert os.listdir(tmp_path / "out") == []


def test_pixel_data_over_the_dicom_limit_warns_early_and_fails_clearly(series, tmp_path, monkeypatch, caplog):
    """DICOM's 32-bit Pixel Data length: a warning at prepare when a dense SEG would not fit, an exact check at finalize."""
    import tileseg.writers.dicom_seg as mod

    lab, image = class_map_image(series)
    frames = sum(int((lab[z] == k).any()) for k in (1, 2) for z in range(lab.shape[0]))
    actual = mod.pixel_data_bytes(frames, 16, 20, "binary")
    assert frames < 2 * lab.shape[0]  # some frames are empty: the bound at prepare is above the exact size
    monkeypatch.setattr(mod, "MAX_PIXEL_BYTES", actual)  # fits exactly: written, after an early warning
    with caplog.at_level(logging.WARNING, logger="tileseg.writers.dicom_seg"):
        get_writer("dicom_seg").write(image, str(tmp_path / "out" / "fits.dcm"))
    assert "over DICOM's 4 GiB" in caplog.text
    assert hd.seg.segread(str(tmp_path / "out" / "fits.dcm")).NumberOfFrames == frames
    monkeypatch.setattr(mod, "MAX_PIXEL_BYTES", actual - 1)
    with pytest.raises(OutputError, match=rf"too\.dcm.*{frames} frames of 16 x 20.*over the 4 GiB"):
        get_writer("dicom_seg").write(image, str(tmp_path / "out" / "too.dcm"))
    assert sorted(os.listdir(tmp_path / "out")) == ["fits.dcm"]  # nothing at the final path, no partial left


def test_foreign_dicom_never_complete_nor_replaced_without_overwrite(series, tmp_path):
    _, image = class_map_image(series)
    out = tmp_path / "seg.dcm"
    shutil.copy(series.files[0], out)
    assert not is_complete(str(out), writer="dicom_seg")
    writer = get_writer("dicom_seg")
    with pytest.raises(OutputError, match="already exists \\(a DICOM file\\)"):
        writer.write(image, str(out))
    writer.write(image, str(out), overwrite=True)
    assert is_complete(str(out), writer="dicom_seg")
    with pytest.raises(OutputError, match="finished tileseg output"):
        writer.write(image, str(out))
    text = tmp_path / "notes.dcm"
    text.write_text("not dicom")
    assert not is_complete(str(text), writer="dicom_seg")
    with pytest.raises(OutputError, match="not a DICOM file"):
        writer.write(image, str(text), overwrite=True)
    assert text.read_text() == "not dicom"


def test_no_patient_identifiers_in_logs_or_errors(series, tmp_path, caplog):
    lab, image = class_map_image(series)
    caplog.set_level(logging.DEBUG)
    messages = []
    get_writer("dicom_seg").write(image, str(tmp_path / "ok.dcm"))
    bad_labels = image.with_data(image.data, class_names=NAMES[:2])  # label 2 without a name
    for img, path in [(bad_labels, "bad.dcm"), (image.with_data(image.data[:-1]), "short.dcm")]:
        with pytest.raises(OutputError) as err:
            get_writer("dicom_seg").write(img, str(tmp_path / path))
        messages.append(str(err.value))
    assert "label 2" in messages[0]
    text = "\n".join(messages + [r.getMessage() for r in caplog.records])
    for value in PATIENT.values():
        if len(value) > 1:
            assert value not in text
    src = pydicom.dcmread(series.files[0], stop_before_pixels=True)
    said = scrub(f"patient {src.PatientName!r} id {src.PatientID} born {src.PatientBirthDate}", [src])
    assert all(v not in said for v in (PATIENT["PatientName"], PATIENT["PatientID"], PATIENT["PatientBirthDate"]))
    assert said.count("<redacted>") == 3


def test_pipeline_zarr_copy_of_series_to_seg_and_nifti(series, tmp_path):
    nib = pytest.importorskip("nibabel")
    image = series_image(series)
    tileseg.write(image, str(tmp_path / "ct.zarr"))
    assert tileseg.open(str(tmp_path / "ct.zarr")).attrs["dicom"] == image.attrs["dicom"]  # attrs round-trip
    pipeline = {"version": 1, "input": {"path": str(tmp_path / "ct.zarr")},
                "method": {"fixed_physical": {"threshold": 300, "slope": 1, "intercept": 0}},
                "outputs": [{"path": str(tmp_path / "out" / "{stem}.dcm"), "writer": "dicom_seg"},
                            {"path": str(tmp_path / "out" / "{stem}.nii.gz"), "writer": "nifti"}]}
    report = tileseg.run(pipeline, scheduler="synchronous")
    assert report.ok, report.items[0].error
    fg = (series.volume > 300).astype(np.uint8)
    seg = hd.seg.segread(str(tmp_path / "out" / "ct.dcm"))
    assert seg.NumberOfFrames == int(fg.any(axis=(1, 2)).sum())
    for (number, ref, _), frame in zip(frame_facts(seg), seg.pixel_array, strict=True):
        assert number == 1
        np.testing.assert_array_equal(frame, fg[series.sop_instance_uids.index(ref)])
    back = nib.load(str(tmp_path / "out" / "ct.nii.gz"))
    np.testing.assert_array_equal(np.asanyarray(back.dataobj).transpose(2, 1, 0), fg)
    again = tileseg.run(pipeline, scheduler="synchronous")  # both outputs recorded complete: skipped
    assert again.ok and again.items[0].status == "skipped"


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (Debian dicom3tools) is not installed")
@pytest.mark.parametrize("kind", ["binary", "fractional"])
def test_dciodvfy_reports_no_errors(series, tmp_path, kind):
    _, image = class_map_image(series)
    if kind == "fractional":
        prob = np.clip((series.volume.astype(np.float32) + 200) / 1000, 0, 1)
        image = image.with_data(da.from_array(prob, chunks=(3, -1, -1)), class_names=None)
    out = tmp_path / "seg.dcm"
    get_writer("dicom_seg").write(image, str(out), options={"segmentation_type": kind, "slab": 2})
    result = subprocess.run(["dciodvfy", str(out)], capture_output=True, text=True, timeout=60)
    text = result.stdout + result.stderr
    errors = [line for line in text.splitlines() if "Error" in line]
    assert not errors, text
    # allowed warnings: only tileseg's private block (dciodvfy does not know its tags)
    warnings = [line for line in text.splitlines() if "Warning" in line]
    assert all(line.startswith("(0x0011,") for line in warnings), text


def test_highdicom_errors_are_scrubbed_of_patient_identifiers(series, tmp_path, monkeypatch):
    from tileseg.writers import dicom_seg_build

    def leaky(handle, sources, occupancy):
        src = sources[0]
        raise ValueError(f"patient {src.PatientName} ({src.PatientID}, {src.PatientBirthDate}) does not match")

    monkeypatch.setattr(dicom_seg_build, "build_skeleton", leaky)
    _, image = class_map_image(series)
    with pytest.raises(OutputError) as err:
        get_writer("dicom_seg").write(image, str(tmp_path / "x.dcm"))
    text = str(err.value)
    assert "x.dcm" in text and "ValueError" in text and text.count("<redacted>") == 3, text
    assert err.value.__cause__ is None and err.value.__suppress_context__  # the raw message is not chained
    assert not os.path.exists(tmp_path / "x.dcm")


def test_sources_without_type2_patient_and_study_attributes(series, tmp_path):
    """Anonymised series often drop Type 2 attributes (birth date, sex, study date ...): the SEG gets them empty."""
    src = tmp_path / "anon"
    shutil.copytree(os.path.dirname(series.files[0]), src)
    missing = ("PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
               "ReferringPhysicianName")
    for f in sorted(src.iterdir()):
        ds = pydicom.dcmread(f)
        for key in missing:
            if key in ds:
                delattr(ds, key)
        ds.save_as(f)
    lab = labels_of(series)
    image = tileseg.open(str(src))
    image = image.with_data(da.from_array(lab, chunks=(2, -1, -1)), class_names=NAMES)
    out = tmp_path / "seg.dcm"
    get_writer("dicom_seg").write(image, str(out), options={"slab": 2})
    seg = hd.seg.segread(str(out))
    for key in missing:
        assert key in seg and seg[key].value in (None, ""), key  # present (Type 2), empty
    assert str(seg.PatientID) == str(pydicom.dcmread(series.files[0], stop_before_pixels=True).PatientID)
    frames = seg.pixel_array if seg.NumberOfFrames > 1 else seg.pixel_array[None]
    facts = frame_facts(seg)
    for (number, ref, _), frame in zip(facts, frames, strict=True):
        np.testing.assert_array_equal(frame, lab[series.sop_instance_uids.index(ref)] == number)
