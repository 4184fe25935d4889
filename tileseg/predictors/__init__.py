"""Predictors: turn a model spec into a callable ``(N, C, *patch) -> (N, K, *patch)``.

Importing this package does not import torch; :func:`load_predictor` does,
only when the spec needs it.

Model specs (``model:`` in a pipeline file, ``model=`` in :func:`tileseg.segment`)
-------------------------------------------------------------------------------
One form: ``{kind: {parameters}}`` with a registered model kind (see
:mod:`tileseg.predictors.kinds`)::

    {"torchscript": {"path": "unet.pt"}}
    {"exported": {"path": "unet.pt2"}}
    {"onnx": {"path": "unet.onnx", "providers": ["CUDA", "CPU"], "layout": "NHWC"}}
    {"state_dict": {"path": "weights.pt", "architecture": {"unet": {"in_channels": 1, "out_channels": 2}}}}
    {"state_dict": {"path": "w.pt", "architecture": {"smp": {"arch": "FPN", "encoder_name": "resnet34"}}}}
    {"transformers": {"config": "segformer/config.json", "path": "segformer/model.safetensors"}}
    {"python": {"callable": "mypackage.models:build", "args": {}}}

Every kind also takes the conventions of :mod:`tileseg.predictors.conventions`
(``layout``, ``patch_size``, ``activation``, ``output_stride``, ``output_grid``, ``output``).

In Python a model may also be a ``torch.nn.Module``, a :class:`Predictor`, a
TorchScript path, or any callable ``f(batch) -> array``.

Speed options (:func:`with_speed_options`): flip test-time augmentation
folded into the batch (:mod:`.tta`), channels-last and ``torch.compile``
for torch models; every predictor halves its batch on device out-of-memory
(:mod:`.oom`).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from .. import registry
from ..errors import ConfigError
from .base import CallablePredictor, Predictor

__all__ = ["load_predictor", "with_speed_options", "Predictor", "CallablePredictor", "TorchPredictor", "model_kind"]

def __getattr__(name: str) -> Any:
    if name == "TorchPredictor":
        from .torch import TorchPredictor

        return TorchPredictor
    raise AttributeError(f"module 'tileseg.predictors' has no attribute {name!r}")


def model_kind(spec: dict[str, Any], where: str = "model") -> Any:
    """The :class:`~tileseg.predictors.kinds.ModelKind` a ``{kind: {parameters}}`` spec names (nothing loaded)."""
    from .kinds import build_kind, parse_spec

    kind, params = parse_spec(spec, where)
    return build_kind(kind, params, where)


def _is_torch_module(obj: Any) -> bool:
    torch = sys.modules.get("torch")  # a module instance means torch is already imported
    return torch is not None and isinstance(obj, torch.nn.Module)


def load_predictor(spec: Any, *, device: str | None = None, precision: str = "fp32", tta: Any = (),
                   channels_last: bool = False, compile: bool = False) -> Predictor:
    """Build a :class:`Predictor` from a model spec (see the module docstring).

    Parameters
    ----------
    spec : dict, str, os.PathLike, torch.nn.Module, Predictor or callable
        ``{kind: {parameters}}``, a TorchScript path, a module, a predictor or a callable.
    device : str, optional
        Torch device; default CUDA when available (decided in the process that
        runs the model), else CPU.
    precision : {"fp32", "fp16", "bf16"}
        Autocast precision for torch models.
    tta, channels_last, compile
        Speed options, see :func:`with_speed_options`.

    Returns
    -------
    Predictor

    Raises
    ------
    ModelError
        If a model file is missing or corrupt (the message names the file).
    ConfigError
        For an unknown model kind (the message lists the installed ones) or bad parameters.

    Examples
    --------
    >>> import numpy as np
    >>> p = load_predictor(lambda b: b * 2)
    >>> p(np.ones((1, 1, 2, 2), np.float32)).max()
    np.float32(2.0)
    """
    return with_speed_options(_build(spec, device, precision), tta=tta, channels_last=channels_last,
                              compile=compile)


def with_speed_options(predictor: Predictor, *, tta: Any = (), channels_last: bool = False,
                       compile: bool = False) -> Predictor:
    """``predictor`` with flip TTA, channels-last and ``torch.compile`` applied (see :mod:`.tta`, :mod:`.torch`).

    Parameters
    ----------
    predictor : Predictor
        Any predictor; a torch predictor folds TTA on its device, any other one
        is wrapped in :class:`~tileseg.predictors.tta.FlipTTAPredictor`.
    tta : sequence of str
        Flip axes among ``"x"``, ``"y"``, ``"z"``; every combination is
        averaged (empty: no TTA).
    channels_last, compile : bool
        Torch models only.

    Raises
    ------
    ConfigError
        ``channels_last``/``compile`` for a model that is not a torch model,
        or an unknown flip axis.
    """
    from .tta import FlipTTAPredictor, check_axes

    axes = check_axes(tta, "model.tta")
    if not (axes or channels_last or compile):
        return predictor
    if hasattr(predictor, "with_options"):  # TorchPredictor
        return predictor.with_options(tta=axes or None, channels_last=channels_last or None, compile=compile or None)
    if channels_last or compile:
        which = "model.channels_last" if channels_last else "model.compile"
        raise ConfigError(f"{which}: applies to PyTorch models only, not to {type(predictor).__name__}")
    return FlipTTAPredictor(predictor, axes)


def _build(spec: Any, device: str | None, precision: str) -> Predictor:
    if isinstance(spec, Predictor):
        return spec
    if isinstance(spec, (str, os.PathLike)):
        from .torch import TorchPredictor

        return TorchPredictor.from_torchscript(spec, device=device, precision=precision)
    if isinstance(spec, dict):
        return model_kind(spec).load(device=device, precision=precision)
    if _is_torch_module(spec):
        from .torch import TorchPredictor

        return TorchPredictor(spec, device=device, precision=precision)
    if callable(spec):
        return CallablePredictor(spec)
    raise ConfigError(
        f"cannot make a model from {type(spec).__name__} {spec!r:.80}; expected {{kind: {{parameters}}}} with a "
        f"kind of {registry.available('models')}, a TorchScript path, a torch.nn.Module, a Predictor or a callable")
