"""The predictor protocol: a batch of patches in, a batch of per-class maps out."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import numpy as np


class Predictor:
    """Maps a batch ``(N, C, *patch)`` float32 array to ``(N, K, *patch)``.

    Subclasses set :attr:`in_channels` / :attr:`out_channels` when they know
    them (``None`` means unknown; the engine then probes one patch), and must
    stay cheap to pickle: heavy state (weights, sessions) is loaded lazily in
    each worker process and cached there, never shipped inside every task.
    """

    in_channels: int | None = None
    out_channels: int | None = None
    #: Receptive-field radius in pixels per spatial axis when known.
    receptive_field: tuple[int, ...] | None = None
    #: Class names the model declares (one per output channel), when it does.
    class_names: tuple[str, ...] | None = None
    #: How the model's tensors differ from the engine's (layout, fixed patch size, ...);
    #: see :mod:`tileseg.predictors.conventions`. None: ``(N, C, *patch) -> (N, K, *patch)`` logits.
    conventions: Any = None

    def __call__(self, batch: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Short description for run reports."""
        return {"type": type(self).__name__}


class CallablePredictor(Predictor):
    """Wrap any callable ``f(batch) -> array`` as a predictor.

    Parameters
    ----------
    fn : callable
        Maps ``(N, C, *patch)`` to ``(N, K, *patch)``; numpy, a torch tensor
        (on any device, with or without grad), or anything ``numpy.asarray`` accepts.
    in_channels, out_channels : int, optional
        Channel counts when known.

    Notes
    -----
    A callable that raises ``torch.cuda.OutOfMemoryError`` gets the same
    adaptive batch size as torch models (:mod:`tileseg.predictors.oom`).
    """

    def __init__(self, fn: Callable[[np.ndarray], Any], in_channels: int | None = None,
                 out_channels: int | None = None) -> None:
        self.fn = fn
        self.in_channels = in_channels
        self.out_channels = out_channels
        self._key = uuid.uuid4().hex

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        from .oom import run_adaptive

        name = getattr(self.fn, "__name__", type(self.fn).__name__)
        return run_adaptive(lambda b: host_array(self.fn(b)), np.asarray(batch),
                            key=self._key, device="callable", name=name)

    def describe(self) -> dict[str, Any]:
        return {"type": "callable", "name": getattr(self.fn, "__name__", type(self.fn).__name__)}


def host_array(out: Any) -> np.ndarray:
    """A callable's output as a float32 host array; torch tensors are detached and copied from their device.

    Examples
    --------
    >>> host_array([[1, 2]]).dtype
    dtype('float32')
    """
    if hasattr(out, "detach") and hasattr(out, "cpu"):  # a torch tensor: no torch import for other callables
        out = out.detach().cpu()
    return np.asarray(out, dtype=np.float32)
