"""Predictors: turn a model spec into a callable ``(N, C, *patch) -> (N, K, *patch)``.

Importing this package does not import torch; :func:`load_predictor` does,
only when the spec needs it.

Model specs (``model:`` in a pipeline file)
-------------------------------------------
- a path (str or ``Path``) to a TorchScript file, or ``{"torchscript": path}``;
- ``{"unet": {"in_channels": 1, "out_channels": 2, "spatial_dims": 2, "depth": 3,
  "base_features": 16, "norm": "batch"}, "weights": "unet.pt"}``: the built-in
  :class:`~tileseg.predictors.unet.UNet` with a ``state_dict`` file (read with
  ``torch.load(..., weights_only=True)``). Any architecture registered under
  the ``models`` plugin kind is used the same way: ``{name: {config}, "weights": path}``;
- a ``torch.nn.Module``, a :class:`Predictor`, or any callable ``f(batch) -> array``.

A dict may also hold ``device``, ``precision``, ``in_channels``,
``out_channels`` (overrides), and the engine's own keys ``batch_size`` and
``classes``, which are ignored here.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from .. import registry
from ..errors import ConfigError
from .base import CallablePredictor, Predictor

__all__ = ["load_predictor", "Predictor", "CallablePredictor", "TorchPredictor", "known_kinds"]

registry.register("models", "unet", "tileseg.predictors.unet:UNet")

_FILE_KINDS = ("torchscript",)
_OPTION_KEYS = ("weights", "device", "precision", "in_channels", "out_channels")
_ENGINE_KEYS = ("batch_size", "classes")


def known_kinds() -> list[str]:
    """Model kinds a dict spec may name: ``torchscript`` plus the registered architectures."""
    return [*_FILE_KINDS, *registry.available("models")]


def __getattr__(name: str) -> Any:
    if name == "TorchPredictor":
        from .torch import TorchPredictor

        return TorchPredictor
    raise AttributeError(f"module 'tileseg.predictors' has no attribute {name!r}")


def _is_torch_module(obj: Any) -> bool:
    torch = sys.modules.get("torch")  # a module instance means torch is already imported
    return torch is not None and isinstance(obj, torch.nn.Module)


def load_predictor(spec: Any, *, device: str | None = None, precision: str = "fp32") -> Predictor:
    """Build a :class:`Predictor` from a model spec (see the module docstring).

    Parameters
    ----------
    spec : Predictor, torch.nn.Module, str, os.PathLike, dict or callable
        What to run.
    device : str, optional
        Torch device; default CUDA when available (decided in the process that
        runs the model), else CPU. A ``device`` key in a dict spec wins.
    precision : {"fp32", "fp16", "bf16"}
        Autocast precision for torch models. A ``precision`` key in a dict spec wins.

    Returns
    -------
    Predictor

    Raises
    ------
    ModelError
        If a model file is missing or corrupt (the message names the file).
    ConfigError
        For an unknown model kind (the message lists the known ones) or bad keys.

    Examples
    --------
    >>> import numpy as np
    >>> p = load_predictor(lambda b: b * 2)
    >>> p(np.ones((1, 1, 2, 2), np.float32)).max()
    np.float32(2.0)
    """
    if isinstance(spec, Predictor):
        return spec
    if isinstance(spec, (str, os.PathLike)):
        from .torch import TorchPredictor

        return TorchPredictor.from_torchscript(spec, device=device, precision=precision)
    if isinstance(spec, dict):
        return _from_dict(spec, device=device, precision=precision)
    if _is_torch_module(spec):
        from .torch import TorchPredictor

        return TorchPredictor(spec, device=device, precision=precision)
    if callable(spec):
        return CallablePredictor(spec)
    raise ConfigError(
        f"cannot make a model from {type(spec).__name__} {spec!r:.80}; expected a TorchScript path, "
        f"a dict naming one of {known_kinds()}, a torch.nn.Module, a Predictor or a callable")


def _from_dict(spec: dict, *, device: str | None, precision: str) -> Predictor:
    kinds = known_kinds()
    named = [k for k in spec if k in kinds]
    unknown = [k for k in spec if k not in kinds and k not in _OPTION_KEYS and k not in _ENGINE_KEYS]
    if unknown or len(named) != 1:
        what = (f"unknown key(s) {unknown!r}" if unknown
                else "no model kind" if not named else f"several model kinds {named!r}")
        raise ConfigError(
            f"model: {what}; name exactly one model kind of {kinds} "
            f"(optional keys: {list(_OPTION_KEYS)})")
    kind = named[0]
    device = spec.get("device", device)
    precision = spec.get("precision", precision)
    overrides = {k: spec[k] for k in ("in_channels", "out_channels") if spec.get(k) is not None}
    from .torch import TorchPredictor

    if kind == "torchscript":
        if spec.get("weights") is not None:
            raise ConfigError("model.weights: not used with torchscript (the file holds the weights)")
        path = spec[kind]
        if not isinstance(path, (str, os.PathLike)):
            raise ConfigError(f"model.torchscript: must be a file path, got {path!r}")
        return TorchPredictor.from_torchscript(path, device=device, precision=precision, **overrides)
    config = spec[kind] or {}
    if not isinstance(config, dict):
        raise ConfigError(f"model.{kind}: must be a mapping of architecture parameters, got {config!r}")
    builder = registry.get("models", kind)
    if isinstance(builder, type) and issubclass(builder, Predictor):
        if spec.get("weights") is not None:
            config = {**config, "weights": spec["weights"]}
        try:
            return builder(**config)
        except TypeError as exc:
            raise ConfigError(f"model.{kind}: bad parameters {config!r}: {exc}") from exc
    weights = spec.get("weights")
    if weights is not None and not isinstance(weights, (str, os.PathLike)):
        raise ConfigError(f"model.weights: must be a file path, got {weights!r}")
    return TorchPredictor.from_architecture(kind, config, weights, device=device, precision=precision,
                                            **overrides)
