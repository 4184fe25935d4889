"""Write the synthetic CT demo study: DICOM series of a phantom (water cylinder, bone and soft-tissue spheres).

Usage::

    python examples/make_dicom_demo_data.py                          # data/dicom/study: 1 series, 512 x 512 x 300
    python examples/make_dicom_demo_data.py --size 40 64 64 --series 3  # small, three series

Then ``tileseg run`` a pipeline with ``input: {path: data/dicom/study}`` and
``method: {fixed_physical: {threshold: 300}}`` (bone in HU). See
:func:`tileseg.testing.dicom.write_ct_series`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tileseg.testing.dicom import write_ct_series  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("data/dicom/study"), help="output folder")
    ap.add_argument("--size", type=int, nargs=3, default=[300, 512, 512], metavar=("SLICES", "ROWS", "COLS"))
    ap.add_argument("--series", type=int, default=1, help="number of series (one folder each)")
    ap.add_argument("--oblique", action="store_true", help="tilt the slices 30 degrees about the z axis")
    ap.add_argument("--force", action="store_true", help="write even if the folder exists")
    args = ap.parse_args(argv)
    if args.out.exists() and not args.force:
        print(f"{args.out} exists (use --force to add to it)")
        return 0
    orientation = (0.8660254, 0.5, 0.0, -0.5, 0.8660254, 0.0) if args.oblique else (1, 0, 0, 0, 1, 0)
    t0 = time.perf_counter()
    for i in range(args.series):
        truth = write_ct_series(args.out / f"series{i + 1}", shape=args.size, spacing=(1.25, 0.7, 0.7),
                                orientation=orientation, seed=i, series_description=f"phantom {i + 1}")
        print(f"series {truth.series_uid}: {len(truth.files)} files, bone voxels {(truth.hu > 300).sum()}")
    print(f"wrote {args.out} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
