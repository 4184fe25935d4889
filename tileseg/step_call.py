"""How methods and post-processing steps receive an image: the Image, or the geometry they declare.

A registered callable whose first parameter is named ``image`` gets the
:class:`~tileseg.image.Image` itself (tileseg's own methods do; they read
spacing, attributes such as a rescale slope/intercept, nodata and mask from
it). Any other callable gets the pixel array first, plus each of
:data:`IMAGE_ARGS` that its signature declares (``spacing``, ``nodata``,
``attrs``, ...), taken from the image. The user's parameters never set
these: they come from the image.
"""

from __future__ import annotations

import inspect
from typing import Any

from .errors import ConfigError

#: Image fields a step can declare as keyword parameters to receive them.
IMAGE_ARGS = ("spacing", "origin", "units", "direction", "crs", "transform", "nodata", "mask", "attrs", "class_names")


def _parameters(fn: Any) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return {}


def takes_image(fn: Any) -> bool:
    """Whether ``fn``'s first parameter is named ``image`` (it receives the Image)."""
    params = list(_parameters(fn))
    return bool(params) and params[0] == "image"


def call_step(fn: Any, image: Any, params: dict[str, Any]) -> Any:
    """Call a method or step on ``image`` with the user's ``params`` (see the module docstring)."""
    if takes_image(fn):
        return fn(image, **params)
    declared = list(_parameters(fn))[1:]  # the first parameter takes the pixels, whatever its name
    extra = {k: getattr(image, k) for k in IMAGE_ARGS if k in declared and k not in params}
    return fn(image.data, **extra, **params)


def check_params(fn: Any, what: str, name: str, params: dict[str, Any], *, skip: int = 1,
                 from_image: bool = True) -> None:
    """Check ``params`` against ``fn``'s keyword parameters (after its first ``skip`` ones).

    Unknown keywords (with the nearest accepted name) and missing required
    ones are errors. With ``from_image`` (a method or step) the image fields
    of :data:`IMAGE_ARGS` are not accepted: they come from the image.
    Callables taking ``**kwargs`` accept anything.

    Raises
    ------
    ConfigError
        Naming the parameter and the step (a ``ValueError``, so pydantic
        validators report it at the right YAML key).
    """
    from .registry import suggest

    ps = list(_parameters(fn).values())[skip:]
    if any(p.kind is p.VAR_KEYWORD for p in ps):
        return
    accepted = [p.name for p in ps if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
                and (p.name not in IMAGE_ARGS or not from_image)]
    for key in params:
        if key not in accepted:
            raise ConfigError(
                f"unknown parameter {key!r} for {what} {name!r}{suggest(key, accepted)} "
                f"(accepted: {', '.join(accepted) or 'none'})"
            )
    missing = [p.name for p in ps if p.name in accepted and p.default is p.empty and p.name not in params]
    if missing:
        raise ConfigError(f"{what} {name!r} needs parameter(s) {', '.join(missing)}")
