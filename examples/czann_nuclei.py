"""Segment a real fluorescence image with a real trained ONNX network, and measure how tile grids disagree.

The model and image come from napari-czann-segment 0.1.2 (see
``examples/fetch_czann.py``; fetched once into the data cache). The model
takes NHWC 1024 x 1024 x 1 float32 tiles (pixels divided by 65535, as its XML's
``ScaleInputsByBitdepth`` asks) and returns a two-class softmax, so it is given
to tileseg as::

    model:
      onnx: {path: nucleus_detector.onnx, layout: NHWC, patch_size: [1024, 1024], activation: none}

The image (2755 x 3675 uint16) is segmented with two different tile grids
(overlap 128 px = twice the XML's 64 px border, and 384 px), each with
``blend: crop`` and ``blend: gaussian``; the script prints, per blend, the
fraction of pixels whose class differs between the two grids, the nucleus
Dice between them and the mean absolute difference of the nucleus
probability. With ``--out`` it also writes the labels of the first grid
(gaussian) to a zarr store.

Run::

    python examples/czann_nuclei.py [--providers CUDA CPU] [--out nuclei.zarr]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import tileseg
from tileseg.testing.czann import fetch_czann, read_czi

GRIDS = {"overlap 128 px": 128, "overlap 384 px": 384}


def segment(image: np.ndarray, m, overlap_px: int, blend: str, providers: list[str]) -> np.ndarray:
    """Nucleus probability ``(H, W)`` float32 of one tile grid and blend."""
    out = tileseg.segment(image, m.model_spec(providers), patch_size=m.tile, overlap_px=overlap_px, blend=blend,
                          batch_size=2, output="probabilities", chunks=(1024, 1024),
                          preprocess=m.preprocess(image.dtype), class_names=m.classes)
    return out.data[1].compute(scheduler="threads", num_workers=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--providers", nargs="+", default=["CPU"], help="ONNX Runtime providers, in order")
    parser.add_argument("--out", default=None, help="write the labels (first grid, gaussian) to this zarr store")
    args = parser.parse_args()
    m = fetch_czann()
    image = read_czi(m.czi)
    print(f"image {image.shape} {image.dtype}; model tile {m.tile}, border {m.border}, classes {m.classes}")
    probs: dict[tuple[str, str], np.ndarray] = {}
    for blend in ("crop", "gaussian"):
        for grid, overlap in GRIDS.items():
            t0 = time.perf_counter()
            probs[blend, grid] = segment(image, m, overlap, blend, args.providers)
            print(f"{blend:8s} {grid}: {time.perf_counter() - t0:6.1f} s, nucleus fraction "
                  f"{(probs[blend, grid] > 0.5).mean():.4f}")
    a, b = GRIDS
    print(f"\ndisagreement between the grids ({a} vs {b}):")
    print("blend     pixels_differing  nucleus_dice  mean_abs_prob_diff  max_abs_prob_diff")
    for blend in ("crop", "gaussian"):
        pa, pb = probs[blend, a], probs[blend, b]
        la, lb = pa > 0.5, pb > 0.5
        dice = 2 * np.logical_and(la, lb).sum() / max(la.sum() + lb.sum(), 1)
        print(f"{blend:8s}  {np.mean(la != lb):16.5f}  {dice:12.5f}  {np.abs(pa - pb).mean():18.5f}  "
              f"{np.abs(pa - pb).max():17.4f}")
    if args.out:
        import zarr

        zarr.open_array(args.out, mode="w", shape=image.shape, chunks=(1024, 1024), dtype="uint8")[:] = (
            probs["gaussian", a] > 0.5)
        print(f"labels written to {args.out}")


if __name__ == "__main__":
    main()
