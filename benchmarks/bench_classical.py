"""Benchmark: Otsu -> opening -> remove small objects -> label on huge 2D/3D uint8 images.

The image is written once per size to a Zarr store (``--tmpdir``, reused by
later runs, removed with ``--clean``), so every variant starts from the same
bytes on disk and ends with the int64 labels written to a Zarr store (chunks
as the input's), as a pipeline does. Variants, each run in its own fresh
subprocess (imports before the clock starts), watched for wall time and
resident memory (the watcher kills a run past ``--mem-limit-gb`` or
``--timeout``, or when the shared machine runs low on memory):

* ``tileseg``: the image read lazily chunk by chunk (never whole in RAM);
  :func:`tileseg.methods.thresholds.threshold` (one-pass histogram Otsu),
  :func:`tileseg.postprocess.morphology.binary_opening`,
  :func:`tileseg.postprocess.objects.remove_small_objects` and
  :func:`tileseg.stitching.labels.label` (Dask threads).
* ``skimage``: the image read whole into one numpy array, then
  ``threshold_otsu``, ``binary_opening``, ``remove_small_objects``,
  ``skimage.measure.label`` on the whole array (the baseline).
* ``daskimage``: as ``tileseg`` up to the small-object removal, then
  ``dask_image.ndmeasure.label``.

Runs are interleaved (repeat 1 of every variant, then repeat 2, ...); the
table shows medians and tileseg's time and peak RSS as ratios of
scikit-image's measured in the same run. The load of the machine
(``uptime``) is printed before and after.

The synthetic image is a sum of two separable products of sines (blobs of
about 20-60 pixels across, hundreds of thousands of them, crossing every
chunk border) plus uniform noise, so the opening and the size filter have
work to do.

Usage::

    python benchmarks/bench_classical.py --check              # equality at a small size
    python benchmarks/bench_classical.py --sizes2d 16384 --sizes3d 512 --repeats 3
    python benchmarks/bench_classical.py --variants tileseg --sizes3d 1024 --sizes2d 30000 --repeats 1

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
import warnings

import numpy as np
from _watch import launch, summarise, uptime

MIN_SIZE_PX = 30
# blob periods per axis (two components): about 25-px blobs in 2D, 12-px blobs in 3D
PERIODS = {2: ((47.0, 53.0), (131.0, 97.0)), 3: ((23.0, 29.0, 31.0), (61.0, 53.0, 67.0))}


def _block(ndim: int, seed: int, block_info=None) -> np.ndarray:
    info = block_info[None]
    loc = info["array-location"]
    field = np.zeros(tuple(e - s for s, e in loc), dtype=np.float32)
    for comp, (weight, periods) in enumerate(zip((1.0, 0.6), PERIODS[ndim])):
        prod = None
        for k, (s, e) in enumerate(loc):
            p = periods[k]
            c = np.arange(s, e, dtype=np.float64)
            prof = np.sin(2 * np.pi * c / p + 0.7 * (k + 1) * (comp + 1)).astype(np.float32)
            shape = [1] * ndim
            shape[k] = e - s
            prof = prof.reshape(shape)
            prod = prof if prod is None else prod * prof
        field += np.float32(weight) * prod
    rng = np.random.default_rng((seed, *info["chunk-location"]))
    noise = rng.integers(-25, 26, size=field.shape, dtype=np.int16)
    val = 128.0 + 70.0 * field + noise
    return np.clip(val, 0, 255).astype(np.uint8)


def synthetic(ndim: int, size: int, chunk: int, seed: int = 0):
    """Lazy uint8 test image of ``size`` per axis, generated chunk by chunk."""
    import dask.array as da

    shape = (size,) * ndim
    chunks = da.core.normalize_chunks((chunk,) * ndim, shape)
    return da.map_blocks(
        _block, ndim, seed, chunks=chunks, dtype=np.uint8, meta=np.empty((0,) * ndim, np.uint8)
    )


def _footprint(ndim: int) -> np.ndarray:
    from scipy import ndimage as ndi

    return ndi.generate_binary_structure(ndim, 1)  # disk(1) / ball(1)


def prepare(tmpdir: str, ndim: int, size: int, chunk: int) -> str:
    """Write the image to ``tmpdir`` once (a ``.done`` marker records completion); return its path."""
    path = os.path.join(tmpdir, f"image_{ndim}d_{size}_{chunk}.zarr")
    if not os.path.exists(path + ".done"):
        shutil.rmtree(path, ignore_errors=True)
        t0 = time.perf_counter()
        synthetic(ndim, size, chunk).to_zarr(path)
        open(path + ".done", "w").close()
        print(f"prepared {path} in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    return path


def run_tileseg(path: str, outdir: str, label_impl: str = "tileseg") -> dict:
    import dask.array as da

    from tileseg.methods.thresholds import threshold
    from tileseg.postprocess.morphology import binary_opening
    from tileseg.postprocess.objects import remove_small_objects
    from tileseg.stitching.labels import label

    t0 = time.perf_counter()
    img = da.from_zarr(path)
    t = threshold(img, "otsu")
    t1 = time.perf_counter()
    opened = binary_opening(img > t, footprint="ball", radius=1)
    cleaned = remove_small_objects(opened, min_size_px=MIN_SIZE_PX)
    if label_impl == "tileseg":
        labels, n = label(cleaned, connectivity=1)
    else:
        from dask_image.ndmeasure import label as di_label

        labels, n = di_label(cleaned)
    labels.to_zarr(os.path.join(outdir, "labels.zarr"), overwrite=True)
    n = int(n)
    t2 = time.perf_counter()
    return {"threshold": float(t), "n_objects": n, "t_threshold_s": t1 - t0, "time_s": t2 - t0}


def run_skimage(path: str, outdir: str) -> dict:
    import dask.array as da
    import zarr
    from skimage.filters import threshold_otsu
    from skimage.measure import label
    from skimage.morphology import binary_opening, remove_small_objects

    t0 = time.perf_counter()
    src = zarr.open_array(path, mode="r")
    arr = src[...]
    t1 = time.perf_counter()
    t = threshold_otsu(arr)
    mask = arr > t
    del arr
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # binary_opening is deprecated in 0.26
        opened = binary_opening(mask, footprint=_footprint(mask.ndim))
    del mask
    cleaned = remove_small_objects(opened, max_size=MIN_SIZE_PX - 1, connectivity=1)
    del opened
    labels = label(cleaned, connectivity=1)
    del cleaned
    n = int(labels.max())
    da.from_array(labels, chunks=src.chunks).to_zarr(os.path.join(outdir, "labels.zarr"), overwrite=True)
    t2 = time.perf_counter()
    return {"threshold": float(t), "n_objects": n, "read_s": t1 - t0, "time_s": t2 - t0}


def worker(args: argparse.Namespace) -> None:
    outdir = tempfile.mkdtemp(prefix="bench_classical_out_", dir=args.tmpdir)
    try:
        if args.worker == "tileseg":
            res = run_tileseg(args.path, outdir)
        elif args.worker == "daskimage":
            res = run_tileseg(args.path, outdir, label_impl="daskimage")
        elif args.worker == "skimage":
            res = run_skimage(args.path, outdir)
        else:
            raise SystemExit(f"unknown variant {args.worker!r}")
    finally:
        shutil.rmtree(outdir, ignore_errors=True)
    res["ru_maxrss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps(res), flush=True)


def table(summary: list[dict]) -> str:
    lines = [
        "| image | chunks | variant | time (s) | x scikit-image time | peak RSS (GB) | x scikit-image RSS | objects | runs | status |",
        "|---|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for s in summary:
        t = s.get("time_s")
        tt = "" if t is None else f"{t:.1f}"
        r1 = f"{s['ratio']:.2f}" if "ratio" in s else ""
        r2 = f"{s['rss_ratio']:.2f}" if "rss_ratio" in s else ""
        rss = f"{s['peak_rss_gb']:.2f}" if "peak_rss_gb" in s else ""
        lines.append(
            f"| {s['shape']} | {s['chunk']} | {s['variant']} | {tt} | {r1} | {rss} | {r2} | "
            f"{s.get('n_objects', '')} | {s['runs']} | {s['status']} |"
        )
    return "\n".join(lines)


def check(size2d: int = 1500, size3d: int = 96) -> None:
    """tileseg (odd chunks) equals scikit-image on the whole array."""
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu
    from skimage.measure import label as sk_label
    from skimage.morphology import binary_opening as sk_open
    from skimage.morphology import remove_small_objects as sk_rso

    from tileseg.methods.thresholds import threshold
    from tileseg.postprocess.morphology import binary_opening
    from tileseg.postprocess.objects import remove_small_objects
    from tileseg.stitching.labels import label

    for ndim, size, chunk in ((2, size2d, 257), (3, size3d, 29)):
        img = synthetic(ndim, size, chunk)
        arr = img.compute()
        t = threshold(img, "otsu")
        assert t == threshold_otsu(arr)
        lab, n = label(
            remove_small_objects(binary_opening(img > t, footprint="ball", radius=1), min_size_px=MIN_SIZE_PX)
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            opened = sk_open(arr > t, footprint=ndi.generate_binary_structure(ndim, 1))
        ref = sk_label(sk_rso(opened, max_size=MIN_SIZE_PX - 1), connectivity=1)
        np.testing.assert_array_equal(lab.compute(), ref)
        print(f"check {ndim}D {size}: equal to scikit-image ({n} objects, threshold {t})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--tmpdir", default=os.path.join(tempfile.gettempdir(), "tileseg-bench-classical"),
                    help="where the prepared images and the outputs go")
    ap.add_argument("--clean", action="store_true", help="remove the prepared images at the end")
    ap.add_argument("--check", action="store_true", help="equality check at a small size, then exit")
    ap.add_argument("--sizes2d", type=int, nargs="*", default=[16384])
    ap.add_argument("--sizes3d", type=int, nargs="*", default=[512])
    ap.add_argument("--chunk2d", type=int, default=2048)
    ap.add_argument("--chunk3d", type=int, default=128)
    ap.add_argument("--variants", default="tileseg,skimage")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats per variant (median)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    ap.add_argument("--mem-limit-gb", type=float, default=14.0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--table-from", help="print the table of rows saved by --json, then exit")
    args = ap.parse_args()
    if args.table_from:
        with open(args.table_from) as fh:
            print(table(summarise(json.load(fh), "skimage")))
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
                for variant in args.variants.split(","):
                    if variant in failed:
                        continue
                    cmd = ["--worker", variant, "--path", path, "--tmpdir", args.tmpdir]
                    row = launch(cmd, __file__, args.timeout, args.mem_limit_gb)
                    row.update(variant=variant, shape="x".join([str(size)] * ndim), chunk=f"{min(chunk, size)}^{ndim}",
                               repeat=rep, load=os.getloadavg()[0])
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
                    if row["status"] != "ok":
                        failed.add(variant)
                    if args.json:
                        with open(args.json, "w") as fh:
                            json.dump(rows, fh, indent=1)
            if args.clean:
                shutil.rmtree(path, ignore_errors=True)
                os.remove(path + ".done")
    print("after:", uptime(), file=sys.stderr, flush=True)
    print(table(summarise(rows, "skimage")))


if __name__ == "__main__":
    main()
