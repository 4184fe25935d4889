"""Post-processing steps on chunked arrays, exact across chunk borders.

Every step is a callable ``step(data, *, spacing=None, **params) -> dask array``
registered in :mod:`tileseg.registry` under kind ``"postprocess"`` when this
package is imported (targets are ``"module:attr"`` strings, so nothing heavy
is imported until a step is used):

============================  ==================================================
name                          what it does
============================  ==================================================
argmax, threshold             classes from scores (:mod:`.classes`)
erosion, dilation,            binary morphology with ball/disk/box footprints
opening, closing              (:mod:`.morphology`; nonzero is foreground)
grey_erosion, grey_dilation,  greyscale morphology (:mod:`.morphology`)
grey_opening, grey_closing
fill_holes                    fill background not connected to the border
remove_small_objects,         by size in pixels (``min_size_px``) or physical
remove_small_holes            units (``min_size_phys``, uses ``spacing``)
keep_largest                  largest connected component (per class)
label                         connected components, int64, raster order
============================  ==================================================

Example pipeline section::

    postprocess:
      - threshold: {value: 0.5}
      - opening: {footprint: ball, radius: 2}
      - remove_small_objects: {min_size_phys: 50.0}
      - label: {connectivity: 1}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import ConfigError
from ..registry import get, register

STEPS: dict[str, str] = {
    "argmax": "tileseg.postprocess.classes:argmax",
    "threshold": "tileseg.postprocess.classes:threshold",
    "erosion": "tileseg.postprocess.morphology:binary_erosion",
    "dilation": "tileseg.postprocess.morphology:binary_dilation",
    "opening": "tileseg.postprocess.morphology:binary_opening",
    "closing": "tileseg.postprocess.morphology:binary_closing",
    "grey_erosion": "tileseg.postprocess.morphology:grey_erosion",
    "grey_dilation": "tileseg.postprocess.morphology:grey_dilation",
    "grey_opening": "tileseg.postprocess.morphology:grey_opening",
    "grey_closing": "tileseg.postprocess.morphology:grey_closing",
    "fill_holes": "tileseg.postprocess.objects:fill_holes",
    "remove_small_objects": "tileseg.postprocess.objects:remove_small_objects",
    "remove_small_holes": "tileseg.postprocess.objects:remove_small_holes",
    "keep_largest": "tileseg.postprocess.objects:keep_largest",
    "label": "tileseg.postprocess.objects:label_step",
}

for _name, _target in STEPS.items():
    register("postprocess", _name, _target)

__all__ = ["STEPS", "apply_postprocess"]


def _parse(step: Any, i: int) -> tuple[str, dict]:
    if isinstance(step, str):
        return step, {}
    if isinstance(step, Mapping) and len(step) == 1:
        name, params = next(iter(step.items()))
        if params is None:
            params = {}
        if isinstance(name, str) and isinstance(params, Mapping):
            return name, dict(params)
    raise ConfigError(f"postprocess[{i}]: expected a step name or {{name: {{params}}}}, got {step!r}")


def apply_postprocess(data: Any, steps: Sequence[Any], *, spacing: Sequence[float] | None = None) -> Any:
    """Apply post-processing steps in order (lazily where the step allows).

    Parameters
    ----------
    data : dask.array.Array
        Model or method output.
    steps : list
        Each a step name or ``{name: {param: value}}``, e.g.
        ``[{"opening": {"radius": 2}}, "fill_holes"]``.
    spacing : sequence of float, optional
        Pixel spacing, passed to every step (used by ``min_size_phys``).

    Returns
    -------
    dask.array.Array

    Raises
    ------
    ConfigError
        Malformed step, or parameters the step does not accept (the message
        names the step as ``postprocess[i].name``).
    PluginError
        Unknown step name (the message lists the installed ones).
    """
    spacing = tuple(spacing) if spacing is not None else None
    for i, step in enumerate(steps):
        name, params = _parse(step, i)
        func = get("postprocess", name)
        if "spacing" in params:
            raise ConfigError(f"postprocess[{i}].{name}: 'spacing' comes from the image, do not set it here")
        try:
            data = func(data, spacing=spacing, **params)
        except TypeError as exc:
            raise ConfigError(f"postprocess[{i}].{name}: {exc}") from exc
        except ConfigError as exc:
            raise ConfigError(f"postprocess[{i}].{name}: {exc}") from exc
    return data
