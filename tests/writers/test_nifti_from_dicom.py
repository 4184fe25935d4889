"""The NIfTI affine tileseg writes for a DICOM series equals what nibabel's DICOM wrappers compute.

Oracle: :mod:`nibabel.nicom.dicomwrappers` (``wrapper_from_file(...).affine``),
which maps nibabel's index ``(row, column, slice)`` to DICOM patient space
(LPS), per file (a single-frame file: one slice) or per volume (an enhanced
multi-frame file). tileseg's NIfTI index is ``(column, row, slice)`` and its
world RAS, so the test converts with a plain ``diag(-1, -1, 1, 1)`` and a
swap of the first two index columns, written out here and not taken from
tileseg. nibabel may step along the slice normal the other way (its normal
is ``cross(column cosines, row cosines)``): each tileseg slice is matched to
the nibabel slice at the same position, and the voxel values at that
position are compared too, so a flipped or shifted stack fails.

Files: our synthetic oblique series (non-unit spacing, shuffled files),
nibabel's shipped real MR files (a single slice with oblique orientation and
decimal rescale values; a Philips enhanced multi-frame MPRAGE volume, gzipped
in nibabel's tests data), and a real five-slice CT series of pydicom's test
file-set.
"""

from __future__ import annotations

import gzip
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
nib = pytest.importorskip("nibabel")
dicomwrappers = pytest.importorskip("nibabel.nicom.dicomwrappers")
if not hasattr(pydicom, "read_file") and "pydicom.read_file(" in Path(dicomwrappers.__file__).read_text("utf-8"):
    # nibabel < 5.2 (e.g. the declared floor 5.0) reads DICOM with pydicom.read_file, gone in pydicom 3
    pytest.skip(f"the oracle, nibabel {nib.__version__}'s nicom, cannot read DICOM with pydicom "
                f"{pydicom.__version__} (it calls pydicom.read_file)", allow_module_level=True)

from tileseg.readers import open_image  # noqa: E402
from tileseg.testing.dicom import write_ct_series  # noqa: E402
from tileseg.writers import get_writer  # noqa: E402

RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
SWAP_ROW_COL = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=float)


def nibabel_dir(*parts: str) -> Path:
    return Path(nib.__file__).parent.joinpath(*parts)


def wrapper(path: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # nibabel calls its DICOM readers experimental
        from nibabel.nicom.dicomwrappers import wrapper_from_file

        return wrapper_from_file(path)


def written_nifti(source: str, out: Path):
    """tileseg reads ``source`` and writes it as NIfTI; nibabel loads the file back."""
    image = open_image(source)
    get_writer("nifti").write(image, str(out))
    return nib.load(str(out))


def assert_same_voxels(nii, wrappers: list) -> None:
    """Every voxel of ``nii`` sits where nibabel puts a voxel of the same value.

    ``wrappers``: one nibabel wrapper per file (single-frame) or one for a multi-frame volume.
    """
    ours_lps = RAS_FROM_LPS @ nii.affine @ SWAP_ROW_COL  # index (row, column, slice) -> LPS
    ours = np.asanyarray(nii.dataobj)  # (column, row, slice)
    stacks = []
    for w in wrappers:
        data = np.asarray(w.get_data(), dtype=float)
        stacks += [(w.affine, data[..., s] if data.ndim == 3 else data, s) for s in range(data.shape[2] if data.ndim == 3 else 1)]
    assert ours.shape[2] == len(stacks)
    matched = set()
    for k in range(ours.shape[2]):
        centre = ours_lps @ [0.0, 0.0, k, 1.0]
        hits = [i for i, (aff, _, s) in enumerate(stacks) if np.allclose(np.linalg.solve(aff, centre)[:3], [0, 0, s],
                                                                         atol=1e-3)]
        assert len(hits) == 1, f"slice {k} at {centre[:3]} matches nibabel slices {hits}"
        aff, plane, s = stacks[hits[0]]
        # the in-plane steps equal nibabel's (row step, column step), in mm, exactly
        np.testing.assert_allclose(ours_lps[:3, :2], aff[:3, :2], atol=1e-4)
        np.testing.assert_allclose(ours[:, :, k].T, plane, rtol=1e-6, atol=1e-4)
        matched.add(hits[0])
    assert len(matched) == len(stacks)
    if ours.shape[2] > 1:  # the slice column is the step between neighbouring slices
        step = ours_lps @ [0.0, 0.0, 1.0, 0.0]
        first, second = (ours_lps @ [0.0, 0.0, k, 1.0] for k in (0, 1))
        np.testing.assert_allclose(step, second - first, atol=1e-6)


def test_synthetic_oblique_series(tmp_path):
    truth = write_ct_series(tmp_path / "ct", shape=(9, 20, 14), spacing=(3.25, 0.6, 0.9),
                            orientation=(0.8660254, 0.5, 0.0, -0.1294095, 0.2241439, -0.9659258))
    nii = written_nifti(str(tmp_path / "ct"), tmp_path / "ct.nii.gz")
    assert_same_voxels(nii, [wrapper(f) for f in truth.files])
    # nibabel's own voxel size along z (SliceThickness) equals the written slice step (IPP has 4 decimals)
    assert np.linalg.norm(nii.affine[:3, 2]) == pytest.approx(wrapper(truth.files[0]).voxel_sizes[2], rel=1e-5)


def test_real_single_mr_slice_from_nibabel(tmp_path):
    path = str(nibabel_dir("nicom", "tests", "data", "decimal_rescale.dcm"))
    nii = written_nifti(path, tmp_path / "mr.nii.gz")
    w = wrapper(path)
    assert_same_voxels(nii, [w])
    # one slice: the slice column is nibabel's slice-normal column up to its sign convention
    np.testing.assert_allclose(np.abs(RAS_FROM_LPS @ nii.affine)[:3, 2], np.abs(w.affine[:3, 2]), atol=1e-6)


def test_real_enhanced_multiframe_mr_from_nibabel(tmp_path):
    src = nibabel_dir("nicom", "tests", "data", "philips_mprage.dcm.gz")
    path = tmp_path / "philips_mprage.dcm"
    with gzip.open(src, "rb") as fin, open(path, "wb") as fout:
        shutil.copyfileobj(fin, fout)
    w = wrapper(str(path))
    assert type(w).__name__ == "MultiframeWrapper"
    if not hasattr(type(w), "frame_order"):  # older nibabel: affine from the first frame on file, data sorted otherwise
        pytest.skip("this nibabel's MultiframeWrapper does not sort frames by position (no frame_order)")
    nii = written_nifti(str(path), tmp_path / "mprage.nii.gz")
    assert_same_voxels(nii, [w])


def test_real_ct_series_from_pydicom_file_set(tmp_path):
    folder = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "98892001" / "CT5N"
    if not folder.is_dir():
        pytest.skip("pydicom's file-set test data is not installed")
    files = sorted(str(p) for p in folder.iterdir())
    nii = written_nifti(str(folder), tmp_path / "ct5.nii.gz")
    assert_same_voxels(nii, [wrapper(f) for f in files])
    assert os.path.basename(files[0]) not in repr(nii.header)  # no source path leaks into the header
