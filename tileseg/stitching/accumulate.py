"""Overlap-add of predicted batches into an owner task's accumulator, in place.

An owner task adds ``prediction x window`` of each of its patches into one
``K x region`` accumulator. Two interchangeable paths do that with no
per-patch temporaries:

:class:`TorchAccumulator`
    when the predictor hands back torch tensors (a predictor with
    ``predict_tensor``, e.g. :class:`~tileseg.predictors.torch.TorchPredictor`):
    the predictions never leave the model's device
    (:meth:`~tileseg.predictors.torch.TorchPredictor.predict_tensor`), the
    accumulator lives there too and each patch is one fused ``addcmul_``
    (multiply by the window and add, one pass, on torch's intra-op threads or
    the GPU). At the end of the task the owner's interior is reduced there
    (:meth:`TorchAccumulator.labels` / :meth:`TorchAccumulator.scores`) and
    only the result and the ``K``-channel strips where blocks meet cross to
    the host (:func:`to_host`, see :mod:`.handover`). On the CPU the same code
    runs with ``device='cpu'``; the accumulator then wraps a host buffer.
:class:`NumpyAccumulator`
    for any other predictor: the window product goes into one scratch patch
    reused for every batch of the task, then is added in place.

Dtypes: the window and the accumulator are float32. A pixel receives at most
``prod(patch / stride)`` contributions (8 in 3D at overlap 0.5), each a
logit times a weight in ``(0, 1]``, so float32 keeps about seven significant
digits of the sum, as MONAI's float32 output does; float16/bfloat16 would
turn near-ties between classes (and so the label map) into rounding noise
against a whole-image reference, for half the traffic. The weight sum is not
accumulated at all: the final tasks recompute it from the geometry, and only
for scores (an argmax does not depend on a positive per-pixel factor).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from . import buffers, reduce

log = logging.getLogger(__name__)

#: Device types whose memory is the host's: their accumulator wraps a host buffer and hands out views.
HOST_DEVICES: tuple[str, ...] = ("cpu",)


class NumpyAccumulator:
    """``K x shape`` float32 accumulator filled with NumPy in-place operations.

    Parameters
    ----------
    n_classes : int
        K.
    shape : tuple of int
        Region shape (pixels).
    window : numpy.ndarray or None
        Blending window (patch shape, float32); None for crop blending.
    """

    def __init__(self, n_classes: int, shape: tuple[int, ...], window: np.ndarray | None) -> None:
        self.acc = buffers.zeros((n_classes,) + tuple(shape), np.float32)
        self.window = window
        self._scratch: np.ndarray | None = None  # one patch, reused by every batch

    def add(self, pred: np.ndarray, box: tuple[slice, ...]) -> None:
        """Add ``pred`` (``K x patch``) times the window at ``box`` (region-relative slices)."""
        if self._scratch is None:
            self._scratch = buffers.empty(pred.shape, np.float32)
        np.multiply(pred, self.window, out=self._scratch)
        view = self.acc[(slice(None),) + box]
        np.add(view, self._scratch, out=view)

    def add_crop(self, pred: np.ndarray, box: tuple[slice, ...], inner: tuple[slice, ...]) -> None:
        """Add the ``inner`` part of ``pred`` at ``box`` (crop blending: no window)."""
        view = self.acc[(slice(None),) + box]
        np.add(view, pred[(slice(None),) + inner], out=view)

    def result(self) -> np.ndarray:
        """The accumulator (a host array, off the heap when large)."""
        return self.acc

    def finite(self) -> bool:
        """Whether every accumulated value is finite (one reduction, no mask array)."""
        return bool(np.isfinite(self.acc.sum()))

    def part(self, box: tuple[slice, ...], view: bool = False) -> np.ndarray:
        """``K x box`` (region-relative slices): a copy, or with ``view`` the accumulator's own memory."""
        v = self.acc[(slice(None),) + box]
        return v if view else buffers.copy(v)

    def labels(self, box: tuple[slice, ...], dtype: np.dtype | str) -> np.ndarray:
        """Argmax over classes of ``box`` (NaN pixels: the dtype's largest value), see :mod:`.reduce`."""
        whole = tuple((0, n) for n in self.acc.shape[1:])
        inner = tuple((s.start, s.stop) for s in box)
        return reduce.labels_from_pieces(inner, self.acc.shape[0], dtype, [(whole, self.acc)])

    def scores(self, box: tuple[slice, ...], weight: np.ndarray | None, output: str) -> np.ndarray:
        """``K x box`` divided by the summed window ``weight`` (None: crop) and activated for ``output``."""
        whole = tuple((0, n) for n in self.acc.shape[1:])
        inner = tuple((s.start, s.stop) for s in box)
        return reduce.scores_from_pieces(inner, self.acc.shape[0], output, [(whole, self.acc)], weight)


class TorchAccumulator:
    """``K x shape`` float32 accumulator on a torch device, filled with fused in-place ops.

    On the CPU (or with ``host=True``) it wraps a host buffer
    (:mod:`.buffers`), so :meth:`result` and the own block's strips need no
    copy; on a GPU only the reduced interior and the strips are copied to
    the host. Predictions on another device than the accumulator's are moved
    to it patch by patch (the host fallback of :func:`accumulator`).
    """

    def __init__(self, n_classes: int, shape: tuple[int, ...], window: np.ndarray | None, device: Any,
                 host: bool = False) -> None:
        import torch

        self.torch = torch
        self.device = torch.device("cpu" if host else device)
        full = (n_classes,) + tuple(shape)
        if host or self.device.type in HOST_DEVICES:
            self.host: np.ndarray | None = buffers.zeros(full, np.float32)
            self.acc = torch.from_numpy(self.host)
        else:
            self.host = None
            self.acc = _device_zeros(full, self.device)
        # the cached window is read-only: hand torch a writable copy of it
        self.window = None if window is None else torch.from_numpy(np.array(window, np.float32)).to(self.device)

    def add(self, pred: Any, box: tuple[slice, ...]) -> None:
        """Add ``pred`` (``K x patch`` tensor) times the window at ``box``, in one pass."""
        with self.torch.inference_mode():
            if pred.device != self.device:
                pred = pred.to(self.device)
            self.acc[(slice(None),) + box].addcmul_(pred, self.window)

    def add_crop(self, pred: Any, box: tuple[slice, ...], inner: tuple[slice, ...]) -> None:
        """Add the ``inner`` part of ``pred`` at ``box`` (crop blending: no window)."""
        with self.torch.inference_mode():
            self.acc[(slice(None),) + box].add_(pred[(slice(None),) + inner].to(self.device))

    def result(self) -> np.ndarray:
        """The whole accumulator as a host array (one device-to-host copy on a GPU)."""
        if self.host is not None:
            return self.host
        return to_host(self.acc)

    def finite(self) -> bool:
        """Whether every accumulated value is finite (one reduction on the device, no mask)."""
        with self.torch.inference_mode():
            return bool(self.acc.sum().isfinite())

    def part(self, box: tuple[slice, ...], view: bool = False) -> np.ndarray:
        """``K x box`` (region-relative slices) copied to the host; with ``view`` on the CPU, no copy."""
        if self.host is not None:  # host memory already: NumPy's copy (one thread, no oversubscription)
            v = self.host[(slice(None),) + box]
            return v if view else buffers.copy(v)
        return to_host(self.acc[(slice(None),) + box])

    def labels(self, box: tuple[slice, ...], dtype: np.dtype | str) -> np.ndarray:
        """Argmax over classes of ``box`` on the device; only the labels cross to the host.

        Ties go to the first class (as :func:`numpy.argmax`); pixels where a
        class is NaN get the dtype's largest value (the label nodata). One
        channel gives ``score > 0``. A host accumulator is reduced by
        :func:`.reduce.labels_from_pieces`, one cache-sized slab at a time:
        ``torch.max`` would allocate a float maximum and int64 indices over
        the whole box (12 bytes a pixel) in every owner task.
        """
        if self.host is not None:
            whole = tuple((0, n) for n in self.host.shape[1:])
            inner = tuple((s.start, s.stop) for s in box)
            return reduce.labels_from_pieces(inner, self.host.shape[0], dtype, [(whole, self.host)])
        torch = self.torch
        dt = np.dtype(dtype)
        small = torch.uint8 if dt.itemsize == 1 else torch.int32 if dt.itemsize == 2 else torch.int64
        nodata = int(np.iinfo(dt).max) if dt.itemsize < 8 else -1  # uint64's largest: -1 in int64
        with torch.inference_mode():
            s = self.acc[(slice(None),) + box]
            if s.shape[0] == 1:
                top, lab = s[0], (s[0] > 0).to(small)
            else:
                top, idx = torch.max(s, dim=0)  # first maximum on ties; NaN propagates
                lab = idx.to(small)
            bad = torch.isnan(top)
            if bool(bad.any()):
                lab[bad] = nodata
            return to_host(lab).astype(dt, copy=False)

    def scores(self, box: tuple[slice, ...], weight: np.ndarray | None, output: str) -> np.ndarray:
        """``K x box`` divided by the summed window ``weight`` (None: crop) and activated, on the device."""
        torch = self.torch
        with torch.inference_mode():
            s = self.acc[(slice(None),) + box]
            if weight is None:
                s = s.clone()
            else:  # where the weight is 0 no patch reached the pixel and its sum is 0: clamped, it stays 0
                w = torch.from_numpy(np.asarray(weight, np.float32)).to(self.device)
                s = s / w.clamp_min(1e-30)
            if output == "probabilities":
                s = torch.sigmoid(s) if s.shape[0] == 1 else torch.softmax(s, dim=0)
            return to_host(s)


def to_host(t: Any) -> np.ndarray:
    """A tensor's data as a new host numpy array (the only way stitched data leaves a device).

    Large arrays go into their own memory mapping (:mod:`.buffers`).
    """
    import torch

    dt = np.dtype(str(t.dtype).removeprefix("torch."))
    host = buffers.empty(tuple(t.shape), dt)
    if host.size:
        torch.from_numpy(host).copy_(t)
    return host


def _device_zeros(shape: tuple[int, ...], device: Any) -> Any:
    import torch

    return torch.zeros(shape, dtype=torch.float32, device=device)


def accumulator(pred: Any, n_classes: int, shape: tuple[int, ...], window: np.ndarray | None):
    """The accumulator that suits a first predicted batch: torch for tensors, else NumPy.

    A tensor's accumulator lives on its device; when the device has no room
    for it (``K x region`` float32; out-of-memory, see
    :mod:`tileseg.predictors.oom`), it is kept on the host instead, with a
    warning, and each batch is brought there.
    """
    if isinstance(pred, np.ndarray):
        return NumpyAccumulator(n_classes, shape, window)
    try:
        return TorchAccumulator(n_classes, shape, window, pred.device)
    except Exception as exc:
        from ..predictors.oom import is_out_of_memory

        if not is_out_of_memory(exc):
            raise
    nbytes = 4 * n_classes * int(np.prod(shape, dtype=np.int64))
    log.warning("no room on %s for a %d x %r float32 accumulator (%.0f MiB): stitching this block on the host; "
                "smaller chunks keep it on the device", pred.device, n_classes, tuple(shape), nbytes / 2**20)
    return TorchAccumulator(n_classes, shape, window, "cpu", host=True)
