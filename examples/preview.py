"""Write a PNG preview: the image (downsampled) with the segmentation overlaid.

Usage: ``python examples/preview.py IMAGE.zarr SEG.zarr OUT.png [--array image] [--max-size 1024]``.
Reads both lazily and only at the preview's resolution (strided), so it works
on images far larger than memory. 3D volumes show their middle slice.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import tileseg


def _plane(img, max_size: int) -> np.ndarray:
    data = img.data[0] if img.has_channels else img.data
    if data.ndim == 3:
        data = data[data.shape[0] // 2]
    step = max(1, int(np.ceil(max(data.shape) / max_size)))
    return np.asarray(data[::step, ::step].compute())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("image")
    ap.add_argument("segmentation")
    ap.add_argument("out")
    ap.add_argument("--array", default="image", help="array of the input group holding the image")
    ap.add_argument("--max-size", type=int, default=1024)
    args = ap.parse_args()
    from PIL import Image as PILImage

    image = _plane(tileseg.open(args.image, array=args.array), args.max_size).astype(np.float64)
    labels = _plane(tileseg.open(args.segmentation), args.max_size)
    lo, hi = np.percentile(image, [1, 99])
    grey = np.clip((image - lo) / max(hi - lo, 1e-9), 0, 1)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    palette = np.array([[230, 50, 50], [50, 200, 80], [60, 120, 240], [240, 200, 40]], float) / 255
    for k in np.unique(labels):
        if k == 0:
            continue
        mask = labels == k
        rgb[mask] = 0.55 * rgb[mask] + 0.45 * palette[(int(k) - 1) % len(palette)]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    PILImage.fromarray((rgb * 255).astype(np.uint8)).save(args.out)
    print(f"preview written to {args.out} ({rgb.shape[1]}x{rgb.shape[0]})")


if __name__ == "__main__":
    main()
