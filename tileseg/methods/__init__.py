"""Classical segmentation methods that give whole-image results on chunked data.

Every pipeline method is a callable ``f(data, *, spacing=None, **params)``
taking an :class:`~tileseg.image.Image` (the runner passes the image, so a
method sees its spacing, attributes such as a rescale slope/intercept, and
nodata) or a dask array ``(*spatial)`` / ``(C, *spatial)``, and returning a
lazy dask array. :func:`apply_method` wraps the result as an Image; methods
that make classes give a class map with class names, which the object
post-processing steps treat per class:

* global thresholds (:mod:`.thresholds`): ``otsu``, ``multi_otsu``, ``li``,
  ``yen``, ``triangle``, ``isodata``, ``mean``, ``fixed``, ``fixed_physical``;
* local filters with a halo (:mod:`.filters`): ``local``, ``gaussian``,
  ``median``, ``sobel``, ``scharr``, ``canny``;
* clustering (:mod:`.clustering`): ``kmeans``, ``gmm``;
* regions (:mod:`.regions`): ``region_growing``, ``watershed``.

Importing this package registers them in :mod:`tileseg.registry` (kind
``"methods"``) as lazy ``"module:attr"`` strings; nothing heavy is imported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .. import registry

if TYPE_CHECKING:  # pragma: no cover
    from ..image import Image

#: Pipeline method name -> ``"module:attr"``.
METHODS: dict[str, str] = {
    "otsu": "tileseg.methods.thresholds:otsu",
    "multi_otsu": "tileseg.methods.thresholds:multi_otsu",
    "li": "tileseg.methods.thresholds:li",
    "yen": "tileseg.methods.thresholds:yen",
    "triangle": "tileseg.methods.thresholds:triangle",
    "isodata": "tileseg.methods.thresholds:isodata",
    "mean": "tileseg.methods.thresholds:mean",
    "fixed": "tileseg.methods.thresholds:fixed",
    "fixed_physical": "tileseg.methods.thresholds:fixed_physical",
    "local": "tileseg.methods.filters:local",
    "gaussian": "tileseg.methods.filters:gaussian",
    "median": "tileseg.methods.filters:median",
    "sobel": "tileseg.methods.filters:sobel",
    "scharr": "tileseg.methods.filters:scharr",
    "canny": "tileseg.methods.filters:canny",
    "kmeans": "tileseg.methods.clustering:kmeans",
    "gmm": "tileseg.methods.clustering:gmm",
    "region_growing": "tileseg.methods.regions:region_growing",
    "watershed": "tileseg.methods.regions:watershed_method",
}

for _name, _target in METHODS.items():
    registry.register("methods", _name, _target)

#: Methods whose output is a class map, and how many classes it has given the parameters.
CLASS_MAPS: dict[str, Any] = {
    **{name: 2 for name in ("otsu", "li", "yen", "triangle", "isodata", "mean", "fixed", "fixed_physical",
                            "local", "canny", "region_growing")},
    "multi_otsu": lambda params: int(params.get("classes", 3)),
    "kmeans": lambda params: int(params.get("n_clusters", 3)),
    "gmm": lambda params: int(params.get("n_clusters", 3)),
}

__all__ = ["CLASS_MAPS", "METHODS", "apply_method"]


def apply_method(image: Image, name: str, params: dict[str, Any]) -> Image:
    """Run the registered method ``name`` on ``image``; return the result as an Image.

    Parameters
    ----------
    image : Image
        The (preprocessed) input.
    name : str
        Method name in the ``methods`` registry.
    params : dict
        The method's parameters.

    Returns
    -------
    Image
        Same geometry; a class map (``class_names``) for the methods in
        :data:`CLASS_MAPS` (``background``/``foreground`` for two classes),
        nodata where the image is invalid (its ``nodata``, ``mask`` or AOI).
    """
    from ..image import Image as _Image
    from ..image import nodata_outside
    from ..step_call import call_step

    result = call_step(registry.get("methods", name), image, params)
    if isinstance(result, _Image):
        return result
    k = CLASS_MAPS.get(name)
    k = k(params) if callable(k) else k
    names = None
    if k is not None and result.dtype.kind in "biu":
        names = ("background", "foreground") if k == 2 else tuple(f"class_{i}" for i in range(k))
    out = image.with_data(result, class_names=names, nodata=None)
    if names is None or out.has_channels:
        return out
    return nodata_outside(out, image.valid(), n_labels=len(names))  # outside the image's mask/AOI: nodata
