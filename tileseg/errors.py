"""Every exception tileseg raises, in one place.

Each class also inherits the matching builtin, so callers that catch
``ValueError`` or ``OSError`` keep working.
"""

from __future__ import annotations


class TilesegError(Exception):
    """Base class of all tileseg errors."""


class ConfigError(TilesegError, ValueError):
    """A pipeline file or a parameter is invalid (message names the key)."""


class InputError(TilesegError, ValueError):
    """An input image is unusable: corrupt, truncated, wrong dtype, NaN, too large."""


class ImageNotFoundError(TilesegError, FileNotFoundError):
    """An input path does not exist or matches nothing."""


class FormatError(InputError):
    """A file exists but is not an image tileseg can read."""


class ImageTooLargeError(InputError):
    """An image declares more pixels or bytes than the configured budget."""


class TilingError(TilesegError, ValueError):
    """Patch size, overlap or chunking are impossible for the image."""


class ModelError(TilesegError, RuntimeError):
    """A model cannot be loaded or does not fit the image (channels, shape)."""


class PlacementError(TilesegError, RuntimeError):
    """No worker of the cluster offers the resources model inference needs (e.g. ``GPU``)."""


class PluginError(TilesegError, LookupError):
    """An unknown reader/writer/model/method name, or a broken plugin."""


class MissingDependencyError(TilesegError, ImportError):
    """An optional dependency is missing; the message names the extra to install."""


class OutputError(TilesegError, OSError):
    """An output cannot be written or would overwrite a finished result."""


class RunInterrupted(KeyboardInterrupt):
    """A run was stopped (Ctrl-C, SIGTERM): state is recorded, no final-named partial output is left."""


def require(module: str, extra: str):
    """Import ``module`` or raise :class:`MissingDependencyError` naming ``extra``.

    Parameters
    ----------
    module : str
        Importable module name, e.g. ``"torch"``.
    extra : str
        The tileseg extra that installs it, e.g. ``"models"``.

    Returns
    -------
    module
        The imported module.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingDependencyError(
            f"{module!r} is required for this feature: pip install 'tileseg[{extra}]'"
        ) from exc


#: Reader/engine keyword arguments named in error hints, by where the user sets them.
PIPELINE_KEYS = {"array": "input.array", "level": "input.level", "axes": "input.axes",
                 "nan_policy": "input.nan_policy", "fill_value": "input.fill_value", "max_pixels": "input.options.max_pixels",
                 "max_bytes": "input.options.max_bytes", "repair": "input.options.repair"}


def reword(text: str, names: dict[str, str]) -> str:
    """Replace the library's keyword hints (``array=...``, ``nan_policy='fill'``) in ``text``
    by what the user writes where they are (``--array NAME``, ``input.nan_policy: fill``).

    >>> reword("choose one with array=...", {"array": "--array"})
    'choose one with --array ...'
    >>> reword("or set nan_policy='fill'", PIPELINE_KEYS)
    'or set input.nan_policy: fill'
    """
    import re

    for key, where in names.items():
        sep = " " if where.startswith("-") else ": "
        text = re.sub(rf"(?<![\w.]){key}=(['\"]?)([^'\"\s,;)]*)\1",
                      lambda m, w=where + sep: w + m.group(2), text)
    return text
