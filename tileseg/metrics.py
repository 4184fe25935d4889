"""Quality metrics of a segmentation against a reference label image.

Everything is derived from one confusion matrix, computed chunk by chunk
(a bincount per chunk, summed by a Dask reduction), so images larger than
memory can be scored. Rows are reference classes, columns predicted classes.

Per class ``c`` (TP = ``cm[c, c]``, FN = rest of row, FP = rest of column):

* Dice = 2 TP / (2 TP + FP + FN)
* IoU = TP / (TP + FP + FN)
* accuracy = TP / (TP + FN) (the fraction of the class's reference pixels
  predicted correctly, i.e. recall)

and overall pixel accuracy = trace / total. A score whose denominator is 0
(the class is absent from both images, or from the reference for accuracy)
is undefined: NaN in the arrays, ``None`` in :func:`metrics` / :func:`evaluate`.
"""

from __future__ import annotations

import math
import os
from typing import Any

import dask.array as da
import numpy as np

from .errors import ConfigError, InputError

__all__ = ["accuracy", "confusion_matrix", "dice", "evaluate", "iou", "metrics", "pixel_accuracy"]


def _spatial(data: Any, name: str) -> da.Array:
    from .image import Image

    if isinstance(data, Image):
        data = data.data[0] if data.has_channels and data.data.shape[0] == 1 else data.data
    x = da.asarray(data)
    if x.dtype.kind not in "biu":
        raise InputError(f"{name} must hold integer class labels, got dtype {x.dtype!r}")
    return x


def _cm_block(p: np.ndarray, r: np.ndarray, n: int, ignore: int | None) -> np.ndarray:
    p = p.astype(np.int64, copy=False).ravel()
    r = r.astype(np.int64, copy=False).ravel()
    if ignore is not None:
        keep = r != ignore
        p, r = p[keep], r[keep]
    ok = (p >= 0) & (p < n) & (r >= 0) & (r < n)
    counts = np.bincount(r[ok] * n + p[ok], minlength=n * n)
    return np.append(counts, np.int64(ok.size - int(ok.sum())))


def confusion_matrix(
    pred: Any, ref: Any, n_classes: int | None = None, *, ignore_index: int | None = None
) -> np.ndarray:
    """Confusion matrix of two label images, computed chunk by chunk.

    Parameters
    ----------
    pred, ref : dask.array.Array, numpy.ndarray or tileseg.image.Image
        Integer class maps of the same spatial shape (chunks may differ).
    n_classes : int, optional
        Classes are ``0..n_classes-1``. Default: 1 + the largest value in
        either image (one extra pass).
    ignore_index : int, optional
        Reference value whose pixels are left out.

    Returns
    -------
    numpy.ndarray
        ``(n_classes, n_classes)`` int64, rows = reference, columns = prediction.

    Raises
    ------
    InputError
        Shapes differ, or a value lies outside ``0..n_classes-1``.

    Examples
    --------
    >>> import numpy as np
    >>> confusion_matrix(np.array([0, 1, 1]), np.array([0, 1, 0]), 2).tolist()
    [[1, 1], [0, 1]]
    """
    p = _spatial(pred, "prediction")
    r = _spatial(ref, "reference")
    if p.shape != r.shape:
        raise InputError(f"prediction shape {p.shape!r} differs from reference shape {r.shape!r}")
    if n_classes is None:
        hi = da.compute(p.max(), r.max()) if p.size else (0, 0)
        n_classes = int(max(hi)) + 1
    if not isinstance(n_classes, (int, np.integer)) or n_classes < 1:
        raise ConfigError(f"n_classes must be a positive integer, got {n_classes!r}")
    n = int(n_classes)
    p, r = da.unify_chunks(p, tuple(range(p.ndim)), r, tuple(range(r.ndim)))[1]
    import dask

    parts = [
        dask.delayed(_cm_block)(pb, rb, n, ignore_index)
        for pb, rb in zip(p.to_delayed().ravel(), r.to_delayed().ravel())
    ]
    stacked = da.stack([da.from_delayed(q, shape=(n * n + 1,), dtype=np.int64) for q in parts])
    total = stacked.sum(axis=0).compute()  # a tree reduction: few partial matrices at a time
    if total[-1]:
        raise InputError(f"{int(total[-1])} pixels hold labels outside 0..{n - 1} (n_classes={n})")
    return total[:-1].reshape(n, n)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num = np.asarray(num, dtype=float)
    den = np.asarray(den, dtype=float)
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def dice(cm: np.ndarray) -> np.ndarray:
    """Per-class Dice from a confusion matrix (NaN where undefined)."""
    cm = np.asarray(cm)
    tp = np.diag(cm)
    return _ratio(2 * tp, cm.sum(0) + cm.sum(1))


def iou(cm: np.ndarray) -> np.ndarray:
    """Per-class intersection over union (Jaccard) from a confusion matrix."""
    cm = np.asarray(cm)
    tp = np.diag(cm)
    return _ratio(tp, cm.sum(0) + cm.sum(1) - tp)


def accuracy(cm: np.ndarray) -> np.ndarray:
    """Per-class pixel accuracy TP / (TP + FN) from a confusion matrix."""
    cm = np.asarray(cm)
    return _ratio(np.diag(cm), cm.sum(1))


def pixel_accuracy(cm: np.ndarray) -> float:
    """Overall fraction of correctly labelled pixels (NaN for an empty image)."""
    cm = np.asarray(cm)
    total = cm.sum()
    return float(np.trace(cm) / total) if total else math.nan


def _clean(v: float) -> float | None:
    return None if math.isnan(v) else float(v)


def metrics(pred: Any, ref: Any, n_classes: int | None = None, *, ignore_index: int | None = None) -> dict:
    """Dice, IoU and accuracy per class, as a JSON-ready dict.

    Returns
    -------
    dict
        ``n_classes``, ``n_pixels``, ``pixel_accuracy``, ``mean_dice`` and
        ``mean_iou`` (over the defined foreground classes ``1..K-1``; over
        class 0 too when it is the only class), ``classes`` (``{"0": {"dice",
        "iou", "accuracy", "ref_pixels", "pred_pixels"}, ...}``) and
        ``confusion_matrix`` (rows = reference). Undefined scores are ``None``.
    """
    cm = confusion_matrix(pred, ref, n_classes, ignore_index=ignore_index)
    d, j, a = dice(cm), iou(cm), accuracy(cm)
    fg = slice(1, None) if len(cm) > 1 else slice(None)

    def _mean(v: np.ndarray) -> float | None:
        v = v[fg]
        v = v[~np.isnan(v)]
        return float(v.mean()) if v.size else None

    return {
        "n_classes": int(len(cm)),
        "n_pixels": int(cm.sum()),
        "pixel_accuracy": _clean(pixel_accuracy(cm)),
        "mean_dice": _mean(d),
        "mean_iou": _mean(j),
        "classes": {
            str(c): {
                "dice": _clean(d[c]),
                "iou": _clean(j[c]),
                "accuracy": _clean(a[c]),
                "ref_pixels": int(cm[c].sum()),
                "pred_pixels": int(cm[:, c].sum()),
            }
            for c in range(len(cm))
        },
        "confusion_matrix": cm.tolist(),
    }


def evaluate(
    pred_path: Any,
    ref_path: Any,
    *,
    n_classes: int | None = None,
    ignore_index: int | None = None,
    pred_options: dict | None = None,
    ref_options: dict | None = None,
) -> dict:
    """Score a prediction file against a reference file (``tileseg evaluate PRED REF``).

    Parameters
    ----------
    pred_path, ref_path : str, os.PathLike, array or tileseg.image.Image
        Paths are opened lazily with :func:`tileseg.readers.open_image`
        (options from ``pred_options`` / ``ref_options``); arrays and images
        are used as they are. A length-1 channel axis is dropped.
    n_classes, ignore_index
        See :func:`confusion_matrix`.

    Returns
    -------
    dict
        As :func:`metrics`, plus ``prediction`` and ``reference`` (the sources).
    """
    pred, pred_src = _open(pred_path, pred_options)
    ref, ref_src = _open(ref_path, ref_options)
    try:
        out = metrics(pred, ref, n_classes, ignore_index=ignore_index)
    except InputError as exc:  # shapes or values: say which files
        raise InputError(f"{exc} (prediction {pred_src or 'in memory'}, reference {ref_src or 'in memory'})") from exc
    out["prediction"] = pred_src
    out["reference"] = ref_src
    return out


def _open(src: Any, options: dict | None) -> tuple[Any, str | None]:
    if isinstance(src, (str, os.PathLike)):
        from .readers import open_image

        return open_image(src, **(options or {})), os.fspath(src)
    return src, getattr(src, "source", None)
