"""Plugin registry: readers, writers, models and methods found by entry point.

Built-ins are listed the same way as third-party plugins (``module:attr``
strings) and loaded lazily, so ``import tileseg`` stays cheap. Third-party
packages add entries to the ``tileseg.<kind>`` entry-point groups, one per
kind: ``readers``, ``writers``, ``models`` (model kinds such as
``torchscript``: how a model is given, see :mod:`tileseg.predictors.kinds`),
``architectures`` (networks for ``state_dict`` models), ``preprocess``,
``methods`` and ``postprocess``.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import warnings
from functools import cache
from typing import Any

from .errors import PluginError

log = logging.getLogger(__name__)

KINDS = ("readers", "writers", "models", "architectures", "preprocess", "methods", "postprocess")

# Built-in plugins, loaded on first use. Other modules add to these tables
# with :func:`register` (e.g. classical methods register themselves).
_BUILTINS: dict[str, dict[str, str]] = {
    "readers": {
        "zarr": "tileseg.readers.zarr:ZarrReader",
        "geotiff": "tileseg.readers.geotiff:GeoTiffReader",
        "nifti": "tileseg.readers.nifti:NiftiReader",
        "dicom": "tileseg.readers.dicom:DicomReader",
    },
    "writers": {
        "zarr": "tileseg.writers.zarr:ZarrWriter",
        "cog": "tileseg.writers.cog:COGWriter",
        "vector": "tileseg.writers.vector:VectorWriter",
        "nifti": "tileseg.writers.nifti:NiftiWriter",
        "dicom_seg": "tileseg.writers.dicom_seg:DicomSegWriter",
    },
    # model kinds: how a model is given (a file format), each with its own parameters
    "models": {
        "torchscript": "tileseg.predictors.kinds:TorchScriptModel",
        "state_dict": "tileseg.predictors.kinds:StateDictModel",
        "exported": "tileseg.predictors.kinds:ExportedModel",
        "onnx": "tileseg.predictors.kinds:OnnxModel",
        "transformers": "tileseg.predictors.kinds:TransformersModel",
        "python": "tileseg.predictors.kinds:PythonModel",
    },
    # network architectures a ``state_dict`` model is built from
    "architectures": {
        "unet": "tileseg.predictors.unet:UNet",
        "smp": "tileseg.predictors.zoo:smp",
        "torchvision": "tileseg.predictors.zoo:torchvision",
        "monai": "tileseg.predictors.zoo:monai",
        "transformers": "tileseg.predictors.zoo:transformers",
    },
    "preprocess": {
        "zscore": "tileseg.preprocess:zscore",
        "fixed": "tileseg.preprocess:fixed",
        "percentile": "tileseg.preprocess:percentile",
        "clip": "tileseg.preprocess:clip",
        "scale": "tileseg.preprocess:scale",
        "ct_window": "tileseg.preprocess_medical:ct_window",
        "zscore_masked": "tileseg.preprocess_medical:zscore_masked",
    },
    "methods": {},
    "postprocess": {},
}
_EXTRA: dict[str, dict[str, Any]] = {k: {} for k in KINDS}
# Packages whose import registers a whole table of built-ins (cheap: they
# register "module:attr" strings and import nothing heavy).
_BUILTIN_PACKAGES = {
    "methods": "tileseg.methods",
    "postprocess": "tileseg.postprocess",
}


def register(kind: str, name: str, target: Any) -> None:
    """Register a plugin object (or a ``"module:attr"`` string) under ``name``.

    Parameters
    ----------
    kind : str
        One of ``readers``, ``writers``, ``models``, ``methods``, ``postprocess``.
    name : str
        The name used in pipeline files.
    target : object or str
        The plugin, or where to import it from.
    """
    _check_kind(kind)
    _EXTRA[kind][name] = target


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise PluginError(f"unknown plugin kind {kind!r}; expected one of {KINDS}")
    package = _BUILTIN_PACKAGES.get(kind)
    if package is not None:
        importlib.import_module(package)  # registers its built-ins once


@cache
def _entry_points(kind: str) -> dict[str, Any]:
    from importlib.metadata import entry_points

    found: dict[str, Any] = {}
    try:
        eps = entry_points(group=f"tileseg.{kind}")
    except Exception as exc:  # pragma: no cover - broken metadata
        warnings.warn(f"could not list tileseg.{kind} plugins: {exc}", stacklevel=2)
        return found
    for ep in eps:
        found[ep.name] = ep
    return found


def available(kind: str) -> list[str]:
    """Names of the installed plugins of ``kind`` (built-ins included)."""
    _check_kind(kind)
    names = set(_BUILTINS[kind]) | set(_EXTRA[kind]) | set(_entry_points(kind))
    return sorted(names)


def _load_target(target: Any) -> Any:
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        obj = importlib.import_module(module)
        for part in attr.split(".") if attr else []:
            obj = getattr(obj, part)
        return obj
    if hasattr(target, "load") and hasattr(target, "group"):  # an EntryPoint
        return target.load()
    return target


def suggest(name: str, names: Any) -> str:
    """``"; did you mean 'x'?"`` for the nearest of ``names``, or ``""`` (the one did-you-mean helper).

    >>> suggest("otsuu", ["otsu", "li"])
    "; did you mean 'otsu'?"
    """
    near = difflib.get_close_matches(str(name), [str(n) for n in names], n=1)
    return f"; did you mean {near[0]!r}?" if near else ""


def get(kind: str, name: str) -> Any:
    """Load the plugin ``name`` of ``kind``.

    Raises
    ------
    PluginError
        If no such plugin is installed (the message lists the installed ones
        and the nearest name) or the plugin fails to import.
    """
    _check_kind(kind)
    target = _EXTRA[kind].get(name) or _BUILTINS[kind].get(name) or _entry_points(kind).get(name)
    if target is None:
        names = available(kind)
        what = {"preprocess": "preprocess step", "postprocess": "postprocess step", "models": "model kind"}.get(
            kind, kind[:-1])
        raise PluginError(f"unknown {what} {name!r}{suggest(name, names)} (installed: {', '.join(names) or 'none'})")
    try:
        return _load_target(target)
    except ImportError:
        raise
    except Exception as exc:
        raise PluginError(f"{kind} plugin {name!r} failed to load: {exc}") from exc
