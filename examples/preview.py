"""Write a PNG/JPEG preview: the image (downsampled) with one or more segmentations overlaid, side by side.

Usage: ``python examples/preview.py IMAGE SEG [SEG ...] OUT.png [--array image] [--rgb 3 2 1] [--max-size 1024]
[--slice K] [--window CENTER WIDTH] [--titles A B ...]``.
Reads everything lazily and only at the preview's resolution (strided), so it
works on images far larger than memory (Zarr, GeoTIFF, DICOM, NIfTI, anything
``tileseg.open`` reads). 3D volumes show their middle slice (``--slice`` picks
another z index); ``--rgb`` picks three bands of a multi-band image (0-based)
for a colour composite; ``--window`` maps a value range (e.g. a CT window in
HU) to grey instead of the 1-99 % percentile stretch. Each segmentation gets
its own panel (class k in colour k, the same colours in every panel), with an
optional title. Nodata stays black. The format follows OUT's suffix.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import tileseg

PALETTE = np.array([[230, 50, 50], [50, 200, 80], [60, 120, 240], [240, 200, 40]], float) / 255


def _plane(img, max_size: int, bands=None, index: int | None = None) -> np.ndarray:
    data = img.data[list(bands)] if bands else (img.data[0] if img.has_channels else img.data)
    if data.ndim == 3 and not bands:
        data = data[data.shape[0] // 2 if index is None else index]
    step = max(1, int(np.ceil(max(data.shape[-2:]) / max_size)))
    return np.asarray(data[..., ::step, ::step].compute())


def _stretch(x: np.ndarray, window: tuple[float, float] | None = None) -> np.ndarray:
    if window is not None:
        lo, hi = window[0] - window[1] / 2, window[0] + window[1] / 2
    else:
        lo, hi = np.percentile(x, [1, 99])
    return np.clip((x - lo) / max(hi - lo, 1e-9), 0, 1)


def _overlay(rgb: np.ndarray, labels: np.ndarray, nodata) -> np.ndarray:
    out = rgb.copy()
    for k in np.unique(labels):
        if k == 0 or k == nodata:
            continue
        mask = labels == k
        out[mask] = 0.55 * out[mask] + 0.45 * PALETTE[(int(k) - 1) % len(PALETTE)]
    return out


def _titled(panel: np.ndarray, title: str | None):
    from PIL import Image as PILImage
    from PIL import ImageDraw

    image = PILImage.fromarray((panel * 255).astype(np.uint8))
    if title:
        ImageDraw.Draw(image).text((6, 4), title, fill=(255, 255, 255))
    return image


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("image")
    ap.add_argument("segmentations", nargs="+", metavar="SEG")
    ap.add_argument("out")
    ap.add_argument("--array", default=None, help="array of the input group holding the image (Zarr)")
    ap.add_argument("--rgb", type=int, nargs=3, default=None, metavar=("R", "G", "B"),
                    help="bands for a colour composite (0-based)")
    ap.add_argument("--max-size", type=int, default=1024)
    ap.add_argument("--slice", type=int, default=None, help="z index of a 3D volume (default: the middle)")
    ap.add_argument("--window", type=float, nargs=2, default=None, metavar=("CENTER", "WIDTH"),
                    help="value window mapped to grey (e.g. 40 400 for CT soft tissue in HU)")
    ap.add_argument("--titles", nargs="+", default=None, help="one title per segmentation panel")
    ap.add_argument("--quality", type=int, default=85, help="JPEG quality")
    args = ap.parse_args()
    from PIL import Image as PILImage

    img = tileseg.open(args.image, array=args.array)
    image = _plane(img, args.max_size, args.rgb, args.slice).astype(np.float64)
    if args.rgb:
        rgb = np.stack([_stretch(b, args.window) for b in image], axis=-1)
    else:
        rgb = np.repeat(_stretch(image, args.window)[..., None], 3, axis=2)
    if img.nodata is not None:
        rgb[(image == img.nodata).all(axis=0) if args.rgb else image == img.nodata] = 0
    titles = list(args.titles or []) + [None] * len(args.segmentations)
    panels = []
    for path, title in zip(args.segmentations, titles):
        seg = tileseg.open(path)
        panels.append(_titled(_overlay(rgb, _plane(seg, args.max_size, index=args.slice), seg.nodata), title))
    gap = 4
    sheet = PILImage.new("RGB", (sum(p.width for p in panels) + gap * (len(panels) - 1), panels[0].height))
    for i, panel in enumerate(panels):
        sheet.paste(panel, (i * (panel.width + gap), 0))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out, quality=args.quality) if args.out.lower().endswith((".jpg", ".jpeg")) else sheet.save(args.out)
    print(f"preview written to {args.out} ({sheet.width}x{sheet.height})")


if __name__ == "__main__":
    main()
