"""Write a PNG preview: the image (downsampled) with the segmentation overlaid.

Usage: ``python examples/preview.py IMAGE SEG OUT.png [--array image] [--rgb 3 2 1] [--max-size 1024]``.
Reads both lazily and only at the preview's resolution (strided), so it works
on images far larger than memory (Zarr, GeoTIFF, anything ``tileseg.open``
reads). 3D volumes show their middle slice; ``--rgb`` picks three bands of a
multi-band image (0-based) for a colour composite. Nodata stays black.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import tileseg


def _plane(img, max_size: int, bands=None) -> np.ndarray:
    data = img.data[list(bands)] if bands else (img.data[0] if img.has_channels else img.data)
    if data.ndim == 3 and not bands:
        data = data[data.shape[0] // 2]
    step = max(1, int(np.ceil(max(data.shape[-2:]) / max_size)))
    return np.asarray(data[..., ::step, ::step].compute())


def _stretch(x: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(x, [1, 99])
    return np.clip((x - lo) / max(hi - lo, 1e-9), 0, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("image")
    ap.add_argument("segmentation")
    ap.add_argument("out")
    ap.add_argument("--array", default=None, help="array of the input group holding the image (Zarr)")
    ap.add_argument("--rgb", type=int, nargs=3, default=None, metavar=("R", "G", "B"),
                    help="bands for a colour composite (0-based)")
    ap.add_argument("--max-size", type=int, default=1024)
    args = ap.parse_args()
    from PIL import Image as PILImage

    img = tileseg.open(args.image, array=args.array)
    image = _plane(img, args.max_size, args.rgb).astype(np.float64)
    seg = tileseg.open(args.segmentation)
    labels = _plane(seg, args.max_size)
    if args.rgb:
        rgb = np.stack([_stretch(b) for b in image], axis=-1)
    else:
        rgb = np.repeat(_stretch(image)[..., None], 3, axis=2)
    if img.nodata is not None:
        rgb[(image == img.nodata).all(axis=0) if args.rgb else image == img.nodata] = 0
    palette = np.array([[230, 50, 50], [50, 200, 80], [60, 120, 240], [240, 200, 40]], float) / 255
    for k in np.unique(labels):
        if k == 0 or k == seg.nodata:
            continue
        mask = labels == k
        rgb[mask] = 0.55 * rgb[mask] + 0.45 * palette[(int(k) - 1) % len(palette)]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    PILImage.fromarray((rgb * 255).astype(np.uint8)).save(args.out)
    print(f"preview written to {args.out} ({rgb.shape[1]}x{rgb.shape[0]})")


if __name__ == "__main__":
    main()
