"""The engine's settings as two small value objects, validated once.

:class:`TilingOptions` says how the image is cut and stitched,
:class:`InferenceOptions` how patches go through the model and what comes
out. :func:`tileseg.segment` builds them from its keyword arguments and the
pipeline runner from the YAML sections; the graph stages take them as they
are.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

OUTPUTS = ("labels", "probabilities", "logits")
NAN_POLICIES = ("error", "fill")
BAD_OUTPUTS = ("error", "nodata")
PAD_MODES = ("reflect", "constant", "edge", "symmetric")


@dataclass(frozen=True)
class TilingOptions:
    """How an image is cut into patches and stitched back.

    Parameters
    ----------
    patch_size : int or tuple of int
        Patch size per spatial axis.
    overlap : float, optional
        Fraction of the patch, ``0 <= overlap < 1`` (default 0.25 unless
        ``overlap_px`` is given).
    overlap_px : int or tuple of int, optional
        Overlap in pixels instead of ``overlap``.
    blend : {"gaussian", "hann", "constant", "crop"}
        How overlapping predictions are combined.
    chunks : int, tuple or None
        Output chunk size per spatial axis (default: see :func:`tileseg.tiling.grid.make_grid`).
    pad_mode : {"reflect", "constant", "edge", "symmetric"}
        Padding of axes shorter than the patch.
    target_spacing : tuple of float, optional
        Resample the model input to this spacing (image units, one per spatial
        axis) and the logits back to the source grid before the labels are
        made (see :func:`tileseg.graph.segment_resampled`); ``patch_size`` and
        ``chunks`` then count pixels of the resampled grid.
    """

    patch_size: Any
    overlap: Any = None
    overlap_px: Any = None
    blend: str = "gaussian"
    chunks: Any = None
    pad_mode: str = "reflect"
    target_spacing: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        from .stitching.weights import check_blend
        from .tiling.grid import tile_steps

        if self.overlap is None and self.overlap_px is None:
            object.__setattr__(self, "overlap", 0.25)
        check_blend(self.blend)
        if self.pad_mode not in PAD_MODES:
            raise ConfigError(f"pad_mode must be one of {PAD_MODES}, got {self.pad_mode!r}")
        if not isinstance(self.patch_size, (int, Sequence)) or isinstance(self.patch_size, (str, bool)):
            raise ConfigError(f"patch_size must be an int or a sequence of ints, got {self.patch_size!r}")
        if self.target_spacing is not None:
            ts = self.target_spacing
            ok = isinstance(ts, Sequence) and not isinstance(ts, str) and len(ts) in (2, 3)
            values = tuple(float(v) for v in ts) if ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in ts) else ()
            if not values or not all(math.isfinite(v) and v > 0 for v in values):
                raise ConfigError(f"target_spacing must be 2 or 3 positive numbers, got {ts!r}")
            object.__setattr__(self, "target_spacing", values)
        if not isinstance(self.patch_size, int):
            tile_steps(self.patch_size, overlap=self.overlap, overlap_px=self.overlap_px)


@dataclass(frozen=True)
class InferenceOptions:
    """How patches go through the model and what the engine returns.

    Parameters
    ----------
    batch_size : int
        Patches per model call.
    output : {"labels", "probabilities", "logits"}
        Argmax labels (``> 0.5`` for one channel) as a class map in the
        smallest unsigned dtype, softmax/sigmoid probabilities, or logits.
    nan_policy : {"error", "fill"}
        NaN input raises an :class:`~tileseg.errors.InputError` naming the
        pixel box, or is replaced by ``fill_value``.
    fill_value : float
        Value for NaN pixels (``nan_policy="fill"``) and for ``pad_mode="constant"``.
    preprocess : tuple
        Preprocessing steps (see :mod:`tileseg.preprocess`).
    out_channels : int, optional
        K; when unknown the model is probed with one patch.
    class_names : tuple of str, optional
        One per model output channel (two for a one-channel model).
    resources : dict, optional
        Dask resources needed by model tasks, e.g. ``{"GPU": 1}``.
    lookahead : int, optional
        Ordering edges: the model task of block ``i`` waits for output block
        ``i - lookahead``; None: two blocks per scheduler thread, at least 4
        (:func:`tileseg.graph.resolve_lookahead`); 0: none.
    skip_nodata : bool
        Leave out patches whose pixels are all invalid (``nodata`` or outside
        the image's ``mask``): they never reach the model (default True).
    bad_output : {"error", "nodata"}
        NaN or Inf in the model's output raises a
        :class:`~tileseg.errors.ModelError` naming the image and the patch box
        (default), or those pixels become the result's nodata and are counted
        (``bad_output_px`` in :mod:`tileseg.counters` and the run report).
    """

    batch_size: int = 8
    output: str = "labels"
    nan_policy: str = "error"
    fill_value: float = 0.0
    preprocess: tuple[Any, ...] = ()
    out_channels: int | None = None
    class_names: tuple[str, ...] | None = None
    resources: dict[str, float] | None = field(default=None)
    lookahead: int | None = None
    skip_nodata: bool = True
    bad_output: str = "error"

    def __post_init__(self) -> None:
        if self.bad_output not in BAD_OUTPUTS:
            raise ConfigError(f"bad_output must be one of {BAD_OUTPUTS}, got {self.bad_output!r}")
        if self.output not in OUTPUTS:
            raise ConfigError(f"output must be one of {OUTPUTS}, got {self.output!r}")
        if self.nan_policy not in NAN_POLICIES:
            raise ConfigError(f"nan_policy must be one of {NAN_POLICIES}, got {self.nan_policy!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        object.__setattr__(self, "preprocess", tuple(self.preprocess or ()))
        if self.class_names is not None:
            names = tuple(str(c) for c in self.class_names)
            if not names or len(set(names)) != len(names):
                raise ConfigError(f"class_names must be unique and not empty, got {self.class_names!r}")
            object.__setattr__(self, "class_names", names)
