"""Write the synthetic satellite demo scene: a 4-band GeoTIFF (EPSG:32633, 10 m) and its water ground truth.

Usage::

    python examples/make_geo_demo_data.py                       # data/geo/scene.tif, 4096 x 4096
    python examples/make_geo_demo_data.py --size 20000 20000    # the benchmark's scene

See :mod:`tileseg.testing.geoscene` for what is in it. Written block by block:
memory stays at one 512 x 512 block whatever the size.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tileseg.testing.geoscene import write_geotiff_scene  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("data/geo"), help="output folder (default data/geo)")
    ap.add_argument("--size", type=int, nargs=2, default=[4096, 4096], metavar=("ROWS", "COLS"))
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--force", action="store_true", help="overwrite existing files")
    args = ap.parse_args(argv)
    image, labels = args.out / "scene.tif", args.out / "scene_water.tif"
    if image.exists() and labels.exists() and not args.force:
        print(f"{image} exists (use --force to rewrite)")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    info = write_geotiff_scene(image, labels, args.size, seed=args.seed)
    rows, cols = info["shape"]
    print(f"wrote {image} ({rows} x {cols} x 4 uint16, {info['crs']}) and {labels}: "
          f"{100 * info['water_fraction']:.1f}% water, {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
