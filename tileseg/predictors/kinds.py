"""Model kinds: the ways a model can be given, each with its own parameters.

``model:`` in a pipeline and ``model=`` in :func:`tileseg.segment` take one
form, ``{kind: {parameters}}``::

    model:
      torchscript: {path: models/unet2d.pt}
    model:
      state_dict:
        path: weights.pt
        architecture: {unet: {in_channels: 1, out_channels: 2, spatial_dims: 2}}

A kind is a class registered under the ``models`` plugin kind (entry-point
group ``tileseg.models``). Its constructor's keyword arguments are the
parameters (checked against the signature when a pipeline is validated), and
:attr:`ModelKind.file_params` names those that are file paths: the pipeline
loader resolves them against the pipeline's folder and checks that they
exist, and the resume hash covers their content. A new kind (ONNX, exported
programs, a Python factory) touches no schema, loader or runner code.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

from ..errors import ConfigError
from .base import Predictor


class ModelKind:
    """Base class of model kinds: parameters in ``__init__``, :meth:`load` makes the predictor."""

    #: Name used in pipelines (``torchscript: {...}``).
    name: ClassVar[str] = ""
    #: Parameters that are file paths (resolved, checked and hashed by the pipeline loader).
    file_params: ClassVar[tuple[str, ...]] = ()

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
    """

    name = "torchscript"
    file_params = ("path",)

    def __init__(self, path: str, in_channels: int | None = None, out_channels: int | None = None) -> None:
        self.path = _path(path, self.name)
        self.in_channels, self.out_channels = in_channels, out_channels

    def load(self, *, device: str | None = None, precision: str = "fp32") -> Predictor:
        from .torch import TorchPredictor

        return TorchPredictor.from_torchscript(self.path, device=device, precision=precision,
                                               in_channels=self.in_channels, out_channels=self.out_channels)


class StateDictModel(ModelKind):
    """A registered architecture (``architectures`` plugin kind, e.g. ``unet``) plus a state_dict file.

    The weights are read with ``torch.load(path, weights_only=True)`` and loaded strictly.

    Parameters
    ----------
    path : str
        The state_dict file (a training checkpoint holding ``"state_dict"`` works too).
    architecture : dict
        ``{name: {parameters}}``, e.g. ``{"unet": {"in_channels": 1, "out_channels": 2}}``.
    in_channels, out_channels : int, optional
        Override the channel counts read from the model.
    """

    name = "state_dict"
    file_params = ("path",)

    def __init__(self, path: str, architecture: dict[str, dict[str, Any]], in_channels: int | None = None,
                 out_channels: int | None = None) -> None:
        from .. import registry

        self.path = _path(path, self.name)
        if not isinstance(architecture, dict) or len(architecture) != 1:
            raise ConfigError(f"model.state_dict.architecture: must be a one-key mapping {{name: {{params}}}}, "
                              f"got {architecture!r}")
        (arch, params), = architecture.items()
        names = registry.available("architectures")
        if arch not in names:
            raise ConfigError(f"model.state_dict.architecture: unknown architecture {arch!r}"
                              f"{registry.suggest(arch, names)} (installed: {', '.join(names)})")
        if not isinstance(params or {}, dict):
            raise ConfigError(f"model.state_dict.architecture.{arch}: must be a mapping of parameters, got {params!r}")
        self.architecture, self.config = arch, dict(params or {})
        self.in_channels, self.out_channels = in_channels, out_channels

    def load(self, *, device: str | None = None, precision: str = "fp32") -> Predictor:
        from .torch import TorchPredictor

        return TorchPredictor.from_architecture(self.architecture, self.config, self.path, device=device,
                                                precision=precision, in_channels=self.in_channels,
                                                out_channels=self.out_channels)


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
