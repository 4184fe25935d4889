"""tileseg: memory-bounded tiled segmentation on Dask.

The public API is small and imports nothing heavy until it is used::

    import tileseg
    img = tileseg.open("scene.zarr")
    labels = tileseg.segment(img, {"torchscript": {"path": "unet.pt"}}, patch_size=(256, 256))
    tileseg.write(labels, "scene_seg.zarr")
"""

from __future__ import annotations

import logging

from .api import load_pipeline, open, run, segment, write
from .image import Image

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = ["open", "segment", "write", "run", "load_pipeline", "Image", "__version__"]
