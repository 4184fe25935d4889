"""Test-time augmentation by flips, folded into the batch dimension.

A batch ``(N, C, *patch)`` becomes one batch ``(F * N, C, *patch)`` holding
every combination of flips over the chosen spatial axes (``F = 2**len(axes)``,
the unflipped batch first), so the model sees one forward of ``F * N``
patches instead of ``F`` serial passes (nnU-Net runs its mirrored passes one
after another). The outputs are flipped back and averaged as logits, before
any softmax/argmax, as nnU-Net and MONAI's flip TTA do.

Axes are named ``x`` (last), ``y`` (second to last) and ``z`` (third to
last), the spatial order tileseg uses (``zyx``). :func:`fold` and
:func:`unfold` work on numpy arrays and torch tensors alike, so a torch
predictor folds on its device and only ``N`` patches cross to and from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations
from typing import Any

import numpy as np

from ..errors import ConfigError
from .base import Predictor

__all__ = ["AXES", "check_axes", "flip_sets", "fold", "unfold", "FlipTTAPredictor"]

#: Axis names and their position from the end of a ``(N, C, *spatial)`` batch.
AXES = {"x": -1, "y": -2, "z": -3}


def check_axes(axes: Sequence[str] | None, where: str = "tta") -> tuple[str, ...]:
    """Validated, ordered flip axis names (``()`` for no TTA).

    Raises
    ------
    ConfigError
        For a name other than ``x``/``y``/``z`` or a repeated name.

    Examples
    --------
    >>> check_axes(["x", "y"])
    ('y', 'x')
    """
    if axes is None:
        return ()
    if isinstance(axes, str) or not isinstance(axes, Sequence):
        raise ConfigError(f"{where}: must be a list of axis names among {sorted(AXES)}, got {axes!r}")
    bad = [a for a in axes if a not in AXES]
    if bad:
        raise ConfigError(f"{where}: unknown axis {bad[0]!r}; flip axes are named {sorted(AXES)} (x = last)")
    if len(set(axes)) != len(axes):
        raise ConfigError(f"{where}: axis names must not repeat, got {list(axes)!r}")
    return tuple(sorted(axes, key=lambda a: AXES[a]))


def flip_sets(axes: Sequence[str], ndim: int) -> list[tuple[int, ...]]:
    """Batch dimensions to flip for each augmented copy, identity first.

    Parameters
    ----------
    axes : sequence of str
        Flip axis names (see :func:`check_axes`).
    ndim : int
        Dimensions of the batch, ``2 + spatial``.

    Raises
    ------
    ConfigError
        When an axis does not exist for this batch (``z`` with 2D patches).

    Examples
    --------
    >>> flip_sets(("y", "x"), 4)
    [(), (2,), (3,), (2, 3)]
    """
    spatial = ndim - 2
    dims = []
    for a in check_axes(axes):
        if -AXES[a] > spatial:
            raise ConfigError(f"tta: cannot flip axis {a!r} of {spatial}D patches")
        dims.append(ndim + AXES[a])
    return [c for r in range(len(dims) + 1) for c in combinations(dims, r)]


def _flip(x: Any, dims: tuple[int, ...]) -> Any:
    if not dims:
        return x
    if isinstance(x, np.ndarray):
        return np.flip(x, axis=dims)
    return x.flip(dims)


def _concat(parts: list[Any]) -> Any:
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts, axis=0)
    import torch

    return torch.cat(parts, dim=0)


def fold(x: Any, flips: Sequence[tuple[int, ...]]) -> Any:
    """``(N, C, *patch)`` -> ``(F * N, C, *patch)``: the flipped copies stacked on the batch axis.

    Examples
    --------
    >>> fold(np.arange(4.0).reshape(1, 1, 1, 4), [(), (3,)])[:, 0, 0]
    array([[0., 1., 2., 3.],
           [3., 2., 1., 0.]])
    """
    if len(flips) == 1 and not flips[0]:
        return x
    return _concat([_flip(x, d) for d in flips])


def unfold(y: Any, flips: Sequence[tuple[int, ...]]) -> Any:
    """``(F * N, K, *patch)`` -> ``(N, K, *patch)``: each copy flipped back, then the mean.

    Examples
    --------
    >>> x = np.arange(4.0).reshape(1, 1, 1, 4)
    >>> bool(np.array_equal(unfold(fold(x, [(), (3,)]), [(), (3,)]), x))
    True
    """
    f = len(flips)
    if f == 1 and not flips[0]:
        return y
    n = y.shape[0] // f
    total = _flip(y[:n], flips[0])
    total = total.copy() if isinstance(total, np.ndarray) else total.clone()
    for i in range(1, f):
        total += _flip(y[i * n : (i + 1) * n], flips[i])
    return total / f


class FlipTTAPredictor(Predictor):
    """Flip TTA around any predictor: one call on the folded batch, outputs averaged as logits.

    Torch predictors fold on their device instead (``TorchPredictor.with_options(tta=...)``);
    this wrapper serves every other predictor (callables, ONNX ...).

    Parameters
    ----------
    predictor : Predictor
        Maps ``(N, C, *patch)`` to ``(N, K, *patch)``.
    axes : sequence of str
        Flip axis names, e.g. ``("y", "x")``.

    Examples
    --------
    >>> from tileseg.predictors import CallablePredictor
    >>> p = FlipTTAPredictor(CallablePredictor(lambda b: b * np.arange(4.0)), ["x"])
    >>> p(np.ones((1, 1, 1, 4), np.float32))[0, 0, 0].tolist()
    [1.5, 1.5, 1.5, 1.5]
    """

    def __init__(self, predictor: Predictor, axes: Sequence[str]) -> None:
        self.predictor = predictor
        self.axes = check_axes(axes)
        self.in_channels = predictor.in_channels
        self.out_channels = predictor.out_channels
        self.receptive_field = predictor.receptive_field

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        batch = np.asarray(batch, dtype=np.float32)
        flips = flip_sets(self.axes, batch.ndim)
        out = np.asarray(self.predictor(np.ascontiguousarray(fold(batch, flips))), dtype=np.float32)
        if out.shape[0] != batch.shape[0] * len(flips):
            from ..errors import ModelError

            raise ModelError(f"model returned {out.shape[0]} outputs for a TTA batch of {batch.shape[0] * len(flips)}")
        return np.ascontiguousarray(unfold(out, flips), dtype=np.float32)

    def __getattr__(self, name: str) -> Any:
        # other model facts (size divisor, output stride ...) are the wrapped predictor's
        inner = self.__dict__.get("predictor")
        if inner is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(inner, name)

    def describe(self) -> dict[str, Any]:
        return {**self.predictor.describe(), "tta": list(self.axes)}
