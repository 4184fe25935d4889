"""Benchmark: connected-component labelling of huge masks, chunked vs whole-array.

Variants, each in its own subprocess, watched for wall time and resident
memory (the watcher kills a run past ``--timeout`` or ``--mem-limit-gb``):

* ``tileseg``: :func:`tileseg.stitching.labels.label` on a mask generated
  lazily chunk by chunk (never whole in RAM); the int64 labels are consumed
  chunk by chunk (a max reduction), so nothing of image size is held.
* ``scipy``: the same mask materialised as one numpy array, then
  :func:`scipy.ndimage.label` (int32 output in RAM).
* ``daskimage``: :func:`dask_image.ndmeasure.label` on the lazy mask,
  consumed like ``tileseg``.

The mask is a thresholded sum of products of sines (blobs about 10-30 pixels
across that cross every chunk border) plus sparse single-pixel "salt", so
there are many objects of both kinds.

Usage::

    python benchmarks/bench_cleanup.py --check                 # equality at a small size
    python benchmarks/bench_cleanup.py --sizes3d 256 512 1024 --sizes2d 8192 30000
    python benchmarks/bench_cleanup.py --variants daskimage --sizes3d 256 --timeout 300

Prints a markdown table (and writes JSON with ``--json``).

Measured 2026-11-25 on the 2-core, 23 GB development machine (shared with other
jobs, so times are noisy), connectivity 1. "time" is labelling only for
scipy (mask generation not counted: 14 s at 30000^2, 19 s at 1024^3); for
tileseg and dask-image it includes generating the mask lazily, twice for
tileseg (the summary pass and the relabel pass each regenerate it).

=========  =====  ==========  ========  ===========  ==========================
shape      chunk  variant     time (s)  peak RSS GB  objects / status
=========  =====  ==========  ========  ===========  ==========================
4096^2     2048   tileseg     1.9       0.37         28 022
4096^2     2048   scipy       0.1       0.33         28 022
4096^2     2048   dask-image  8.3       0.37         28 022
30000^2    2048   tileseg     55.9      0.49         1 494 589
30000^2    2048   scipy       14.0      4.56         1 494 589
256^3      128    tileseg     1.9       0.23         22 970
256^3      128    scipy       0.1       0.21         22 970
256^3      128    dask-image  16.1      0.24         22 970
512^3      128    tileseg     11.5      0.27         184 726
512^3      128    scipy       2.0       0.74         184 726
512^3      128    dask-image  > 300     -            killed at the 300 s timeout
1024^3     128    tileseg     75.9      0.53         1 478 217
1024^3     128    scipy       10.7      5.21         1 478 217
2048^3     256    tileseg     529       2.34         11 817 344
2048^3     -      scipy       -         -            not run: needs ~43 GB (8.6 GB
                                                     mask + 34 GB int32 labels)
=========  =====  ==========  ========  ===========  ==========================
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

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


def run(variant: str, ndim: int, size: int, chunk: int) -> dict:
    x = synthetic(ndim, size, chunk)
    res: dict = {}
    if variant == "tileseg":
        from tileseg.stitching.labels import label

        t0 = time.perf_counter()
        lab, n = label(x, connectivity=1)
        res["summary_s"] = time.perf_counter() - t0
        top = int(lab.max().compute())
        res["time_s"] = time.perf_counter() - t0
        assert top == n
    elif variant == "daskimage":
        from dask_image import ndmeasure

        t0 = time.perf_counter()
        lab, n = ndmeasure.label(x)
        n = int(n.compute()) if hasattr(n, "compute") else int(n)
        top = int(lab.max().compute())
        res["time_s"] = time.perf_counter() - t0
    elif variant == "scipy":
        import scipy.ndimage as ndi

        t_gen = time.perf_counter()
        arr = x.compute()
        res["generate_s"] = time.perf_counter() - t_gen
        t0 = time.perf_counter()
        lab, n = ndi.label(arr)
        res["time_s"] = time.perf_counter() - t0
    else:
        raise SystemExit(f"unknown variant {variant!r}")
    res["n_objects"] = int(n)
    return res


def worker(args: argparse.Namespace) -> None:
    res = run(args.worker, args.ndim, args.size, args.chunk)
    res["ru_maxrss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps(res))


def launch(variant: str, ndim: int, size: int, chunk: int, timeout: float, mem_gb: float) -> dict:
    """Run one variant in a subprocess; sample its RSS; kill it past the limits."""
    import psutil

    cmd = [
        sys.executable,
        __file__,
        "--worker",
        variant,
        "--ndim",
        str(ndim),
        "--size",
        str(size),
        "--chunk",
        str(chunk),
    ]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env.get("PYTHONPATH", "")]
    )
    row = {"variant": variant, "shape": f"{size}^{ndim}", "chunk": chunk}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)
        ps = psutil.Process(proc.pid)
        peak, status = 0, None
        while proc.poll() is None:
            try:
                rss = ps.memory_info().rss
            except psutil.Error:
                rss = 0
            peak = max(peak, rss)
            if rss > mem_gb * 2**30:
                status = f"killed at {rss / 2**30:.1f} GB (> {mem_gb} GB limit)"
            elif time.perf_counter() - t0 > timeout:
                status = f"timeout after {timeout:.0f} s"
            if status:
                proc.kill()
                proc.wait()
                break
            time.sleep(0.2)
        row["wall_s"] = time.perf_counter() - t0
        row["peak_rss_gb_sampled"] = peak / 2**30
        out.seek(0)
        err.seek(0)
        lines = out.read().strip().splitlines()
        if status is None and proc.returncode == 0 and lines:
            row.update(json.loads(lines[-1]))
            row["status"] = "ok"
        else:
            tail = err.read().strip().splitlines()[-1:] if status is None else []
            row["status"] = status or f"failed (rc={proc.returncode}): {' '.join(tail)[:120]}"
    return row


def table(rows: list[dict]) -> str:
    lines = [
        "| shape | chunk | variant | label time (s) | peak RSS (GB) | objects | status |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = r.get("time_s")
        rss = max(r.get("ru_maxrss_gb", 0.0), r["peak_rss_gb_sampled"])
        lines.append(
            f"| {r['shape']} | {r['chunk']} | {r['variant']} | {'' if t is None else f'{t:.1f}'} | "
            f"{rss:.2f} | {r.get('n_objects', '')} | {r['status']} |"
        )
    return "\n".join(lines)


def check() -> None:
    """tileseg labels equal scipy's on the benchmark data at a small size."""
    import dask.array as da
    import scipy.ndimage as ndi

    from tileseg.stitching.labels import label

    for ndim, size, chunk in ((2, 700, 128), (3, 90, 32)):
        x = synthetic(ndim, size, chunk)
        arr = x.compute()
        ref, n_ref = ndi.label(arr)
        lab, n = label(da.from_array(arr, chunks=chunk))
        assert n == n_ref and (lab.compute() == ref).all(), (ndim, n, n_ref)
        print(f"{ndim}D {size}: {n} objects, equal to scipy.ndimage.label")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--ndim", type=int, default=3, help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, default=256, help=argparse.SUPPRESS)
    p.add_argument("--chunk", type=int, default=128, help=argparse.SUPPRESS)
    p.add_argument("--check", action="store_true", help="verify equality with scipy at a small size")
    p.add_argument("--variants", nargs="+", default=["tileseg", "scipy", "daskimage"])
    p.add_argument("--sizes3d", nargs="*", type=int, default=[256, 512])
    p.add_argument("--sizes2d", nargs="*", type=int, default=[8192])
    p.add_argument("--chunk3d", type=int, default=128)
    p.add_argument("--chunk2d", type=int, default=2048)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
    p.add_argument("--mem-limit-gb", type=float, default=16.0)
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    if args.check:
        check()
        return
    rows = []
    for ndim, sizes, chunk in ((2, args.sizes2d, args.chunk2d), (3, args.sizes3d, args.chunk3d)):
        for size in sizes:
            for variant in args.variants:
                row = launch(variant, ndim, size, chunk, args.timeout, args.mem_limit_gb)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
