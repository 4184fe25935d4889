"""tileseg: memory-bounded tiled segmentation on Dask.

The public API is small and imports nothing heavy until it is used::

    import tileseg
    img = tileseg.open("scene.zarr")
    labels = tileseg.segment(img, "unet.pt", patch_size=(256, 256))
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = ["open", "segment", "run", "load_pipeline", "Image", "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from .image import Image


def open(path: Any, **options: Any):  # noqa: A001 - mirrors rasterio.open / zarr.open
    """Open an image lazily; see :func:`tileseg.readers.open_image`."""
    from .readers import open_image

    return open_image(path, **options)


def segment(image: Any, model: Any, **kwargs: Any):
    """Segment an image lazily; see :func:`tileseg.graph.segment`."""
    from .graph import segment as _segment

    return _segment(image, model, **kwargs)


def load_pipeline(path: Any):
    """Load and validate a pipeline file; see :func:`tileseg.config.load_pipeline`."""
    from .config import load_pipeline as _load

    return _load(path)


def run(pipeline: Any, **kwargs: Any):
    """Run a pipeline; see :func:`tileseg.run.run_pipeline`."""
    from .run import run_pipeline

    return run_pipeline(pipeline, **kwargs)


def __getattr__(name: str) -> Any:
    if name == "Image":
        from .image import Image

        return Image
    raise AttributeError(f"module 'tileseg' has no attribute {name!r}")
