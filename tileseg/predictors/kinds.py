"""Model kinds: the ways a model can be given, each with its own parameters.

``model:`` in a pipeline and ``model=`` in :func:`tileseg.segment` take one
form, ``{kind: {parameters}}``::

    model:
      torchscript: {path: models/unet2d.pt}
    model:
      exported: {path: models/unet2d.pt2}            # torch.export program
    model:
      onnx: {path: models/unet2d.onnx, providers: [TensorRT, CUDA, CPU]}
    model:
      state_dict:
        path: weights.pt
        architecture: {unet: {in_channels: 1, out_channels: 2, spatial_dims: 2}}
        # or {smp: {arch: Unet, encoder_name: resnet34, in_channels: 3, classes: 2}},
        # {torchvision: {name: deeplabv3_resnet50, num_classes: 3}}, {monai: {name: SegResNet, ...}}
    model:
      transformers: {config: segformer/config.json, path: segformer/model.safetensors}
    model:
      python: {callable: "mypackage.models:build", args: {width: 32}, path: weights.pt}   # runs your code

Every kind also takes the convention parameters of
:mod:`tileseg.predictors.conventions` (``layout``, ``patch_size``,
``activation``, ``output_stride``, ``output``).

A kind is a class registered under the ``models`` plugin kind (entry-point
group ``tileseg.models``). Its constructor's keyword arguments are the
parameters (checked against the signature when a pipeline is validated), and
:attr:`ModelKind.file_params` names those that are file paths: the pipeline
loader resolves them against the pipeline's folder and checks that they
exist, and the resume hash covers their content. A new kind touches no
schema, loader or runner code.
"""

from __future__ import annotations

import inspect
import os
from typing import Any, ClassVar

from ..errors import ConfigError
from .base import Predictor
from .conventions import CONVENTION_PARAMS, Conventions


class ModelKind:
    """Base class of model kinds: parameters in ``__init__``, :meth:`load` makes the predictor.

    A subclass's ``__init__`` takes ``**conventions``; its published signature
    (used to check pipeline parameters) lists :data:`CONVENTION_PARAMS`
    explicitly, so a misspelt parameter is still an error.
    """

    #: Name used in pipelines (``torchscript: {...}``).
    name: ClassVar[str] = ""
    #: Parameters that are file paths (resolved, checked and hashed by the pipeline loader).
    file_params: ClassVar[tuple[str, ...]] = ()
    conventions: Conventions = Conventions()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]
        own = [p for p in params if p.kind is not p.VAR_KEYWORD]
        if len(own) < len(params):
            extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in CONVENTION_PARAMS]
            cls.__signature__ = inspect.Signature(own + extra)  # type: ignore[attr-defined]

    def _set_conventions(self, conventions: dict[str, Any]) -> None:
        unknown = sorted(set(conventions) - set(CONVENTION_PARAMS))
        if unknown:
            from .. import registry

            accepted = [p for p in inspect.signature(type(self)).parameters]
            raise ConfigError(f"model.{self.name}: unknown parameter {unknown[0]!r}"
                              f"{registry.suggest(unknown[0], accepted)} (accepted: {', '.join(accepted)})")
        try:
            self.conventions = Conventions.from_params(conventions)
        except ConfigError as exc:
            raise ConfigError(f"model.{self.name}: {exc}") from None

    def load(self, *, device: str | None = None, precision: str = "fp32") -> Predictor:  # pragma: no cover
        """Build the predictor (weights are loaded lazily, once per worker process)."""
        raise NotImplementedError


def _path(value: Any, kind: str, key: str = "path") -> str:
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise ConfigError(f"model.{kind}.{key}: must be a file path, got {value!r}")
    return os.fspath(value)


class TorchScriptModel(ModelKind):
    """A TorchScript file (``torch.jit.save``).

    Parameters
    ----------
    path : str
        The ``.pt`` file.
    in_channels, out_channels : int, optional
        Override the channel counts read from the model.
    **conventions
        See :mod:`tileseg.predictors.conventions`.
    """

    name = "torchscript"
    file_params = ("path",)

    def __init__(self, path: str, in_channels: int | None = None, out_channels: int | None = None,
                 **conventions: Any) -> None:
        self.path = _path(path, self.name)
        self.in_channels, self.out_channels = in_channels, out_channels
        self._set_conventions(conventions)

    def load(self, *, device: str | None = None, precision: str = "fp32") -> Predictor:
        from .torch import TorchPredictor

        return TorchPredictor.from_torchscript(self.path, device=device, precision=precision,
                                               in_channels=self.in_channels, out_channels=self.out_channels,
                                               conventions=self.conventions)


class ExportedModel(ModelKind):
    """A ``torch.export`` program (``torch.export.save``, usually ``.pt2``; see ``tileseg export``).

    Channel counts and a fixed patch size are read from the program's
    signature; a program exported with a dynamic batch axis takes any batch size.

    Parameters
    ----------
    path : str
        The ``.pt2`` file.
    in_channels, out_channels : int, optional
        Override the channel counts read from the program.
    **conventions
        See :mod:`tileseg.predictors.conventions`.
    """

    name = "exported"
    file_params = ("path",)

    def __init__(self, path: str, in_channels: int | None = None, out_channels: int | None = None,
                 **conventions: Any) -> None:
        self.path = _path(path, self.name)
        self.in_channels, self.out_channels = in_channels, out_channels
        self._set_conventions(conventions)

    def load(self, *, device: str | None = None, precision: str = "fp32") -> Predictor:
        from .torch import TorchPredictor

        return TorchPredictor.from_exported(self.path, device=device, precision=precision,
                                            in_channels=self.in_channels, out_channels=self.out_channels,
                                            conventions=self.conventions)


class OnnxModel(ModelKind):
    """An ONNX file run by ONNX Runtime (extra ``onnx``).

    Parameters
    ----------
    path : str
        The ``.onnx`` file. External-data files must lie in its folder.
    providers : list of str
        Execution providers in order of preference, short (``TensorRT``,
        ``CUDA``, ``CPU``) or full names (``CUDAExecutionProvider``); default
        ``[CUDA, CPU]`` when the pipeline's ``device`` is ``cuda``, else ``[CPU]``.
        Listed providers this onnxruntime lacks are skipped with a warning
        naming them; none available is an error.
    in_channels, out_channels : int, optional
        Override the channel counts read from the model's signature.
    **conventions
        See :mod:`tileseg.predictors.conventions`.
    """

    name = "onnx"
    file_params = ("path",)

    def __init__(self, path: str, providers: list[str] | None = None, in_channels: int | None = None,
                 out_channels: int | None = None, **conventions: Any) -> None:
        from .onnx import check_providers

        self.path = _path(path, self.name)
        self.providers = None if providers is None else check_providers(providers)
        self.in_channels, self.out_channels = in_channels, out_channels
        self._set_conventions(conventions)

    def load(self, *, device: str | None = None, precision: str = "fp32") -> Predictor:
        from .onnx import OnnxPredictor

        if precision != "fp32":
            raise ConfigError(f"model.precision {precision!r} is autocast for PyTorch models; an ONNX model runs in "
                              "the precision it was exported in (export a float16 model, or use --int8)")
        providers = self.providers
        if providers is None:
            providers = ["CUDA", "CPU"] if str(device or "").startswith("cuda") else ["CPU"]
        return OnnxPredictor(self.path, providers=providers, device=device, in_channels=self.in_channels,
                             out_channels=self.out_channels, conventions=self.conventions)


def _architecture(architecture: Any, where: str) -> tuple[str, dict[str, Any]]:
    from .. import registry

    if not isinstance(architecture, dict) or len(architecture) != 1:
        raise ConfigError(f"{where}: must be a one-key mapping {{name: {{params}}}}, got {architecture!r}")
    (arch, params), = architecture.items()
    names = registry.available("architectures")
    if arch not in names:
        raise ConfigError(f"{where}: unknown architecture {arch!r}"
                          f"{registry.suggest(arch, names)} (installed: {', '.join(names)})")
    if not isinstance(params or {}, dict):
        raise ConfigError(f"{where}.{arch}: must be a mapping of parameters, got {params!r}")
    return arch, dict(params or {})


class StateDictModel(ModelKind):
    """A registered architecture (``architectures`` plugin kind) plus a state_dict file.

    Built-in architectures: ``unet`` (tileseg's own), ``smp`` (every
    segmentation_models_pytorch architecture with its encoder, timm ones as
    ``tu-<name>``), ``torchvision`` (its segmentation models; the ``out``
    entry of their dict output is taken), ``monai`` (``monai.networks.nets``:
    UNet, SegResNet, SwinUNETR, DynUNet, ...); see :mod:`tileseg.predictors.zoo`.
    The weights are read with ``torch.load(path, weights_only=True)`` (or
    safetensors for ``.safetensors``) and loaded strictly; nothing is downloaded.

    Parameters
    ----------
    path : str
        The state_dict file (a training checkpoint holding ``"state_dict"`` works too).
    architecture : dict
        ``{name: {parameters}}``, e.g. ``{"unet": {"in_channels": 1, "out_channels": 2}}``.
    in_channels, out_channels : int, optional
        Override the channel counts read from the model.
    **conventions
        See :mod:`tileseg.predictors.conventions`.
    """

    name = "state_dict"
    file_params = ("path",)

    def __init__(self, path: str, architecture: dict[str, dict[str, Any]], in_channels: int | None = None,
                 out_channels: int | None = None, **conventions: Any) -> None:
        self.path = _path(path, self.name)
        self.architecture, self.config = _architecture(architecture, "model.state_dict.architecture")
        self.in_channels, self.out_channels = in_channels, out_channels
        self._set_conventions(conventions)

    def load(self, *, device: str | None = None, precision: str = "fp32") -> Predictor:
        from .torch import TorchPredictor

        return TorchPredictor.from_architecture(self.architecture, self.config, self.path, device=device,
                                                precision=precision, in_channels=self.in_channels,
                                                out_channels=self.out_channels, conventions=self.conventions)


class TransformersModel(ModelKind):
    """A Hugging Face ``transformers`` semantic-segmentation model (SegFormer, UperNet, ...; extra ``zoo``).

    Built with ``AutoModelForSemanticSegmentation.from_config`` from a
    ``config.json`` (a saved model folder holds one) and its weights; nothing
    is fetched from the hub (``HF_HUB_OFFLINE`` is set). The logits are read
    from the output object; their output stride (4 for SegFormer) is taken
    from the model and upsampled to the patch (see
    :mod:`tileseg.predictors.conventions`).

    Parameters
    ----------
    config : str or dict
        A ``config.json`` file, or the configuration itself (needs ``model_type``).
    path : str, optional
        Weights: the ``model.safetensors`` of a ``save_pretrained`` folder, or a
        state_dict file (``model.state_dict()`` saved with ``torch.save``,
        read with ``weights_only=True``); none: random weights (tests).
    **conventions
        See :mod:`tileseg.predictors.conventions`.
    """

    name = "transformers"
    file_params = ("config", "path")

    def __init__(self, config: str | dict[str, Any], path: str | None = None, **conventions: Any) -> None:
        if isinstance(config, dict):
            if not isinstance(config.get("model_type"), str):
                raise ConfigError(f"model.transformers.config: needs model_type (e.g. segformer), got {config!r}")
            self.config: str | dict[str, Any] = dict(config)
        else:
            self.config = _path(config, self.name, "config")
        self.path = None if path is None else _path(path, self.name)
        self._set_conventions(conventions)

    def load(self, *, device: str | None = None, precision: str = "fp32") -> Predictor:
        from .torch import TorchPredictor

        if self.path is not None and self.path.endswith((".safetensors", ".safetensors.index.json")):
            config, weights = {"config": self.config, "pretrained": self.path}, None  # from_pretrained maps keys
        else:
            config, weights = {"config": self.config}, self.path
        return TorchPredictor.from_architecture("transformers", config, weights, device=device,
                                                precision=precision, conventions=self.conventions)


class PythonModel(ModelKind):
    """Any model built by your own Python callable; **this runs your code** when the pipeline loads.

    Parameters
    ----------
    callable : str
        ``"package.module:function"``, importable in every worker; called as
        ``function(**args)``. It returns a ``torch.nn.Module`` (weights from
        ``path`` loaded strictly, ``weights_only=True``), a
        :class:`~tileseg.predictors.Predictor`, or any callable mapping
        ``(N, C, *patch)`` numpy to ``(N, K, *patch)``.
    args : dict, optional
        Keyword arguments of the callable.
    path : str, optional
        A state_dict for the module it returns.
    in_channels, out_channels : int, optional
        Channel counts when the model cannot tell.
    **conventions
        See :mod:`tileseg.predictors.conventions` (torch modules).
    """

    name = "python"
    file_params = ("path",)

    def __init__(self, callable: str, args: dict[str, Any] | None = None, path: str | None = None,
                 in_channels: int | None = None, out_channels: int | None = None, **conventions: Any) -> None:
        from .zoo import check_target

        self.target = check_target(callable, "model.python.callable")
        if not isinstance(args or {}, dict):
            raise ConfigError(f"model.python.args: must be a mapping of keyword arguments, got {args!r}")
        self.args = dict(args or {})
        self.path = None if path is None else _path(path, self.name)
        self.in_channels, self.out_channels = in_channels, out_channels
        self._set_conventions(conventions)

    def load(self, *, device: str | None = None, precision: str = "fp32") -> Predictor:
        from .zoo import load_python_model

        return load_python_model(self, device=device, precision=precision)


def parse_spec(spec: dict[str, Any], where: str = "model") -> tuple[str, dict[str, Any]]:
    """``(kind, params)`` of a one-key model spec; a bare path string is ``{"path": ...}``.

    Raises
    ------
    ConfigError
        Not exactly one registered kind, or parameters that are not a mapping.
    """
    from .. import registry

    kinds = registry.available("models")
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"{where}: give exactly one model kind {{kind: {{parameters}}}} of {kinds} "
                          f"(got {sorted(spec) if isinstance(spec, dict) else spec!r})")
    (kind, params), = spec.items()
    if kind not in kinds:
        raise ConfigError(f"{where}: unknown model kind {kind!r}{registry.suggest(kind, kinds)} "
                          f"(installed: {', '.join(kinds)})")
    if isinstance(params, (str, os.PathLike)):
        params = {"path": os.fspath(params)}
    if not isinstance(params, dict):
        raise ConfigError(f"{where}.{kind}: parameters must be a mapping, got {params!r}")
    return kind, dict(params)


def build_kind(kind: str, params: dict[str, Any], where: str = "model") -> ModelKind:
    """Instantiate the registered model kind ``kind`` with ``params`` (errors name ``where.kind``)."""
    from .. import registry

    cls = registry.get("models", kind)
    try:
        return cls(**params)
    except ConfigError:
        raise
    except TypeError as exc:
        raise ConfigError(f"{where}.{kind}: {exc}") from exc
