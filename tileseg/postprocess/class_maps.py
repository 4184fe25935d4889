"""Object steps on class maps: act on the connected components of each class.

A class map (an :class:`~tileseg.image.Image` with ``class_names``, e.g. a
threshold method's 0/1 output or a model's argmax) is not an instance label
image: ``remove_small_objects`` on ``0/1`` labels would see one object made
of the whole foreground. Here every class is treated as a mask, as the user
means: small components of each class go to 0 (background), holes of each
class are filled with that class where they are background, and
``keep_largest`` keeps the largest component of each class. Pixels equal to
the image's ``nodata`` are left alone and take no part (as :mod:`.nodata`
describes: in no object, in no hole, and background touching them is no hole
for ``fill_holes``).
"""

from __future__ import annotations

from typing import Any

import dask.array as da
import numpy as np

from ..stitching.labels import components
from . import objects
from .nodata import fill, restore
from .nodata import invalid_pixels as nodata_pixels

#: Steps that need connected components; on class maps they run per class.
OBJECT_STEPS = ("remove_small_objects", "remove_small_holes", "fill_holes", "keep_largest")


def apply_per_class(name: str, data: da.Array, n_classes: int, nodata: Any, spacing: Any,
                    params: dict[str, Any]) -> da.Array:
    """Run object step ``name`` on each class of the class map ``data`` (classes ``1 .. n_classes - 1``).

    Returns
    -------
    dask.array.Array
        A class map of the same dtype.
    """
    zero = np.zeros((), data.dtype)
    invalid = nodata_pixels(data, nodata)
    if name == "remove_small_objects":
        connectivity = params.get("connectivity", 1)
        reuse = n_classes <= 2  # one foreground class: its components are the mask's
        # nodata pixels form components of their own value (joining no class), so that the result is
        # read from the components alone: no second computation of the input
        comps = components(data, connectivity=connectivity, by_value=True,
                           stats={"sizes", "first"} if reuse else {"sizes"})
        is_nodata = np.zeros(comps.n, dtype=bool) if invalid is None else comps.values == nodata
        small = objects._small(comps.sizes, params.get("min_size_px"), params.get("min_size_phys"), spacing,
                               data.ndim) & ~is_nodata
        out = comps.apply(np.where(small, zero, comps.values).astype(data.dtype), background=zero)
        if reuse:  # a later label step numbers the kept components (see objects.label_step)
            objects.remember_components(out, comps, ~small & ~is_nodata, connectivity, nodata, is_nodata)
        return out
    x = fill(data, invalid, zero)
    if name == "keep_largest":
        out = objects.keep_largest(x, per_class=True, connectivity=params.get("connectivity", 1))
    else:
        out = x
        for c in range(1, n_classes):
            if name == "fill_holes":
                filled = objects.holes_filled(x == c, invalid, **params)
            else:
                filled = objects.small_holes_filled(x == c, invalid, spacing=spacing, **params)
            out = da.where(filled & (out == 0), data.dtype.type(c), out)
    return restore(out, invalid, nodata)
