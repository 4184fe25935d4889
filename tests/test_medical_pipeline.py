"""DICOM series in -> DICOM SEG + NIfTI out, end to end through the real reader, geometry checked."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

import tileseg
from tileseg import geometry
from tileseg.testing.dicom import write_ct_series

pytest.importorskip("pydicom")
pytest.importorskip("nibabel")
hd = pytest.importorskip("highdicom")


def test_dicom_series_to_seg_and_nifti(tmp_path):
    import nibabel as nib
    import pydicom

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
    # the SEG references each source slice at its own position, and its frames hold the mask
    seg = hd.seg.segread(seg_path)
    by_sop = {}
    for f in (tmp_path / "ct").iterdir():
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        by_sop[ds.SOPInstanceUID] = [float(v) for v in ds.ImagePositionPatient]
    sops = img.attrs["dicom"]["SOPInstanceUIDs"]
    frames = seg.PerFrameFunctionalGroupsSequence
    assert len(frames) == int(expected.any(axis=(1, 2)).sum())  # empty slices omitted
    pixels = seg.pixel_array if seg.pixel_array.ndim == 3 else seg.pixel_array[None]
    for frame, plane in zip(frames, pixels):
        ref = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        pos = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(pos, by_sop[ref], atol=1e-3)
        np.testing.assert_array_equal(plane.astype(bool), expected[sops.index(ref)])
    # NIfTI: the reader's geometry as a RAS affine, and the same labels
    nii = nib.load(nii_path)
    lps = np.asarray(geometry.world_affine(img.spacing, img.origin, img.direction))
    np.testing.assert_allclose(nii.affine, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps, atol=1e-4)
    np.testing.assert_array_equal(np.asanyarray(nii.dataobj).transpose(2, 1, 0), expected.astype(np.uint8))
    if shutil.which("dciodvfy"):
        out = subprocess.run(["dciodvfy", seg_path], capture_output=True, text=True)
        errors = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]
        assert not errors, errors
