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
                              (nodata pixels: -1)
============================  ==================================================

Pixels equal to the image's ``nodata`` take no part in any step and stay
``nodata`` (see :mod:`.nodata`).

Example pipeline section::

    postprocess:
      - threshold: {value: 0.5}
      - opening: {footprint: ball, radius: 2}
      - remove_small_objects: {min_size_phys: 50.0}
      - label: {connectivity: 1}
"""

from __future__ import annotations

import logging
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

log = logging.getLogger(__name__)

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


def apply_postprocess(image: Any, steps: Sequence[Any], *, spacing: Sequence[float] | None = None) -> Any:
    """Apply post-processing steps in order (lazily where the step allows).

    Parameters
    ----------
    image : Image or dask.array.Array
        Model or method output. An :class:`~tileseg.image.Image` gives every
        step its spacing, and class maps (``class_names`` set) are treated
        per class by the object steps (see :mod:`.class_maps`).
    steps : list
        Each a step name or ``{name: {param: value}}``, e.g.
        ``[{"opening": {"radius": 2}}, "fill_holes"]``.
    spacing : sequence of float, optional
        Pixel spacing for a bare array (used by ``min_size_phys``).

    Returns
    -------
    Image or dask.array.Array
        The same kind as ``image``.

    Raises
    ------
    ConfigError
        Malformed step, or parameters the step does not accept (the message
        names the step as ``postprocess[i].name``).
    PluginError
        Unknown step name (the message lists the installed ones).
    """
    from ..image import Image

    is_image = isinstance(image, Image)
    for i, step in enumerate(steps):
        name, params = _parse(step, i)
        if "spacing" in params:
            raise ConfigError(f"postprocess[{i}].{name}: 'spacing' comes from the image, do not set it here")
        try:
            if is_image:
                image = apply_step(image, name, params)
            else:
                image = get("postprocess", name)(image, spacing=None if spacing is None else tuple(spacing), **params)
        except TypeError as exc:
            raise ConfigError(f"postprocess[{i}].{name}: {exc}") from exc
        except ConfigError as exc:
            raise ConfigError(f"postprocess[{i}].{name}: {exc}") from exc
    return image


#: Steps whose output is no longer a class map.
_INSTANCE_STEPS = ("label",)
#: Steps that turn scores into a class map.
_CLASSIFY_STEPS = ("argmax", "threshold")


def apply_step(image: Any, name: str, params: dict[str, Any]) -> Any:
    """One registered step on an :class:`~tileseg.image.Image`; returns an Image.

    The step receives the image or the fields it declares (see
    :mod:`tileseg.step_call`). Object steps on a class map run per class
    (:func:`.class_maps.apply_per_class`); ``threshold`` on two-class
    probabilities thresholds the foreground class. A step may return an
    Image itself; a bare array is wrapped with the input's geometry.

    Nodata (see :mod:`.nodata`): pixels equal to the image's ``nodata`` are
    ``nodata`` in the result, which keeps the value; ``label`` marks them
    :data:`.nodata.LABEL_NODATA`, ``argmax``/``threshold`` (pixels whose
    scores are all nodata) the class map's nodata (the largest value of a
    dtype one wider than the classes need, as :func:`tileseg.segment` does).
    Steps that declare ``nodata`` keep those pixels out of their work; for
    one that does not, tileseg writes them back afterwards when its result
    keeps the input's dtype and shape.
    """
    from .class_maps import OBJECT_STEPS, apply_per_class

    func = get("postprocess", name)
    if name in OBJECT_STEPS and image.is_class_map:
        result = apply_per_class(name, image.data, len(image.class_names), image.nodata, image.spacing, params)
        return image.with_data(result, nodata=image.nodata)
    from ..step_call import call_step

    if name == "threshold" and image.has_channels and image.shape[0] == 2 and not params.get("per_class"):
        image = image.with_data(image.data[1:], nodata=image.nodata)  # a two-class map: the foreground
    result = call_step(func, image, params)
    from ..image import Image, label_dtype

    if isinstance(result, Image):
        return result
    names = image.class_names
    if name in _INSTANCE_STEPS or result.dtype.kind not in "biu":
        names = None
    elif name in _CLASSIFY_STEPS:
        k = int(image.shape[0]) if image.has_channels else 2
        names = image.class_names if image.class_names is not None and len(image.class_names) == max(k, 2) else (
            ("background", "foreground") if k <= 2 else tuple(f"class_{j}" for j in range(k)))
        if name == "threshold":
            names = names if len(names) == 2 else ("background", "foreground")
    if names is not None and result.dtype == bool:
        result = result.astype(label_dtype(len(names)))  # class maps are stored as unsigned integers
    if image.nodata is None:
        return image.with_data(result, class_names=names)
    return _with_nodata(image, name, func, result, names)


def _with_nodata(image: Any, name: str, func: Any, result: Any, names: Any) -> Any:
    """The step's ``result`` as an Image whose nodata pixels are those of ``image`` (see :func:`apply_step`)."""
    import inspect

    from ..image import nodata_outside
    from .nodata import LABEL_NODATA, invalid_pixels, restore

    if name in _CLASSIFY_STEPS:
        valid = image.with_data(image.data, mask=None).valid()  # a pixel whose scores are all nodata
        return nodata_outside(image.with_data(result, class_names=names, nodata=None), valid,
                              n_labels=len(names) if names is not None else None)
    try:
        declares = "nodata" in inspect.signature(func).parameters
    except (TypeError, ValueError):
        declares = False
    if name in _INSTANCE_STEPS and declares:
        return image.with_data(result, class_names=names, nodata=LABEL_NODATA)
    if declares:  # the step kept them out of its work and wrote them back
        return image.with_data(result, class_names=names, nodata=image.nodata)
    if result.dtype != image.dtype or tuple(result.shape) != image.shape:
        log.warning("postprocess step %r changed the dtype or shape (%s %s -> %s %s) and does not declare "
                    "'nodata': its result has no nodata", name, image.dtype, image.shape, result.dtype,
                    tuple(result.shape))
        return image.with_data(result, class_names=names, nodata=None)
    result = restore(result, invalid_pixels(image.data, image.nodata), image.nodata)
    return image.with_data(result, class_names=names, nodata=image.nodata)
