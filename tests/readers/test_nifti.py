"""NIfTI reader: lazy reads equal nibabel's, z-slab chunks, geometry (RAS -> LPS), real files, errors."""

from __future__ import annotations

import gzip
import os

import dask
import numpy as np
import pytest

nib = pytest.importorskip("nibabel", reason="the nifti reader needs the 'medical' extra")

from nibabel.testing import data_path  # noqa: E402

from tileseg.errors import ConfigError, FormatError, ImageNotFoundError, InputError  # noqa: E402
from tileseg.geometry import lps_from_ras_affine, world_affine  # noqa: E402
from tileseg.readers import open_image  # noqa: E402

RNG = np.random.default_rng(5)


def oblique_affine():
    """A rotated, anisotropic RAS affine with a flipped axis (orthogonal columns)."""
    a, b = np.deg2rad(25.0), np.deg2rad(-10.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    m = np.eye(4)
    m[:3, :3] = rz @ rx @ np.diag([0.7, -0.8, 2.5])
    m[:3, 3] = (-90.0, 12.5, 40.0)
    return m


def save(tmp_path, name, arr, affine=None, **hdr):
    img = nib.Nifti1Image(arr, oblique_affine() if affine is None else affine)
    for k, v in hdr.items():
        img.header[k] = v
    path = str(tmp_path / name)
    nib.save(img, path)
    return path


def check_geometry(image, path):
    ras = nib.load(path).affine
    got = world_affine(image.spacing, image.origin, image.direction)
    np.testing.assert_allclose(got, lps_from_ras_affine(ras), atol=1e-5)


@pytest.mark.parametrize("name", ["vol.nii", "vol.nii.gz"])
def test_3d_equals_nibabel_transposed_and_geometry(tmp_path, name):
    arr = RNG.integers(-1000, 3000, size=(23, 31, 17)).astype(np.int16)
    path = save(tmp_path, name, arr)
    image = open_image(path, chunks=4)
    assert image.format == "nifti" and image.axes == ("z", "y", "x")
    assert image.data.chunks[0] == (4, 4, 4, 4, 1) and image.data.chunks[1:] == ((31,), (23,))
    ref = np.asanyarray(nib.load(path).dataobj)
    np.testing.assert_array_equal(image.data.compute(), ref.transpose(2, 1, 0))
    check_geometry(image, path)
    assert image.units == ("millimeter",) * 3 or image.units == (None,) * 3


@pytest.mark.parametrize("name", ["vol4d.nii", "vol4d.nii.gz"])
def test_4d_volumes_become_channels(tmp_path, name):
    arr = RNG.random((9, 11, 7, 3)).astype(np.float32)
    path = save(tmp_path, name, arr)
    image = open_image(path)
    assert image.axes == ("c", "z", "y", "x") and image.shape == (3, 7, 11, 9)
    np.testing.assert_array_equal(image.data.compute(), np.asanyarray(nib.load(path).dataobj).transpose(3, 2, 1, 0))
    check_geometry(image, path)


def test_length_one_4th_dim_dropped_and_free_chunks_for_nii(tmp_path):
    arr = RNG.integers(0, 9, size=(12, 10, 8, 1)).astype(np.uint8)
    path = save(tmp_path, "one.nii", arr)
    image = open_image(path, chunks=(3, 4, 5))
    assert image.axes == ("z", "y", "x") and image.data.chunksize == (3, 4, 5)
    np.testing.assert_array_equal(image.data.compute(), arr[..., 0].transpose(2, 1, 0))


def test_gz_refuses_chunks_that_split_slices(tmp_path):
    path = save(tmp_path, "a.nii.gz", np.zeros((8, 8, 8), np.uint8))
    with pytest.raises(ConfigError, match="a.nii.gz"):
        open_image(path, chunks=(2, 4, 8))


def test_scale_slope_and_inter_applied_and_recorded(tmp_path):
    arr = RNG.integers(0, 100, size=(6, 5, 4)).astype(np.int16)
    img = nib.Nifti1Image(arr, np.eye(4))
    img.header.set_slope_inter(0.5, -10.0)
    path = str(tmp_path / "scaled.nii.gz")
    nib.save(img, path)
    image = open_image(path)
    assert image.dtype.kind == "f"
    np.testing.assert_allclose(image.data.compute(), (arr * 0.5 - 10.0).transpose(2, 1, 0))
    assert image.attrs["scl_slope"] == 0.5 and image.attrs["scl_inter"] == -10.0 and image.attrs["scaling_applied"]


def test_sform_preferred_over_qform(tmp_path):
    img = nib.Nifti1Image(np.zeros((4, 5, 6), np.uint8), None)
    q = np.diag([2.0, 2.0, 2.0, 1.0])
    img.set_qform(q, code=1)
    img.set_sform(oblique_affine(), code=2)
    path = str(tmp_path / "s.nii")
    nib.save(img, path)
    image = open_image(path)
    assert image.attrs["affine_source"] == "sform"
    np.testing.assert_allclose(world_affine(image.spacing, image.origin, image.direction),
                               lps_from_ras_affine(oblique_affine()), atol=1e-5)


@pytest.mark.parametrize("name", ["example4d.nii.gz", "anatomical.nii", "functional.nii", "example_nifti2.nii.gz",
                                  "reoriented_anat_moved.nii", "standard.nii.gz"])
def test_real_files_from_nibabel(name):
    path = os.path.join(data_path, name)
    image = open_image(path)
    ref = np.asanyarray(nib.load(path).dataobj)
    ref = ref.transpose(tuple(range(ref.ndim))[::-1]) if ref.ndim == 3 else ref.transpose(3, 2, 1, 0)
    with dask.config.set(scheduler="synchronous"):
        np.testing.assert_array_equal(image.data.compute(), ref)
    check_geometry(image, path)


def test_truncated_gz_error_names_the_file(tmp_path):
    arr = RNG.integers(0, 255, size=(40, 40, 40)).astype(np.uint8)
    path = save(tmp_path, "full.nii.gz", arr)
    raw = open(path, "rb").read()
    bad = tmp_path / "cut.nii.gz"
    bad.write_bytes(raw[: len(raw) // 2])
    image = open_image(str(bad))
    with pytest.raises(InputError, match="cut.nii.gz"):
        image.data.compute()


def test_truncated_nii_refused_at_open_and_garbage_is_format_error(tmp_path):
    path = save(tmp_path, "full.nii", np.ones((20, 20, 20), np.int16))
    raw = open(path, "rb").read()
    (tmp_path / "cut.nii").write_bytes(raw[:-100])
    with pytest.raises(InputError, match="cut.nii.*truncated"):
        open_image(str(tmp_path / "cut.nii"))
    (tmp_path / "junk.nii.gz").write_bytes(gzip.compress(b"not a nifti" * 10))
    with pytest.raises(FormatError, match="junk.nii.gz"):
        open_image(str(tmp_path / "junk.nii.gz"))
    with pytest.raises(ImageNotFoundError):
        open_image(str(tmp_path / "missing.nii.gz"))


def test_budget_checked_on_header(tmp_path):
    path = save(tmp_path, "big.nii.gz", np.zeros((30, 30, 30), np.uint8))
    with pytest.raises(InputError, match="big.nii.gz"):
        open_image(path, max_pixels=1000)


def test_2d_file_gets_a_z_axis_of_one(tmp_path):
    arr = RNG.integers(0, 50, size=(9, 7)).astype(np.uint16)
    path = save(tmp_path, "flat.nii.gz", arr, affine=np.diag([0.5, 0.25, 1.0, 1.0]))
    image = open_image(path)
    assert image.axes == ("z", "y", "x") and image.shape == (1, 7, 9)
    np.testing.assert_array_equal(image.data.compute()[0], arr.T)
    assert image.spacing == (1.0, 0.25, 0.5)


def test_several_extra_dimensions_refused(tmp_path):
    path = save(tmp_path, "5d.nii", np.zeros((3, 3, 3, 2, 2), np.uint8))
    with pytest.raises(InputError, match="5d.nii"):
        open_image(path)


def test_open_is_lazy_and_budget_uses_the_header(tmp_path):
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.uint8)
    hdr.set_data_shape((2000, 2000, 2000))  # 8 GB declared, a few bytes stored
    path = tmp_path / "huge.nii.gz"
    with gzip.open(path, "wb") as f:
        hdr.write_to(f)
        f.write(b"\x00" * 1000)
    image = open_image(str(path))  # nothing beyond the first voxel is read
    assert image.shape == (2000, 2000, 2000) and image.data.chunksize == (16, 2000, 2000)
    with pytest.raises(InputError, match="huge.nii.gz.*over the budget"):
        open_image(str(path), max_bytes=2**30)
    with pytest.raises(InputError, match="huge.nii.gz"):
        image.data[-1].compute()


def test_sheared_affine_refused_naming_the_file(tmp_path):
    shear = np.eye(4)
    shear[0, 1] = 0.5
    path = save(tmp_path, "shear.nii.gz", np.zeros((4, 4, 4), np.uint8), affine=shear)
    with pytest.raises(FormatError, match="shear.nii.gz.*sheared"):
        open_image(path)
