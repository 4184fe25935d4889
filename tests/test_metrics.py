"""Chunk-wise metrics equal a direct whole-image computation."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tileseg.errors import InputError
from tileseg.metrics import accuracy, confusion_matrix, dice, evaluate, iou, metrics, pixel_accuracy


def _manual_cm(pred, ref, n):
    cm = np.zeros((n, n), np.int64)
    for r, p in zip(ref.ravel().tolist(), pred.ravel().tolist()):
        cm[r, p] += 1
    return cm


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**16), st.integers(1, 5), st.sampled_from([(5, 7), (13, 4), (20, 20)]))
def test_confusion_matrix_equals_manual_count(seed, n, chunks):
    rng = np.random.default_rng(seed)
    pred = rng.integers(0, n, (20, 23)).astype(np.uint8)
    ref = rng.integers(0, n, (20, 23)).astype(np.int32)
    cm = confusion_matrix(da.from_array(pred, chunks=chunks), da.from_array(ref, chunks=(6, 6)), n)
    np.testing.assert_array_equal(cm, _manual_cm(pred, ref, n))


def test_scores_by_hand():
    ref = np.array([[0, 0, 1, 1], [0, 2, 2, 1]])
    pred = np.array([[0, 1, 1, 1], [0, 2, 0, 0]])
    cm = confusion_matrix(pred, ref, 3)
    # class 0: TP 2, FP 2, FN 1; class 1: TP 2, FP 1, FN 1; class 2: TP 1, FP 0, FN 1
    np.testing.assert_allclose(dice(cm), [4 / 7, 4 / 6, 2 / 3])
    np.testing.assert_allclose(iou(cm), [2 / 5, 2 / 4, 1 / 2])
    np.testing.assert_allclose(accuracy(cm), [2 / 3, 2 / 3, 1 / 2])
    assert pixel_accuracy(cm) == 5 / 8


def test_metrics_dict_and_undefined_classes():
    ref = np.array([[0, 0, 1], [1, 0, 0]])
    pred = np.array([[0, 1, 1], [1, 0, 0]])
    out = metrics(da.from_array(pred, chunks=1), da.from_array(ref, chunks=2), n_classes=3)
    assert out["n_pixels"] == 6 and out["pixel_accuracy"] == pytest.approx(5 / 6)
    assert out["classes"]["1"]["dice"] == pytest.approx(0.8)
    assert out["classes"]["2"] == {
        "dice": None,
        "iou": None,
        "accuracy": None,
        "ref_pixels": 0,
        "pred_pixels": 0,
    }
    assert out["mean_dice"] == pytest.approx(0.8)  # class 2 undefined, background excluded
    assert out["confusion_matrix"] == [[3, 1, 0], [0, 2, 0], [0, 0, 0]]


def test_ignore_index_and_default_n_classes():
    ref = np.array([0, 1, 255, 1])
    pred = np.array([0, 1, 1, 0])
    cm = confusion_matrix(pred, ref, 2, ignore_index=255)
    np.testing.assert_array_equal(cm, [[1, 0], [1, 1]])
    np.testing.assert_array_equal(
        confusion_matrix(np.array([0, 3]), np.array([1, 1])),
        _manual_cm(np.array([0, 3]), np.array([1, 1]), 4),
    )


def test_errors():
    with pytest.raises(InputError, match="shape"):
        confusion_matrix(np.zeros((3, 3), int), np.zeros((3, 4), int), 2)
    with pytest.raises(InputError, match="outside 0..1"):
        confusion_matrix(np.array([0, 2]), np.array([0, 1]), 2)
    with pytest.raises(InputError, match="float"):
        confusion_matrix(np.zeros(3), np.zeros(3, int), 2)


def test_evaluate_accepts_images_and_drops_single_channel():
    from tileseg.image import Image

    ref = np.array([[[0, 1], [1, 1]]], np.uint8)
    pred = Image(da.from_array(ref), axes=("c", "y", "x"), source="mem://pred")
    out = evaluate(pred, ref[0])
    assert out["pixel_accuracy"] == 1.0 and out["prediction"] == "mem://pred"


def test_evaluate_reads_paths(tmp_path):
    import zarr  # a core dependency

    rng = np.random.default_rng(0)
    ref = rng.integers(0, 3, (16, 16)).astype(np.uint8)
    pred = ref.copy()
    pred[:4] = 0
    for name, arr in (("pred.zarr", pred), ("ref.zarr", ref)):
        z = zarr.create_array(str(tmp_path / name), shape=arr.shape, chunks=(8, 8), dtype=arr.dtype)
        z[...] = arr
    out = evaluate(str(tmp_path / "pred.zarr"), str(tmp_path / "ref.zarr"), n_classes=3)
    assert out["confusion_matrix"] == _manual_cm(pred, ref, 3).tolist()


def test_evaluate_names_both_files_when_shapes_differ(tmp_path):
    import zarr

    from tileseg.errors import InputError

    for name, shape in (("pred.zarr", (16, 16)), ("ref.zarr", (16, 12))):
        zarr.create_array(str(tmp_path / name), shape=shape, chunks=(8, 8), dtype="uint8")[...] = 0
    with pytest.raises(InputError, match=r"differs.*pred\.zarr.*ref\.zarr"):
        evaluate(str(tmp_path / "pred.zarr"), str(tmp_path / "ref.zarr"), n_classes=2)
