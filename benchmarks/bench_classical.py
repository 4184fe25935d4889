"""Benchmark: Otsu -> opening -> remove small objects -> label on huge 2D/3D uint8 images.

Variants (each run in its own subprocess, watched for wall time and resident
memory; the watcher kills a run that passes ``--mem-limit-gb`` and reports
it as out of memory):

* ``tileseg``: the image is generated lazily chunk by chunk (never whole in
  RAM); :func:`tileseg.methods.thresholds.threshold` (one-pass histogram Otsu),
  :func:`tileseg.postprocess.morphology.binary_opening`,
  :func:`tileseg.postprocess.objects.remove_small_objects` and
  :func:`tileseg.stitching.labels.label`; labels (int64) are written to a
  zarr store chunk by chunk.
* ``skimage``: the same image materialised as one numpy array, then
  ``threshold_otsu``, ``binary_opening``, ``remove_small_objects``,
  ``skimage.measure.label`` on the whole array.
* ``daskimage``: as ``tileseg`` up to the small-object removal, then
  ``dask_image.ndmeasure.label``, written to zarr.

The synthetic image is a sum of two separable products of sines (blobs of
about 20-60 pixels across, hundreds of thousands of them, crossing every
chunk border) plus uniform noise, so the opening and the size filter have
work to do.

Usage::

    python benchmarks/bench_classical.py --check              # equality at a small size
    python benchmarks/bench_classical.py --sizes2d 4096 30000 --sizes3d 256 1024
    python benchmarks/bench_classical.py --variants tileseg --sizes3d 1024 --sizes2d

Prints a markdown table (and writes JSON with ``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np

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


def run_tileseg(ndim: int, size: int, chunk: int, outdir: str, label_impl: str = "tileseg") -> dict:
    from tileseg.methods.thresholds import threshold
    from tileseg.postprocess.morphology import binary_opening
    from tileseg.postprocess.objects import remove_small_objects
    from tileseg.stitching.labels import label

    img = synthetic(ndim, size, chunk)
    t0 = time.perf_counter()
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
    return {"threshold": float(t), "n_objects": n, "t_threshold_s": t1 - t0, "t_total_s": t2 - t0}


def run_skimage(ndim: int, size: int, chunk: int, outdir: str) -> dict:
    import dask
    from skimage.filters import threshold_otsu
    from skimage.measure import label
    from skimage.morphology import binary_opening, remove_small_objects

    t0 = time.perf_counter()
    with dask.config.set(scheduler="threads"):
        arr = synthetic(ndim, size, chunk).compute()
    t1 = time.perf_counter()
    t = threshold_otsu(arr)
    mask = arr > t
    del arr
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # binary_opening is deprecated in 0.26
        opened = binary_opening(mask, footprint=_footprint(ndim))
    del mask
    cleaned = remove_small_objects(opened, max_size=MIN_SIZE_PX - 1, connectivity=1)
    del opened
    labels = label(cleaned, connectivity=1)
    n = int(labels.max())
    t2 = time.perf_counter()
    return {"threshold": float(t), "n_objects": n, "t_generate_s": t1 - t0, "t_total_s": t2 - t0}


def worker(args: argparse.Namespace) -> None:
    outdir = tempfile.mkdtemp(prefix="bench_classical_", dir=args.tmpdir)
    try:
        if args.worker == "tileseg":
            res = run_tileseg(args.ndim, args.size, args.chunk, outdir)
        elif args.worker == "daskimage":
            res = run_tileseg(args.ndim, args.size, args.chunk, outdir, label_impl="daskimage")
        elif args.worker == "skimage":
            res = run_skimage(args.ndim, args.size, args.chunk, outdir)
        else:
            raise SystemExit(f"unknown variant {args.worker!r}")
    finally:
        shutil.rmtree(outdir, ignore_errors=True)
    res["ru_maxrss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print("RESULT " + json.dumps(res), flush=True)


def launch(
    variant: str,
    ndim: int,
    size: int,
    chunk: int,
    timeout: float,
    mem_gb: float,
    tmpdir: str,
    min_free_gb: float = 1.0,
) -> dict:
    import psutil

    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        variant,
        "--ndim",
        str(ndim),
        "--size",
        str(size),
        "--chunk",
        str(chunk),
        "--tmpdir",
        tmpdir,
    ]
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    start = time.perf_counter()
    out_f = tempfile.TemporaryFile(mode="w+")
    err_f = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, stdout=out_f, stderr=err_f, text=True, env=env)
    ps = psutil.Process(proc.pid)
    peak, status = 0, "ok"
    while proc.poll() is None:
        try:
            rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
        except psutil.Error:
            rss = 0
        peak = max(peak, rss)
        if rss > mem_gb * 2**30:
            status = f"out of memory (> {mem_gb:g} GB cap)"
            proc.kill()
            break
        if rss > 2**30 and psutil.virtual_memory().available < min_free_gb * 2**30:
            # the machine is shared: never push other processes into the OOM killer
            status = f"aborted at {rss / 2**30:.1f} GB: machine memory low (other processes)"
            proc.kill()
            break
        if time.perf_counter() - start > timeout:
            status = f"timeout (> {timeout:g} s)"
            proc.kill()
            break
        time.sleep(0.1)
    proc.wait()
    out_f.seek(0)
    err_f.seek(0)
    out, err = out_f.read(), err_f.read()
    wall = time.perf_counter() - start
    row = {
        "variant": variant,
        "ndim": ndim,
        "size": size,
        "chunk": chunk,
        "wall_s": wall,
        "peak_rss_gb_sampled": peak / 2**30,
        "status": status,
    }
    for line in out.splitlines():
        if line.startswith("RESULT "):
            row.update(json.loads(line[7:]))
    if status == "ok" and proc.returncode != 0:
        low = err.lower()
        row["status"] = (
            "out of memory (MemoryError)" if "memoryerror" in low else f"failed (rc {proc.returncode})"
        )
        row["error"] = err.strip().splitlines()[-1] if err.strip() else ""
    return row


def table(rows: list[dict]) -> str:
    head = "| variant | image | chunks | status | time (s) | peak RSS (GB) | objects |\n|---|---|---|---|---|---|---|"
    lines = [head]
    for r in rows:
        shape = "x".join([str(r["size"])] * r["ndim"])
        rss = max(r.get("ru_maxrss_gb", 0.0), r["peak_rss_gb_sampled"])
        t = r.get("t_total_s")
        lines.append(
            f"| {r['variant']} | {shape} | {r['chunk']}^{r['ndim']} | {r['status']} | "
            f"{'' if t is None else f'{t:.1f}'} | {rss:.2f} | {r.get('n_objects', '')} |"
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
    ap.add_argument("--worker")
    ap.add_argument("--ndim", type=int)
    ap.add_argument("--size", type=int)
    ap.add_argument("--chunk", type=int)
    ap.add_argument(
        "--tmpdir", default=tempfile.gettempdir(), help="where the zarr outputs go (deleted after)"
    )
    ap.add_argument("--check", action="store_true", help="equality check at a small size, then exit")
    ap.add_argument("--sizes2d", type=int, nargs="*", default=[4096, 30000])
    ap.add_argument("--sizes3d", type=int, nargs="*", default=[256, 1024])
    ap.add_argument("--chunk2d", type=int, default=2048)
    ap.add_argument("--chunk3d", type=int, default=256)
    ap.add_argument("--variants", default="tileseg,skimage,daskimage")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    ap.add_argument("--mem-limit-gb", type=float, default=14.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    if args.check:
        check()
        return
    rows = []
    for ndim, sizes, chunk in ((2, args.sizes2d, args.chunk2d), (3, args.sizes3d, args.chunk3d)):
        for size in sizes:
            for variant in args.variants.split(","):
                row = launch(
                    variant, ndim, size, min(chunk, size), args.timeout, args.mem_limit_gb, args.tmpdir
                )
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.json:
                    with open(args.json, "w") as fh:
                        json.dump(rows, fh, indent=1)
    print(table(rows))


if __name__ == "__main__":
    main()
