"""Write the synthetic demo dataset: a large 2D scene and a 3D volume, each with ground truth.

Usage::

    python examples/make_demo_data.py                          # data/demo/, 8192x8192 and 256^3
    python examples/make_demo_data.py --out data/demo --size2d 4096 4096 --size3d 128 128 128

Each store is a zarr v3 group with arrays ``image`` (uint8), ``labels``
(uint8, 1 = blob) and ``instances`` (uint32 object ids), chunked
``--chunks2d`` / ``--chunks3d``, written chunk by chunk (memory stays at a
few chunks whatever the size). The pixels depend only on the size and the
seed (see :mod:`tileseg.testing.synthetic`), so regenerating gives the same
data.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tileseg.testing.synthetic import write_blobs_zarr  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("data/demo"), help="output directory (default data/demo)")
    ap.add_argument("--size2d", type=int, nargs=2, default=[8192, 8192], metavar=("Y", "X"))
    ap.add_argument("--size3d", type=int, nargs=3, default=[256, 256, 256], metavar=("Z", "Y", "X"))
    ap.add_argument("--chunks2d", type=int, nargs=2, default=[1024, 1024], metavar=("Y", "X"))
    ap.add_argument("--chunks3d", type=int, nargs=3, default=[64, 64, 64], metavar=("Z", "Y", "X"))
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--only", choices=["2d", "3d"], default=None, help="write only one of the two stores")
    ap.add_argument("--force", action="store_true", help="overwrite existing stores")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = [("2d", "scene2d.zarr", args.size2d, args.chunks2d), ("3d", "volume3d.zarr", args.size3d, args.chunks3d)]
    for name, fname, shape, chunks in jobs:
        if args.only and args.only != name:
            continue
        path = args.out / fname
        if path.exists() and not args.force:
            print(f"{path} exists; use --force to rewrite it", file=sys.stderr)
            continue
        t0 = time.perf_counter()
        group = write_blobs_zarr(path, shape, chunks, seed=args.seed, overwrite=args.force)
        n = group.attrs["tileseg_synthetic"]["n_blobs"]
        mpx = group["image"].size / 1e6
        print(f"wrote {path}: image {tuple(shape)} ({mpx:.1f} Mpx) uint8 + labels + instances, {n} blobs, "
              f"{time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
