"""Benchmark: what leaving nodata alone costs the post-process steps.

The same class map goes through ``apply_postprocess`` twice, each run in its
own fresh, watched subprocess (see ``_watch.py``): once without nodata
(``plain``, the baseline) and once with a nodata region (``nodata``: a slab
along the last axis plus a diagonal band, crossing chunk borders and touching
objects; nodata 255). Steps (``--chain``): ``full`` is ``opening`` (ball,
radius 1) -> ``fill_holes`` -> ``remove_small_objects`` (30 px) -> ``label``;
``objects`` the same without ``fill_holes``; ``fill_holes`` and ``grey``
(``grey_opening``) one step each. The result is written to a Zarr store in one
compute, as a pipeline does. The class map is the synthetic image of
``bench_classical.py`` (written once to ``--tmpdir``) above 127.

Runs are interleaved (repeat 1 of every variant, then repeat 2, ...); the
table shows medians and ``nodata``'s time and peak RSS as ratios of
``plain``'s measured in the same run. The load (``uptime``) is printed before
and after.

Usage::

    python benchmarks/bench_postprocess_nodata.py --sizes3d 256 --repeats 3
    python benchmarks/bench_postprocess_nodata.py --chain objects --sizes3d 256 --repeats 3
    python benchmarks/bench_postprocess_nodata.py --sizes3d 512 --sizes2d 8192 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time

import numpy as np
from _watch import launch, summarise, uptime
from bench_classical import prepare

OPENING = {"opening": {"footprint": "ball", "radius": 1}}
SMALL = {"remove_small_objects": {"min_size_px": 30}}
CHAINS = {
    "full": [OPENING, "fill_holes", SMALL, "label"],
    "objects": [OPENING, SMALL, "label"],
    "fill_holes": ["fill_holes"],
    "grey": [{"grey_opening": {"footprint": "ball", "radius": 1}}],
}


def _nodata_region(block: np.ndarray, block_info=None) -> np.ndarray:
    loc = block_info[None]["array-location"]
    size = block_info[None]["shape"][-1]
    grid = np.meshgrid(*[np.arange(s, e) for s, e in loc], indexing="ij", sparse=True)
    return (grid[-1] < size // 4) | (np.abs(grid[-1] - grid[-2]) <= 3)


def run(path: str, outdir: str, with_nodata: bool, chain: str) -> dict:
    import dask.array as da

    from tileseg.image import Image
    from tileseg.postprocess import apply_postprocess

    t0 = time.perf_counter()
    img = da.from_zarr(path)
    classes = (img > 127).astype(np.uint8)
    nodata = None
    if with_nodata:
        region = da.map_blocks(_nodata_region, img, dtype=bool)
        classes, nodata = da.where(region, np.uint8(255), classes), 255
    axes = ("y", "x") if img.ndim == 2 else ("z", "y", "x")
    image = Image(classes, axes=axes, nodata=nodata, class_names=("background", "foreground"))
    out = apply_postprocess(image, CHAINS[chain])
    out.data.to_zarr(os.path.join(outdir, "labels.zarr"), overwrite=True)  # one compute, as a pipeline's write
    n = int(da.from_zarr(os.path.join(outdir, "labels.zarr")).max().compute()) if chain != "grey" else 0
    return {"n_objects": n, "nodata": out.nodata, "time_s": time.perf_counter() - t0}


def worker(args: argparse.Namespace) -> None:
    outdir = tempfile.mkdtemp(prefix="bench_ppnodata_out_", dir=args.tmpdir)
    try:
        res = run(args.path, outdir, args.worker == "nodata", args.chain)
    finally:
        shutil.rmtree(outdir, ignore_errors=True)
    res["ru_maxrss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps(res), flush=True)


def table(summary: list[dict]) -> str:
    lines = ["| image | chunks | variant | time (s) | x plain time | peak RSS (GB) | x plain RSS | result max | runs |",
             "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for s in summary:
        t = s.get("time_s")
        lines.append(
            f"| {s['shape']} | {s['chunk']} | {s['variant']} | {'' if t is None else f'{t:.1f}'} | "
            f"{s.get('ratio', float('nan')):.2f} | {s.get('peak_rss_gb', float('nan')):.2f} | "
            f"{s.get('rss_ratio', float('nan')):.2f} | {s.get('n_objects', '')} | {s.get('runs', '')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--tmpdir", default=os.path.join(tempfile.gettempdir(), "tileseg-bench-classical"),
                    help="where the synthetic images are kept (shared with bench_classical.py)")
    ap.add_argument("--sizes2d", type=int, nargs="*", default=[])
    ap.add_argument("--sizes3d", type=int, nargs="*", default=[256])
    ap.add_argument("--chunk2d", type=int, default=2048)
    ap.add_argument("--chunk3d", type=int, default=128)
    ap.add_argument("--chain", choices=sorted(CHAINS), default="full")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats per variant (median)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    ap.add_argument("--mem-limit-gb", type=float, default=14.0)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    os.makedirs(args.tmpdir, exist_ok=True)
    print("before:", uptime(), file=sys.stderr, flush=True)
    rows = []
    for ndim, sizes, chunk in ((2, args.sizes2d, args.chunk2d), (3, args.sizes3d, args.chunk3d)):
        for size in sizes:
            path = prepare(args.tmpdir, ndim, size, min(chunk, size))
            for rep in range(args.repeats):
                for variant in ("plain", "nodata"):
                    cmd = ["--worker", variant, "--path", path, "--tmpdir", args.tmpdir, "--chain", args.chain]
                    row = launch(cmd, __file__,
                                 args.timeout, args.mem_limit_gb)
                    row.update(variant=variant, shape="x".join([str(size)] * ndim),
                               chunk=f"{min(chunk, size)}^{ndim}", repeat=rep, load=os.getloadavg()[0])
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
    print("after:", uptime(), file=sys.stderr, flush=True)
    print(table(summarise(rows, "plain")))


if __name__ == "__main__":
    main()
