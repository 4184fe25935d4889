"""Model conventions: how a model's tensors differ from the engine's ``(N, C, *patch) -> (N, K, *patch)`` logits.

Every model kind accepts the same convention parameters (see :data:`CONVENTION_PARAMS`)::

    model:
      onnx:
        path: nuclei.onnx
        layout: NHWC              # channels last (NHWC / NDHWC); default NCHW (channels first)
        patch_size: [1024, 1024]  # a fixed-size model: tiling.patch_size must equal it
        activation: none          # the model already outputs probabilities (softmax/sigmoid applied)
        output_stride: 4          # output is 4x smaller than the input; upsampled to the input grid,
        output_grid: false        # ... or true: stitched on the model's output grid (tileseg.output_grid)
        output: logits            # which output of a dict / tuple / output object (key, attribute or index)

``activation`` names what turns the model's output into probabilities:
``softmax`` (K > 1) or ``sigmoid`` (K = 1) are the engine's own (the model
returns logits, the default); ``none`` means the model applies it itself,
so its output is turned back into logits (``log p`` for K > 1, ``log(p / (1 - p))``
for K = 1; softmax/sigmoid of them gives back exactly ``p``) and blended as
log-probabilities. ``sigmoid`` with K > 1 (independent labels) is refused:
the engine's probabilities would be a softmax.

``output_stride`` s > 1: the model's output is ``patch / s`` per axis; it is
upsampled linearly (pixel centres aligned, like ``torch.nn.functional.interpolate``
with ``align_corners=False``) to the patch, so stitching and the result stay on
the input grid. With ``output_grid: true`` it is not upsampled: the engine
stitches on the model's grid and the result is ``s`` times coarser (see
:mod:`tileseg.output_grid`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from ..errors import ConfigError, ModelError

__all__ = ["Conventions", "CONVENTION_PARAMS", "LAYOUTS", "ACTIVATIONS", "upsample_linear", "select_output"]

LAYOUTS = ("NCHW", "NHWC", "NCDHW", "NDHWC")
ACTIVATIONS = ("softmax", "sigmoid", "none")
#: Keyword parameters every model kind accepts (see the module docstring).
CONVENTION_PARAMS = ("layout", "patch_size", "activation", "output_stride", "output_grid", "output")
_EPS = np.float32(1e-7)


@dataclass(frozen=True)
class Conventions:
    """How a model's input and output differ from ``(N, C, *patch)`` in, ``(N, K, *patch)`` logits out.

    Parameters
    ----------
    layout : {"NCHW", "NHWC", "NCDHW", "NDHWC"}
        Channels first (default) or last, for 2D and 3D alike.
    patch_size : tuple of int, optional
        The only patch size the model takes.
    activation : {"softmax", "sigmoid", "none"}, optional
        ``none``: the output is already probabilities. Default: logits.
    output_stride : int
        The output is ``patch // output_stride`` per spatial axis (default 1).
    output_grid : bool
        Stitch on the model's output grid instead of upsampling to the input's.
    output : str or int, optional
        Key, attribute or index of the output to take from a dict, tuple or
        output object (default: ``logits``/``out`` when present, else the only
        or the first tensor).

    Raises
    ------
    ConfigError
        For a value out of range (the message names the parameter).
    """

    layout: str = "NCHW"
    patch_size: tuple[int, ...] | None = None
    activation: str | None = None
    output_stride: int = 1
    output_grid: bool = False
    output: str | int | None = None
    explicit: frozenset = field(default=frozenset(), compare=False)

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ConfigError(f"model layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.activation is not None and self.activation not in ACTIVATIONS:
            raise ConfigError(f"model activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        s = self.output_stride
        if isinstance(s, bool) or not isinstance(s, int) or s < 1:
            raise ConfigError(f"model output_stride must be an integer >= 1, got {s!r}")
        if not isinstance(self.output_grid, bool):
            raise ConfigError(f"model output_grid must be true or false, got {self.output_grid!r}")
        if self.patch_size is not None:
            ps = self.patch_size
            if (not isinstance(ps, Sequence) or isinstance(ps, str) or len(ps) not in (2, 3)
                    or not all(isinstance(p, int) and not isinstance(p, bool) and p > 0 for p in ps)):
                raise ConfigError(f"model patch_size must be 2 or 3 positive integers, got {ps!r}")
            object.__setattr__(self, "patch_size", tuple(int(p) for p in ps))
        if self.output is not None and (isinstance(self.output, bool) or not isinstance(self.output, (str, int))):
            raise ConfigError(f"model output must be a key/attribute name or an index, got {self.output!r}")

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> Conventions:
        """Conventions from the ones of :data:`CONVENTION_PARAMS` given in ``params`` (others ignored)."""
        given = {k: params[k] for k in CONVENTION_PARAMS if params.get(k) is not None}
        return cls(**given, explicit=frozenset(given))

    def with_defaults(self, **declared: Any) -> Conventions:
        """These conventions, with what the model itself declares filling what the user did not set."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "explicit"}
        for k, v in declared.items():
            if v is not None and k not in self.explicit:
                values[k] = v
        return Conventions(**values, explicit=self.explicit)

    @property
    def channels_last(self) -> bool:
        """Whether the model takes and returns channels as the last axis."""
        return self.layout in ("NHWC", "NDHWC")

    def as_dict(self) -> dict[str, Any]:
        """The conventions that differ from the defaults (for run reports)."""
        d: dict[str, Any] = {"layout": self.layout}
        if self.patch_size is not None:
            d["patch_size"] = list(self.patch_size)
        if self.activation is not None:
            d["activation"] = self.activation
        if self.output_stride != 1:
            d["output_stride"] = self.output_stride
            d["output_grid"] = self.output_grid
        if self.output is not None:
            d["output"] = self.output
        return d

    # -- input ------------------------------------------------------------------------------
    def check_batch(self, batch: np.ndarray) -> None:
        """Refuse a batch the model cannot take (rank, fixed patch size, stride divisibility)."""
        if batch.ndim < 3:
            raise ModelError(f"a batch must be (N, C, *patch), got shape {batch.shape!r}")
        patch = tuple(batch.shape[2:])
        if self.layout in ("NCDHW", "NDHWC") and len(patch) != 3:
            raise ModelError(f"model layout {self.layout} needs 3D patches, got {patch!r}")
        if self.patch_size is not None and patch != self.patch_size:
            raise ModelError(f"model takes only patches of size {list(self.patch_size)}, got {list(patch)}: "
                             f"set tiling.patch_size: {list(self.patch_size)}")
        if self.output_stride > 1 and any(p % self.output_stride for p in patch):
            raise ModelError(f"model has output_stride {self.output_stride}: patch sizes must be multiples of it, "
                             f"got {list(patch)}")

    def model_input(self, batch: np.ndarray) -> np.ndarray:
        """``(N, C, *patch)`` in the model's layout (C-contiguous float32)."""
        if self.channels_last:
            batch = np.moveaxis(batch, 1, -1)
        return np.ascontiguousarray(batch, dtype=np.float32)

    # -- output -----------------------------------------------------------------------------
    def engine_output(self, out: Any, batch_shape: tuple[int, ...]) -> Any:
        """The model's (already selected) output as ``(N, K, *patch)`` float32 logits.

        A torch tensor stays a tensor on its device (the same conversions, in
        torch: :meth:`tileseg.predictors.torch.TorchPredictor.predict_tensor`);
        anything else becomes a numpy array.

        Raises
        ------
        ModelError
            If the shape does not fit the batch and these conventions.
        """
        tensor = not isinstance(out, np.ndarray) and type(out).__module__.startswith("torch")
        if tensor:
            out = out.float()
        else:
            out = np.asarray(out, dtype=np.float32)
        n, patch = batch_shape[0], tuple(batch_shape[2:])
        if out.ndim != len(batch_shape):
            raise ModelError(f"model output shape {tuple(out.shape)!r} does not match input batch "
                             f"{tuple(batch_shape)!r}: expected {len(batch_shape)} axes ({self._expected(batch_shape)})")
        given = tuple(out.shape)
        if self.channels_last:
            out = out.movedim(-1, 1) if tensor else np.moveaxis(out, -1, 1)
        s = self.output_stride
        small = tuple(p // s for p in patch)
        if out.shape[0] != n or tuple(out.shape[2:]) != small:
            hint = ""
            if s == 1 and out.shape[0] == n and all(p % o == 0 and p // o in (2, 4, 8, 16, 32)
                                                    for p, o in zip(patch, out.shape[2:]) if o):
                hint = f"; the output is {patch[0] // max(out.shape[2], 1)}x smaller: set output_stride"
            elif not self.channels_last and out.shape[-1] < out.shape[1] and tuple(out.shape[1:-1]) == patch:
                hint = "; it looks channels-last: set layout: NHWC"
            raise ModelError(f"model output shape {given!r} "
                             f"does not match input batch {tuple(batch_shape)!r}: expected {self._expected(batch_shape)}"
                             f"{hint}")
        if self.activation == "sigmoid" and out.shape[1] > 1:
            raise ModelError(f"model activation 'sigmoid' with {out.shape[1]} output channels (independent labels) "
                             "is not supported: the engine's probabilities are a softmax over channels")
        if tensor:
            return self._engine_tensor(out)
        if self.activation == "none":
            p = np.clip(out, _EPS, 1 - _EPS if out.shape[1] == 1 else 1)
            out = np.log(p) if out.shape[1] > 1 else np.log(p) - np.log1p(-p)
        if s > 1 and not self.output_grid:
            out = upsample_linear(out, s)
        return np.ascontiguousarray(out, dtype=np.float32)

    def _engine_tensor(self, out: Any) -> Any:
        """The activation and upsampling of :meth:`engine_output` in torch, on the tensor's device."""
        if self.activation == "none":
            p = out.clamp(float(_EPS), 1 - float(_EPS) if out.shape[1] == 1 else 1.0)
            out = p.log() if out.shape[1] > 1 else p.log() - (-p).log1p()
        if self.output_stride > 1 and not self.output_grid:
            import torch.nn.functional as F

            mode = {3: "linear", 4: "bilinear", 5: "trilinear"}[out.ndim]
            out = F.interpolate(out, scale_factor=self.output_stride, mode=mode, align_corners=False)
        return out.contiguous()

    def _expected(self, batch_shape: tuple[int, ...]) -> str:
        small = tuple(p // self.output_stride for p in batch_shape[2:])
        dims = ", ".join(map(str, small))
        return f"({batch_shape[0]}, {dims}, K)" if self.channels_last else f"({batch_shape[0]}, K, {dims})"


def select_output(out: Any, key: str | int | None, is_array: Any) -> Any:
    """The one array in a model's output: a dict entry, a tuple item or an output object's attribute.

    Parameters
    ----------
    out : object
        What the model returned.
    key : str or int, optional
        Which output to take; default ``logits`` or ``out`` when present, else
        the only array (or the first of a tuple/list).
    is_array : callable
        Whether an object is an array of this backend (``torch.is_tensor``...).

    Raises
    ------
    ModelError
        If the output holds no such entry (the message lists what it holds).
    """
    if is_array(out):
        if key is not None and not isinstance(key, int):
            raise ModelError(f"model output {key!r} asked for, but the model returned one array")
        return out
    if isinstance(out, dict) or (hasattr(out, "keys") and hasattr(out, "__getitem__")):
        names = list(out.keys())
        if key is None:
            key = next((k for k in ("logits", "out") if k in names), None)
            if key is None:
                arrays = [k for k in names if is_array(out[k])]
                if len(arrays) != 1:
                    raise ModelError(f"model returned a mapping with keys {names!r}: set the model's "
                                     "output: <key> to say which one holds the logits")
                key = arrays[0]
        if isinstance(key, int):
            key = names[key] if -len(names) <= key < len(names) else None
        if key not in names:
            raise ModelError(f"model output {key!r} not found: the model returned keys {names!r}")
        return select_output(out[key], None, is_array)
    if isinstance(out, (tuple, list)):
        if not out:
            raise ModelError("model returned an empty tuple")
        if key is None:
            key = 0
        if not isinstance(key, int) or not -len(out) <= key < len(out):
            raise ModelError(f"model output {key!r} not found: the model returned a tuple of {len(out)} items; "
                             "give an index")
        return select_output(out[key], None, is_array)
    for name in ([key] if isinstance(key, str) else ["logits", "out"]):
        value = getattr(out, name, None)
        if value is not None:
            return select_output(value, None, is_array)
    raise ModelError(f"model returned {type(out).__name__}, expected an array (N, K, *patch), or a dict, tuple "
                     "or output object holding one (set the model's output: <key or index>)")


def _axis_weights(n_in: int, s: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (lo, hi) and hi-weights of linear upsampling by ``s`` with centres aligned."""
    x = (np.arange(n_in * s, dtype=np.float64) + 0.5) / s - 0.5
    x = np.clip(x, 0, n_in - 1)
    lo = np.floor(x).astype(np.intp)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, (x - lo).astype(np.float32)


def upsample_linear(arr: np.ndarray, factor: int) -> np.ndarray:
    """Upsample the spatial axes (after N, K) of ``arr`` by ``factor``, linearly, pixel centres aligned.

    The same as ``torch.nn.functional.interpolate(mode="bilinear"/"trilinear",
    align_corners=False, scale_factor=factor)``.

    >>> upsample_linear(np.array([[[0.0, 4.0]]], np.float32), 2)[0, 0].tolist()
    [0.0, 1.0, 3.0, 4.0]
    """
    out = arr
    for axis in range(2, arr.ndim):
        lo, hi, w = _axis_weights(out.shape[axis], factor)
        shape = [1] * out.ndim
        shape[axis] = -1
        w = w.reshape(shape)
        out = np.take(out, lo, axis=axis) * (1 - w) + np.take(out, hi, axis=axis) * w
    return out.astype(np.float32, copy=False)
