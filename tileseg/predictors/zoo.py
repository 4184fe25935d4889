"""Architectures by name from the field's model libraries, and models built by the user's own code.

Registered under the ``architectures`` plugin kind, used with a state_dict::

    state_dict:
      path: weights.pt
      architecture:
        smp: {arch: Unet, encoder_name: resnet34, in_channels: 3, classes: 2}
        # torchvision: {name: deeplabv3_resnet50, num_classes: 3}
        # monai: {name: SegResNet, spatial_dims: 3, in_channels: 1, out_channels: 2}

Nothing is downloaded: pretrained-weight arguments (``encoder_weights``,
``weights``, ``weights_backbone``) are refused, the weights come from the
state_dict, and ``HF_HUB_OFFLINE`` is set before ``transformers`` or ``timm``
are imported. Each builder records on the module the conventions its outputs
follow (``tileseg_conventions``: which output to take, the output stride), so
pipelines need not repeat them.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
from typing import Any

from ..errors import ConfigError, ModelError, require

__all__ = ["smp", "torchvision", "monai", "transformers", "check_target", "load_python_model"]

_TARGET = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


def _offline() -> None:
    """Never reach a model hub from a worker (transformers, timm and smp honour these)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _no_download(name: str, **given: Any) -> None:
    for key, value in given.items():
        if value is not None:
            raise ConfigError(f"architecture {name!r}: {key}={value!r} would download weights; tileseg never "
                              f"downloads: leave {key} unset and give the weights as the state_dict path")


def smp(arch: str = "Unet", encoder_name: str = "resnet34", encoder_weights: str | None = None,
        **kwargs: Any) -> Any:
    """A segmentation_models_pytorch model (extra ``zoo``): any ``arch`` with any encoder.

    Parameters
    ----------
    arch : str
        ``Unet``, ``UnetPlusPlus``, ``FPN``, ``PSPNet``, ``DeepLabV3``, ``DeepLabV3Plus``,
        ``Linknet``, ``MAnet``, ``PAN``, ``UPerNet``, ``Segformer``, ``DPT``... (case-insensitive).
    encoder_name : str
        An smp encoder, or a timm one as ``tu-<timm name>``.
    encoder_weights : None
        Must stay unset (weights come from the state_dict).
    **kwargs
        ``in_channels``, ``classes`` and the architecture's own arguments.
    """
    _offline()
    _no_download("smp", encoder_weights=encoder_weights)
    lib = require("segmentation_models_pytorch", "zoo")
    archs = {a.__name__.lower(): a for a in lib.create_model.__globals__.get("_MODEL_ARCHITECTURES", [])}
    if archs and str(arch).lower() not in archs:
        from ..registry import suggest

        names = sorted(a.__name__ for a in archs.values())
        raise ConfigError(f"architecture 'smp': unknown arch {arch!r}{suggest(arch, names)} "
                          f"(available: {', '.join(names)})")
    try:
        model = lib.create_model(arch, encoder_name=encoder_name, encoder_weights=None, **kwargs)
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"architecture 'smp' {arch!r} with encoder {encoder_name!r}: {exc}") from exc
    stride = getattr(getattr(model, "encoder", None), "output_stride", None)
    if isinstance(stride, int) and stride > 1:
        model.size_divisor = stride  # smp refuses other sizes; the predictor says so before the forward
    return model


def torchvision(name: str, **kwargs: Any) -> Any:
    """A torchvision segmentation model (extra ``zoo``), e.g. ``deeplabv3_resnet50``, ``fcn_resnet50``, ``lraspp_mobilenet_v3_large``.

    The ``out`` entry of its dict output is taken.

    Parameters
    ----------
    name : str
        A model of ``torchvision.models.segmentation``.
    **kwargs
        ``num_classes``, ``aux_loss``... (``weights`` and ``weights_backbone`` must stay unset).
    """
    _no_download("torchvision", weights=kwargs.pop("weights", None),
                 weights_backbone=kwargs.pop("weights_backbone", None))
    require("torchvision", "zoo")
    from torchvision.models import get_model, list_models, segmentation

    names = sorted(list_models(module=segmentation))
    if name not in names:
        from ..registry import suggest

        raise ConfigError(f"architecture 'torchvision': unknown segmentation model {name!r}{suggest(name, names)} "
                          f"(available: {', '.join(names)})")
    model = get_model(name, weights=None, weights_backbone=None, **kwargs)
    model.tileseg_conventions = {"output": "out"}
    return model


def monai(name: str, **kwargs: Any) -> Any:
    """A network of ``monai.networks.nets`` (extra ``dev``/``monai``): ``UNet``, ``SegResNet``, ``SwinUNETR``, ``DynUNet``...

    Parameters
    ----------
    name : str
        The class name in ``monai.networks.nets``.
    **kwargs
        Its constructor arguments (``spatial_dims``, ``in_channels``, ``out_channels``...).
    """
    nets = require("monai.networks.nets", "monai")
    torch = require("torch", "models")
    cls = getattr(nets, str(name), None)
    if not (inspect.isclass(cls) and issubclass(cls, torch.nn.Module)):
        from ..registry import suggest

        names = sorted(n for n in dir(nets) if inspect.isclass(getattr(nets, n))
                       and issubclass(getattr(nets, n), torch.nn.Module))
        raise ConfigError(f"architecture 'monai': no network {name!r} in monai.networks.nets{suggest(name, names)}")
    model = cls(**kwargs)
    if name == "DynUNet" and getattr(model, "deep_supervision", False):
        model.tileseg_conventions = {"output": 0}  # eval mode returns the full-resolution head only
    return model


def _hf_config(config: str | dict[str, Any]) -> Any:
    _offline()
    lib = require("transformers", "zoo")
    try:
        if isinstance(config, dict):
            params = dict(config)
            return lib.AutoConfig.for_model(params.pop("model_type"), **params)
        import json

        with open(config, encoding="utf-8") as fh:
            params = json.load(fh)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read transformers config {config!r}: {exc}") from exc
    if not isinstance(params, dict) or not isinstance(params.get("model_type"), str):
        raise ModelError(f"transformers config {config!r} has no model_type")
    model_type = params.pop("model_type")
    try:
        return lib.AutoConfig.for_model(model_type, **params)
    except ValueError as exc:
        raise ModelError(f"transformers config {config!r}: {exc}") from exc


def transformers(config: str | dict[str, Any], pretrained: str | None = None) -> Any:
    """A Hugging Face semantic-segmentation model from its configuration.

    The logits are read from the output object (``.logits``); SegFormer-like
    models (logits at 1/4 of the input) declare ``output_stride`` 4.

    Parameters
    ----------
    config : str or dict
        A ``config.json`` path or the configuration (with ``model_type``).
    pretrained : str, optional
        The ``model.safetensors`` of a folder written by ``save_pretrained``:
        loaded with ``from_pretrained(folder, local_files_only=True,
        use_safetensors=True)``, which maps saved key names to the model's.
        None: random weights (a state_dict may be loaded afterwards).
    """
    cfg = _hf_config(config)
    lib = require("transformers", "zoo")
    try:
        if pretrained is not None:
            folder = os.path.dirname(os.path.abspath(pretrained))
            if os.path.basename(pretrained) not in ("model.safetensors", "model.safetensors.index.json"):
                raise ConfigError(f"transformers weights {pretrained!r}: give the model.safetensors of a folder "
                                  "written by save_pretrained, or a state_dict file (.pt)")
            model = lib.AutoModelForSemanticSegmentation.from_pretrained(
                folder, config=cfg, local_files_only=True, use_safetensors=True)
        else:
            model = lib.AutoModelForSemanticSegmentation.from_config(cfg)
    except OSError as exc:
        raise ModelError(f"cannot load transformers weights {pretrained!r}: {exc}") from exc
    except ValueError as exc:
        raise ConfigError(f"transformers config {str(config)[:200]!r}: not a semantic-segmentation model: {exc}") from exc
    declared: dict[str, Any] = {"output": "logits"}
    if cfg.model_type in ("segformer",):
        declared["output_stride"] = 4
    model.tileseg_conventions = declared
    model.in_channels = int(getattr(cfg, "num_channels", None) or getattr(getattr(cfg, "backbone_config", None),
                                                                              "num_channels", 3) or 3)
    model.out_channels = int(cfg.num_labels)
    labels = getattr(cfg, "id2label", None) or {}
    if labels and sorted(int(k) for k in labels) == list(range(cfg.num_labels)):
        model.tileseg_class_names = tuple(str(labels[k]) for k in sorted(labels, key=int))
    return model


# --------------------------------------------------------------------------- user code


def check_target(target: Any, where: str) -> str:
    """``"package.module:callable"`` or a :class:`ConfigError` naming ``where``."""
    if not isinstance(target, str) or not _TARGET.fullmatch(target):
        raise ConfigError(f"{where}: must be 'package.module:callable', got {target!r}")
    return target


def import_target(target: str) -> Any:
    """Import ``"package.module:attr"`` (runs that module's code)."""
    module, _, attr = target.partition(":")
    try:
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"model.python.callable: cannot import {target!r}: {exc}") from exc
    if not callable(obj):
        raise ConfigError(f"model.python.callable: {target!r} is not callable")
    return obj


def load_python_model(kind: Any, *, device: str | None = None, precision: str = "fp32") -> Any:
    """The predictor of a ``python:`` model kind (see :class:`tileseg.predictors.kinds.PythonModel`)."""
    import sys

    from .base import CallablePredictor, Predictor

    built = import_target(kind.target)(**kind.args)
    torch = sys.modules.get("torch")  # a torch module means torch is imported already
    torch_module = torch is not None and isinstance(built, torch.nn.Module)
    if torch_module:
        from .torch import TorchPredictor

        del built  # rebuilt (and cached) in each process that runs it, never pickled
        return TorchPredictor.from_architecture("python:" + kind.target, kind.args, kind.path, device=device,
                                                precision=precision, in_channels=kind.in_channels,
                                                out_channels=kind.out_channels, conventions=kind.conventions)
    if kind.path is not None:
        raise ConfigError(f"model.python.path: {kind.target!r} returned a {type(built).__name__}, not a "
                          "torch.nn.Module, so it cannot take a state_dict")
    if isinstance(built, Predictor):
        return built
    if callable(built):
        return CallablePredictor(built, in_channels=kind.in_channels, out_channels=kind.out_channels)
    raise ConfigError(f"model.python.callable: {kind.target!r} returned a {type(built).__name__}; expected a "
                      "torch.nn.Module, a Predictor or a callable")
