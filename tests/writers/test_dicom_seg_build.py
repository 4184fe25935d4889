"""The streamed SEG equals highdicom's own build from the whole array, attribute for attribute and byte for byte."""

from __future__ import annotations

import math
from collections import Counter

import dask.array as da
import numpy as np
import pytest

hd = pytest.importorskip("highdicom", reason="the dicom_seg writer needs the 'medical' extra")

import pydicom  # noqa: E402
from pydicom.sr.codedict import codes  # noqa: E402

import tileseg  # noqa: E402
from tileseg.testing.dicom_series import series_image, write_ct_series  # noqa: E402
from tileseg.writers import dicom_seg_frames, get_writer  # noqa: E402

#: Differ between two builds of the same SEG: creation and contribution times and highdicom's fresh DimensionOrganizationUID.
VOLATILE = {"00080012", "00080013", "00080023", "00080033", "0018A002", "00209164"}


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    return write_ct_series(str(tmp_path_factory.mktemp("ct") / "series"), shape=(7, 16, 20), seed=5)


@pytest.fixture(scope="module")
def odd_series(tmp_path_factory):
    """Frames of 15 x 13 = 195 pixels: BINARY frames start mid-byte."""
    return write_ct_series(str(tmp_path_factory.mktemp("odd") / "series"), shape=(9, 15, 13), seed=8)


def highdicom_build(series, written, pixel_array, labels, binary):
    """highdicom's Segmentation of the whole ``pixel_array``, with the writer's parameters and UIDs."""
    algorithm = hd.AlgorithmIdentificationSequence(name="tileseg", version=tileseg.__version__[:64],
                                                   family=codes.DCM.ImageProcessing)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=k, segment_label=label, segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm)
        for k, label in enumerate(labels, start=1)
    ]
    seg = hd.seg.Segmentation(
        source_images=[pydicom.dcmread(f, stop_before_pixels=True) for f in series.files],
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY if binary else hd.seg.SegmentationTypeValues.FRACTIONAL,
        segment_descriptions=descriptions, series_instance_uid=written.SeriesInstanceUID, series_number=9901,
        sop_instance_uid=written.SOPInstanceUID, instance_number=1, manufacturer="tileseg",
        manufacturer_model_name="tileseg", software_versions=tileseg.__version__[:64], device_serial_number="0",
        content_label="TILESEG", content_description="tileseg segmentation", omit_empty_frames=True)
    seg.SeriesDescription = "tileseg segmentation"
    return seg


def comparable(node):
    """``to_json_dict`` of a dataset without pixel data, private tags and :data:`VOLATILE` values."""
    if isinstance(node, dict):
        return {k: comparable(v) for k, v in node.items()
                if k not in VOLATILE and k != "7FE00010" and not k.startswith("0011")}
    if isinstance(node, list):
        return [comparable(v) for v in node]
    return node


def assert_same_seg(ours_path, theirs, tmp_path):
    theirs.save_as(str(tmp_path / "highdicom.dcm"), enforce_file_format=True)
    ours = pydicom.dcmread(str(ours_path))
    ref = pydicom.dcmread(str(tmp_path / "highdicom.dcm"))
    assert comparable(ours.to_json_dict()) == comparable(ref.to_json_dict())
    assert ours.file_meta.TransferSyntaxUID == ref.file_meta.TransferSyntaxUID
    frames, rows, cols = int(ref.NumberOfFrames), int(ref.Rows), int(ref.Columns)
    used = math.ceil(frames * rows * cols / 8) if ref.BitsAllocated == 1 else frames * rows * cols
    assert len(ours.PixelData) == len(ref.PixelData) == used + used % 2
    assert ours.PixelData[:used] == ref.PixelData[:used]  # highdicom pads an odd length with b"0", we with b"\0"
    back = hd.seg.segread(str(ours_path))
    np.testing.assert_array_equal(back.pixel_array, hd.seg.segread(str(tmp_path / "highdicom.dcm")).pixel_array)
    return ours


def class_map(series, top=3):
    lab = np.clip((series.volume.astype(np.int32) + 200) // 300, 0, top).astype(np.uint8)
    return lab


@pytest.mark.parametrize("case", ["three_classes", "one_segment_gaps", "no_names", "all_empty"])
def test_binary_equals_highdicom_full_build(series, tmp_path, case, monkeypatch):
    monkeypatch.setattr(dicom_seg_frames, "BATCH_PIXELS", 2 * 16 * 20)  # batches of two frames
    image = series_image(series)
    names = ("background", "fat", "soft tissue", "bone")
    lab = class_map(series)
    if case == "one_segment_gaps":
        lab = (lab == 3).astype(np.uint8)
        lab[4] = 0  # an omitted frame inside the volume: not a regular 3D stack any more
        names = ("background", "bone")
    elif case == "no_names":
        names = None
    elif case == "all_empty":
        lab = np.zeros_like(lab)
    out = tmp_path / "seg.dcm"
    get_writer("dicom_seg").write(image.with_data(da.from_array(lab, chunks=(3, -1, -1)), class_names=names),
                                  str(out), options={"slab": 2})
    labels = list(names[1:]) if names else ["class 1", "class 2", "class 3"]
    theirs = highdicom_build(series, pydicom.dcmread(str(out), stop_before_pixels=True), lab, labels, True)
    ours = assert_same_seg(out, theirs, tmp_path)
    if case == "all_empty":
        assert ours.NumberOfFrames == lab.shape[0] * 3  # highdicom keeps every frame of an empty SEG
    else:
        assert ours.NumberOfFrames < lab.shape[0] * len(labels)  # some frames omitted


def test_binary_frames_starting_mid_byte(odd_series, tmp_path, monkeypatch):
    monkeypatch.setattr(dicom_seg_frames, "BATCH_PIXELS", 3 * 195)
    image = series_image(odd_series)
    lab = class_map(odd_series, top=2)
    lab[3] = 0
    out = tmp_path / "seg.dcm"
    names = ("background", "a", "b")
    get_writer("dicom_seg").write(image.with_data(da.from_array(lab, chunks=(4, -1, -1)), class_names=names),
                                  str(out), options={"slab": 4})
    theirs = highdicom_build(odd_series, pydicom.dcmread(str(out), stop_before_pixels=True), lab, ["a", "b"], True)
    ours = assert_same_seg(out, theirs, tmp_path)
    assert (ours.NumberOfFrames * 195) % 8 != 0


@pytest.mark.parametrize("channels", [False, True])
def test_fractional_equals_highdicom_full_build(series, tmp_path, channels, monkeypatch):
    monkeypatch.setattr(dicom_seg_frames, "BATCH_PIXELS", 3 * 16 * 20)
    image = series_image(series)
    rng = np.random.default_rng(1)
    prob = np.clip((series.volume.astype(np.float32) + 200) / 1000, 0, 1)
    prob[1] = 0
    prob[2] = np.where(prob[2] > 0, 1e-3, 0)  # non-zero, but 0 once rounded to 8 bits: plane kept, frame omitted
    if channels:
        other = rng.random(prob.shape).astype(np.float32) * (prob > 0.5)
        stack = np.stack([1 - prob, prob, other])
        data, names, pixel_array = stack, ("background", "tissue", "other"), np.moveaxis(stack[1:], 0, -1)
    else:
        data, names, pixel_array = prob, None, prob
    out = tmp_path / "p.dcm"
    chunks = (-1, 2, -1, -1) if channels else (2, -1, -1)
    img = image.with_data(da.from_array(data, chunks=chunks), axes=("c", "z", "y", "x") if channels else None,
                          class_names=names)
    get_writer("dicom_seg").write(img, str(out), options={"segmentation_type": "fractional", "slab": 3})
    labels = list(names[1:]) if channels else ["foreground"]
    theirs = highdicom_build(series, pydicom.dcmread(str(out), stop_before_pixels=True), pixel_array, labels, False)
    assert_same_seg(out, theirs, tmp_path)


def test_store_read_once_per_segment_for_segment_major_frames(series, tmp_path, monkeypatch):
    """The finalize holds one slab at a time: read once by the scan, then at most once per segment."""
    reads = []
    original = dicom_seg_frames._read_slab

    def counting(handle, arr, z0):
        reads.append(z0)
        return original(handle, arr, z0)

    monkeypatch.setattr(dicom_seg_frames, "_read_slab", counting)
    lab = class_map(series)
    names = ("background", "fat", "soft tissue", "bone")
    image = series_image(series).with_data(da.from_array(lab, chunks=(2, -1, -1)), class_names=names)
    get_writer("dicom_seg").write(image, str(tmp_path / "s.dcm"), options={"slab": 2})
    assert reads[:4] == [0, 2, 4, 6]  # the scan
    counts = Counter(reads[4:])  # the pixels: highdicom orders frames segment by segment
    assert set(counts) == {0, 2, 4, 6} and max(counts.values()) <= 3, reads
