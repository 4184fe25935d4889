"""Classical segmentation methods that give whole-image results on chunked data.

Every pipeline method is a callable ``f(data, *, spacing=None, **params)``
taking a dask array ``(*spatial)`` or ``(C, *spatial)`` (or an
:class:`~tileseg.image.Image`) and returning a lazy dask array of labels:

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

from .. import registry

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

__all__ = ["METHODS"]
