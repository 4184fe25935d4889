"""DICOM series in -> DICOM SEG + NIfTI out, end to end through the real reader, geometry checked."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import tileseg
from tileseg import geometry
from tileseg.testing.dicom import PHANTOM_TISSUES, phantom_labels, write_ct_series
from tileseg.testing.synthetic import dice

pytest.importorskip("pydicom")
pytest.importorskip("nibabel")
hd = pytest.importorskip("highdicom")


ROOT = Path(__file__).resolve().parents[1]


def source_positions(folder: Path) -> dict[str, list[float]]:
    """ImagePositionPatient of each source instance by SOPInstanceUID (pydicom, not tileseg)."""
    import pydicom

    out = {}
    for f in folder.iterdir():
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        out[ds.SOPInstanceUID] = [float(v) for v in ds.ImagePositionPatient]
    return out


def series_ras_affine(folder: Path) -> np.ndarray:
    """The NIfTI (RAS) affine of a series from its headers alone: index (column, row, slice) -> RAS."""
    import pydicom

    hdrs = [pydicom.dcmread(f, stop_before_pixels=True) for f in folder.iterdir()]
    iop = np.asarray(hdrs[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    hdrs.sort(key=lambda h: float(np.dot(np.asarray(h.ImagePositionPatient, dtype=float), normal)))
    ipp = [np.asarray(h.ImagePositionPatient, dtype=float) for h in hdrs]
    dy, dx = (float(v) for v in hdrs[0].PixelSpacing)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1] = iop[:3] * dx, iop[3:] * dy
    lps[:3, 2] = (ipp[-1] - ipp[0]) / (len(ipp) - 1)
    lps[:3, 3] = ipp[0]
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def check_seg(seg_path: str, folder: Path, sops: list[str], expected: np.ndarray, labels: list[str]) -> None:
    """The SEG re-read with highdicom: segment labels, one frame per non-empty (slice, segment), each
    frame referencing its source instance, at that instance's position, holding ``expected == segment``."""
    seg = hd.seg.segread(seg_path)
    assert [seg.get_segment_description(k).SegmentLabel for k in range(1, len(labels) + 1)] == labels
    positions = source_positions(folder)
    frames = seg.PerFrameFunctionalGroupsSequence
    assert len(frames) == sum(int((expected == k).any(axis=(1, 2)).sum()) for k in range(1, len(labels) + 1))
    pixels = seg.pixel_array if seg.pixel_array.ndim == 3 else seg.pixel_array[None]
    for frame, plane in zip(frames, pixels):
        ref = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        ident = frame if "SegmentIdentificationSequence" in frame else seg.SharedFunctionalGroupsSequence[0]
        segment = int(ident.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        pos = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(pos, positions[ref], atol=1e-3)
        np.testing.assert_array_equal(plane.astype(bool), expected[sops.index(ref)] == segment)
    if shutil.which("dciodvfy"):
        out = subprocess.run(["dciodvfy", seg_path], capture_output=True, text=True)
        errors = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]
        assert not errors, errors


def test_dicom_series_to_seg_and_nifti(tmp_path):
    import nibabel as nib

    series = write_ct_series(tmp_path / "ct", shape=(24, 48, 40), spacing=(2.0, 0.8, 0.7),
                             orientation=(0.9848, 0.1736, 0, -0.1736, 0.9848, 0))  # oblique, shuffled files
    (tmp_path / "p.yaml").write_text(
        "version: 1\ninput: {path: ct}\nmethod: {fixed_physical: {threshold: 300}}\n"
        "outputs: [{path: 'out/{stem}_seg.dcm', writer: dicom_seg}, {path: 'out/{stem}_seg.nii.gz', writer: nifti}]\n")
    report = tileseg.run(tmp_path / "p.yaml", scheduler="synchronous")
    item = report.items[0]
    assert item.status == "ok", item.error
    seg_path, nii_path = item.outputs
    img = tileseg.open(tmp_path / "ct")
    expected = series.hu > 300
    check_seg(seg_path, tmp_path / "ct", img.attrs["dicom"]["SOPInstanceUIDs"], expected, ["foreground"])
    # NIfTI: the reader's geometry as a RAS affine, and the same labels
    nii = nib.load(nii_path)
    lps = np.asarray(geometry.world_affine(img.spacing, img.origin, img.direction))
    np.testing.assert_allclose(nii.affine, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps, atol=1e-4)
    np.testing.assert_allclose(nii.affine, series_ras_affine(tmp_path / "ct"), atol=1e-3)
    np.testing.assert_array_equal(np.asanyarray(nii.dataobj).transpose(2, 1, 0), expected.astype(np.uint8))


def test_ct_example_model_and_threshold_pipelines_find_the_phantoms_anatomy(tmp_path):
    """pipelines/ct_model.yaml (the bundled 3D U-Net) and pipelines/ct_bone.yaml (HU threshold) as shipped,
    on a smaller phantom series in the repository layout they expect."""
    pytest.importorskip("torch")
    import nibabel as nib

    shape = (40, 96, 88)
    folder = tmp_path / "data" / "dicom" / "study" / "series1"
    write_ct_series(folder, shape=shape, spacing=(1.25, 0.7, 0.7))  # what examples/make_dicom_demo_data.py writes
    shutil.copytree(ROOT / "pipelines", tmp_path / "pipelines")
    shutil.copytree(ROOT / "examples" / "models", tmp_path / "examples" / "models")
    anatomy = phantom_labels(shape)  # slices are written along the normal, so sorted order is k
    names = [name for name, _ in PHANTOM_TISSUES]
    img = tileseg.open(folder)
    sops = img.attrs["dicom"]["SOPInstanceUIDs"]
    # the threshold: bone exactly
    report = tileseg.run(tmp_path / "pipelines" / "ct_bone.yaml", scheduler="threads")
    assert report.ok, report.items[0].error
    seg_path, nii_path = report.items[0].outputs
    bone = anatomy == names.index("bone")
    nii = nib.load(nii_path)
    np.testing.assert_array_equal(np.asanyarray(nii.dataobj).transpose(2, 1, 0), bone.astype(np.uint8))
    np.testing.assert_allclose(nii.affine, series_ras_affine(folder), atol=1e-3)
    check_seg(seg_path, folder, sops, bone.astype(np.uint8), ["foreground"])
    # the model: bone and soft tissue, Dice against the anatomy
    report = tileseg.run(tmp_path / "pipelines" / "ct_model.yaml", scheduler="threads")
    assert report.ok, report.items[0].error
    seg_path, nii_path = report.items[0].outputs
    nii = nib.load(nii_path)
    labels = np.asanyarray(nii.dataobj).transpose(2, 1, 0)
    np.testing.assert_allclose(nii.affine, series_ras_affine(folder), atol=1e-3)
    scores = {name: dice(labels == k, anatomy == names.index(name)) for k, name in ((1, "bone"), (2, "soft_tissue"))}
    assert scores["bone"] > 0.95 and scores["soft_tissue"] > 0.8, scores
    check_seg(seg_path, folder, sops, labels, ["bone", "soft_tissue"])


def test_no_patient_identifier_in_logs_reports_names_or_non_dicom_outputs(tmp_path, caplog):
    """The phantom's PatientName/PatientID appear nowhere but in the DICOM SEG (which copies them by design)."""
    import logging

    import nibabel as nib

    from tileseg.readers.nifti import tileseg_record

    write_ct_series(tmp_path / "study" / "a", shape=(10, 24, 20), seed=1)
    write_ct_series(tmp_path / "study" / "b", shape=(8, 24, 20), seed=2)
    (tmp_path / "p.yaml").write_text(
        "version: 1\ninput: {path: study}\nmethod: {fixed_physical: {threshold: 300}}\n"
        "outputs: [{path: 'out/{stem}.dcm', writer: dicom_seg}, {path: 'out/{stem}.nii.gz', writer: nifti},\n"
        "          {path: 'out/{stem}.zarr', writer: zarr}]\n")
    with caplog.at_level(logging.DEBUG):
        report = tileseg.run(tmp_path / "p.yaml", scheduler="synchronous")
    assert report.ok and len(report.items) == 2, [i.error for i in report.items]
    secrets = ("Phantom", "Secret", "SECRET-ID-42", "19700101")
    texts = [r.getMessage() for r in caplog.records] + [str(report.to_dict())]
    for root, _dirs, files in os.walk(tmp_path / "out"):
        texts.append(root)
        texts += files
        for name in files:
            if name.endswith((".json", ".zattrs", "zarr.json")):
                texts.append(Path(root, name).read_text())
    for nii_path in (tmp_path / "out").glob("*.nii.gz"):
        header = nib.load(nii_path).header
        texts += [str(tileseg_record(header)), str(header["descrip"]), str(header["intent_name"])]
    for secret in secrets:
        assert not [t for t in texts if secret in t], secret
    seg = hd.seg.segread(next((tmp_path / "out").glob("*.dcm")))
    assert str(seg.PatientID) == "SECRET-ID-42"  # the SEG does carry the patient module, as DICOM requires
