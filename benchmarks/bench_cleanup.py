"""Benchmark: connected-component labelling of huge masks, chunked vs whole-array.

The mask is written once per size to a Zarr store (``--tmpdir``, reused by
later runs, removed with ``--clean``) so every variant starts from the same
bytes on disk, as a real pipeline does. Variants, each run in its own fresh
subprocess (imports before the clock starts), watched for wall time and
resident memory (the watcher kills a run past ``--timeout`` or
``--mem-limit-gb``, or when the shared machine runs low on memory):

* ``tileseg``: :func:`tileseg.stitching.labels.label` on the lazily read mask
  (Dask threads); the int64 labels are consumed chunk by chunk (a max
  reduction), so nothing of image size is held. Time: reading + labelling.
* ``tileseg-processes``: the same with Dask's multiprocessing scheduler
  (:func:`scipy.ndimage.label` holds the GIL, so threads cannot label two
  chunks at once).
* ``scipy``: the mask read whole into one numpy array, then
  :func:`scipy.ndimage.label` (int32 output in RAM). Time: labelling only
  (the read is reported separately as ``read_s``), the baseline.
* ``daskimage``: :func:`dask_image.ndmeasure.label` on the lazy mask,
  consumed like ``tileseg``.

Runs are interleaved (repeat 1 of every variant, then repeat 2, ...) and the
table shows medians, with tileseg's time as a ratio of SciPy's measured in the
same run. The load of the machine (``uptime``) is printed before and after.

The mask is a thresholded sum of products of sines (blobs about 10-30 pixels
across that cross every chunk border) plus sparse single-pixel "salt", so
there are many objects of both kinds.

Usage::

    python benchmarks/bench_cleanup.py --check                 # equality at a small size
    python benchmarks/bench_cleanup.py --sizes3d 512 1024 --sizes2d 30000 --repeats 3
    python benchmarks/bench_cleanup.py --sizes3d 2048 --sizes2d --variants tileseg --repeats 1
    python benchmarks/bench_cleanup.py --variants daskimage --sizes3d 256 --sizes2d --timeout 300

Prints a markdown table (and writes JSON with ``--json``).
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

PERIODS = {2: ((47.0, 53.0), (131.0, 97.0)), 3: ((23.0, 29.0, 31.0), (61.0, 53.0, 67.0))}
SALT = 0.002


def _block(ndim: int, block_info=None) -> np.ndarray:
    loc = block_info[None]["array-location"]
    axes = [np.arange(s, e, dtype=np.float32) for s, e in loc]
    field = np.zeros(tuple(e - s for s, e in loc), dtype=np.float32)
    for weight, periods in zip((1.0, 0.6), PERIODS[ndim]):
        prod = np.float32(weight)
        for k, a in enumerate(axes):
            shape = [1] * ndim
            shape[k] = -1
            prod = prod * np.sin(2 * np.pi * a / periods[k] + k).reshape(shape)
        field += prod
    mask = field > 0.25
    # Deterministic salt from a hash of the global coordinates.
    grids = np.meshgrid(*[np.arange(s, e, dtype=np.uint64) for s, e in loc], indexing="ij", sparse=True)
    h = np.uint64(0x9E3779B97F4A7C15)
    for k, g in enumerate(grids):
        h = (h ^ (g * np.uint64([73856093, 19349663, 83492791][k]))) * np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(31)
    mask |= (h % np.uint64(100000)).astype(np.float64) < SALT * 100000
    return mask


def synthetic(ndim: int, size: int, chunk: int):
    """Lazy boolean mask of ``size**ndim`` pixels in chunks of ``chunk``."""
    import dask.array as da

    return da.map_blocks(
        _block,
        ndim,
        chunks=((chunk,) * (size // chunk) + ((size % chunk,) if size % chunk else ()),) * ndim,
        dtype=bool,
    )


def prepare(tmpdir: str, ndim: int, size: int, chunk: int) -> str:
    """Write the mask to ``tmpdir`` once (a ``.done`` marker records completion); return its path."""
    path = os.path.join(tmpdir, f"mask_{ndim}d_{size}_{chunk}.zarr")
    if not os.path.exists(path + ".done"):
        shutil.rmtree(path, ignore_errors=True)
        t0 = time.perf_counter()
        synthetic(ndim, size, chunk).to_zarr(path)
        open(path + ".done", "w").close()
        print(f"prepared {path} in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    return path


def run(variant: str, path: str) -> dict:
    import dask
    import dask.array as da

    res: dict = {}
    x = da.from_zarr(path)
    if variant in ("tileseg", "tileseg-processes"):
        from tileseg.stitching.labels import label

        sched = "processes" if variant == "tileseg-processes" else "threads"
        with dask.config.set(scheduler=sched):
            t0 = time.perf_counter()
            lab, n = label(x, connectivity=1)
            res["scan_s"] = time.perf_counter() - t0
            top = int(lab.max().compute())
            res["time_s"] = time.perf_counter() - t0
        if top != n:
            raise SystemExit(f"largest label {top} != number of objects {n}")
    elif variant == "daskimage":
        from dask_image import ndmeasure

        t0 = time.perf_counter()
        lab, n = ndmeasure.label(x)
        n = int(n.compute()) if hasattr(n, "compute") else int(n)
        int(lab.max().compute())
        res["time_s"] = time.perf_counter() - t0
    elif variant == "scipy":
        import scipy.ndimage as ndi

        t_read = time.perf_counter()
        arr = x.compute()
        res["read_s"] = time.perf_counter() - t_read
        t0 = time.perf_counter()
        lab, n = ndi.label(arr)
        res["time_s"] = time.perf_counter() - t0
    else:
        raise SystemExit(f"unknown variant {variant!r}")
    res["n_objects"] = int(n)
    return res


def worker(args: argparse.Namespace) -> None:
    res = run(args.worker, args.path)
    res["ru_maxrss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps(res))


def table(summary: list[dict]) -> str:
    lines = [
        "| shape | chunk | variant | time (s) | x SciPy label | x SciPy read+label | peak RSS (GB) | objects | runs | status |",
        "|---|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for s in summary:
        t = s.get("time_s")
        tt = "" if t is None else f"{t:.1f}" + (f" (+{s['read_s']:.1f} read)" if "read_s" in s else "")
        v1 = f"{s['ratio']:.2f}" if "ratio" in s else ""
        v2 = f"{s['ratio_read']:.2f}" if "ratio_read" in s else ""
        rss = f"{s['peak_rss_gb']:.2f}" if "peak_rss_gb" in s else ""
        lines.append(
            f"| {s['shape']} | {s['chunk']} | {s['variant']} | {tt} | {v1} | {v2} | {rss} | "
            f"{s.get('n_objects', '')} | {s['runs']} | {s['status']} |"
        )
    return "\n".join(lines)


def check() -> None:
    """tileseg labels equal scipy's on the benchmark data at a small size (both label stores)."""
    import dask.array as da
    import scipy.ndimage as ndi

    from tileseg.stitching.labels import label

    for ndim, size, chunk in ((2, 700, 128), (3, 90, 32)):
        arr = synthetic(ndim, size, chunk).compute()
        ref, n_ref = ndi.label(arr)
        for spill in ("disk", "memory"):
            lab, n = label(da.from_array(arr, chunks=chunk), spill=spill)
            assert n == n_ref and (lab.compute() == ref).all(), (ndim, n, n_ref, spill)
        print(f"{ndim}D {size}: {n} objects, equal to scipy.ndimage.label")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--check", action="store_true", help="verify equality with scipy at a small size")
    p.add_argument("--variants", nargs="+", default=["tileseg", "scipy"])
    p.add_argument("--sizes3d", nargs="*", type=int, default=[512, 1024])
    p.add_argument("--sizes2d", nargs="*", type=int, default=[])
    p.add_argument("--chunk3d", type=int, default=128)
    p.add_argument("--chunk2d", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats per variant (median)")
    p.add_argument("--tmpdir", default=os.path.join(tempfile.gettempdir(), "tileseg-bench-cleanup"))
    p.add_argument("--clean", action="store_true", help="remove the prepared masks at the end")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    p.add_argument("--mem-limit-gb", type=float, default=16.0)
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--table-from", help="print the table of rows saved by --json, then exit")
    args = p.parse_args()
    if args.table_from:
        with open(args.table_from) as f:
            print(table(summarise(json.load(f), "scipy")))
        return
    if args.worker:
        worker(args)
        return
    if args.check:
        check()
        return
    os.makedirs(args.tmpdir, exist_ok=True)
    print("before:", uptime(), file=sys.stderr, flush=True)
    rows = []
    for ndim, sizes, chunk in ((2, args.sizes2d, args.chunk2d), (3, args.sizes3d, args.chunk3d)):
        for size in sizes:
            path = prepare(args.tmpdir, ndim, size, min(chunk, size))
            failed: set[str] = set()
            for rep in range(args.repeats):
                for variant in args.variants:
                    if variant in failed:
                        continue
                    row = launch(["--worker", variant, "--path", path], __file__, args.timeout, args.mem_limit_gb)
                    row.update(variant=variant, shape=f"{size}^{ndim}", chunk=min(chunk, size), repeat=rep,
                               load=os.getloadavg()[0])
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
                    if row["status"] != "ok":
                        failed.add(variant)
                    if args.json:
                        with open(args.json, "w") as f:
                            json.dump(rows, f, indent=1)
            if args.clean:
                shutil.rmtree(path, ignore_errors=True)
                os.remove(path + ".done")
    print("after:", uptime(), file=sys.stderr, flush=True)
    print(table(summarise(rows, "scipy")))


if __name__ == "__main__":
    main()
