"""Small previews of huge images, read at low resolution.

A quicklook never reads the image at full size: it opens the coarsest
pyramid level that is still at least ``max_side`` pixels (GeoTIFF overviews,
OME-Zarr multiscales), takes the middle plane of a volume, and otherwise
reads every ``step``-th pixel lazily (Dask decodes the chunks one at a time,
so memory stays at a chunk plus the preview).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

#: Colours of labels 1, 2, ... (label 0 and nodata stay transparent in overlays).
PALETTE = np.array([
    [230, 60, 60], [60, 190, 90], [70, 120, 240], [240, 200, 40], [180, 80, 220],
    [40, 200, 210], [250, 130, 40], [150, 150, 150],
], dtype=np.uint8)


def read_plane(path: Any, *, max_side: int = 192, array: str | None = None) -> tuple[np.ndarray, Any]:
    """A 2D plane of the image at ``path``, at most about ``max_side`` pixels per side.

    Parameters
    ----------
    path : str or os.PathLike
        Anything :func:`tileseg.open` reads (``study#UID`` items included).
    max_side : int
        Longest side of the plane returned (after striding).
    array : str, optional
        Node inside a container (Zarr).

    Returns
    -------
    plane : numpy.ndarray
        ``(y, x)``, or ``(c, y, x)`` for up to three channels.
    image : tileseg.Image
        The image opened at the level used (for nodata and class names).
    """
    from .api import open as open_image

    img = open_image(path, array=array)
    n_levels = int(img.reader_info.get("n_levels") or 1) if isinstance(img.reader_info, dict) else 1
    if n_levels > 1:  # the coarsest level that still has max_side pixels on its long side
        for level in range(n_levels - 1, 0, -1):
            coarse = open_image(path, array=array, level=level)
            if max(coarse.data.shape[-2:]) >= max_side:
                img = coarse
                break
    data = img.data
    channels = bool(getattr(img, "has_channels", False))
    if channels:
        data = data[: min(3, data.shape[0])] if data.shape[0] >= 3 else data[:1]
    spatial = data.ndim - (1 if channels else 0)
    if spatial == 3:  # a volume: its middle plane
        data = data[:, data.shape[1] // 2] if channels else data[data.shape[0] // 2]
    step = max(1, int(np.ceil(max(data.shape[-2:]) / max_side)))
    plane = np.asarray(data[..., ::step, ::step].compute() if hasattr(data, "compute") else data[..., ::step, ::step])
    if channels and plane.shape[0] == 1:
        plane = plane[0]
    return plane, img


def stretch(plane: np.ndarray, nodata: Any = None) -> np.ndarray:
    """Grey or RGB ``uint8`` from intensities: 1st-99th percentile stretch, nodata black.

    Returns ``(y, x)`` for one channel, ``(y, x, 3)`` for three.
    """
    x = plane.astype(np.float64)
    valid = np.isfinite(x)
    if nodata is not None and np.isfinite(nodata):
        valid &= x != nodata
    out = np.zeros(x.shape, np.uint8)
    if valid.any():
        lo, hi = np.percentile(x[valid], [1, 99])
        out = (np.clip((x - lo) / max(hi - lo, 1e-12), 0, 1) * 255).astype(np.uint8)
        out[~valid] = 0
    return np.moveaxis(out, 0, -1) if out.ndim == 3 else out


def colour_labels(labels: np.ndarray, nodata: Any = None) -> np.ndarray:
    """RGB ``uint8`` of a class or instance map: label 0 black, others from :data:`PALETTE`.

    Label ``k`` gets ``PALETTE[(k - 1) % len(PALETTE)]``; nodata is dark grey.
    """
    lab = np.asarray(labels)
    if lab.ndim == 3:  # probabilities (class, y, x): the most probable class
        lab = np.argmax(np.nan_to_num(lab, nan=-1.0), axis=0)
    rgb = np.zeros(lab.shape + (3,), np.uint8)
    fg = lab > 0
    if nodata is not None and np.isfinite(nodata):
        rgb[lab == nodata] = 40
        fg &= lab != nodata
    idx = (lab[fg].astype(np.int64) - 1) % len(PALETTE)
    rgb[fg] = PALETTE[idx]
    return rgb


def encode(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    """Encode ``uint8`` grey/RGB pixels as PNG or JPEG bytes (Pillow, the ``preview`` extra)."""
    try:
        from PIL import Image as PILImage
    except ImportError as exc:  # pragma: no cover - Pillow is in tileseg[preview]
        raise ImportError("quicklook images need Pillow: pip install 'tileseg[preview]'") from exc
    buf = io.BytesIO()
    kwargs = {"quality": 85} if fmt.upper() == "JPEG" else {"optimize": True}
    PILImage.fromarray(pixels).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def quicklook(path: Any, *, kind: str = "image", max_side: int = 192, array: str | None = None) -> bytes:
    """Encoded quicklook of the image at ``path``.

    Parameters
    ----------
    path : str or os.PathLike
        The image (input or output of a run).
    kind : {"image", "labels"}
        ``image``: intensities stretched, JPEG. ``labels``: a colour per
        label (argmax for probabilities), PNG.
    max_side : int
        Longest side in pixels.
    array : str, optional
        Node inside a container (Zarr).

    Returns
    -------
    bytes
        JPEG (``image``) or PNG (``labels``).
    """
    plane, img = read_plane(path, max_side=max_side, array=array)
    if kind == "labels":
        return encode(colour_labels(plane, img.nodata), "PNG")
    if kind != "image":
        raise ValueError(f"kind must be 'image' or 'labels', got {kind!r}")
    return encode(stretch(plane, img.nodata), "JPEG")
