"""Benchmark: archive runs. Worker scaling, items in flight, and what the manifest costs.

Three measurements, each the median of ``--repeats`` interleaved repeats
(the variants of one measurement alternate, so a machine whose load changes
affects both alike):

1. **1 vs 2 worker processes** (a ``distributed.LocalCluster``, one thread
   per worker, started before timing and passed as ``client=``): one
   CPU-bound classical item (Gaussian filter, sigma 4, then Otsu) and one
   model item (the bundled 2D U-Net, ``examples/models/unet2d.pt``).
   Printed: seconds and the speed-up 1 -> 2.
2. **Items in flight**: ``--items`` small items (128 x 128, Otsu) with
   ``execution.max_items_in_flight`` 1 vs 8, on the threaded scheduler and on
   a 2-process ``LocalCluster`` passed as ``client=``. Printed: items/s and
   the ratio.
3. **Manifest overhead**: the same small items through ``tileseg run`` (claim,
   fingerprint, heartbeat, report) vs a plain loop of ``tileseg.open`` ->
   method -> ``tileseg.write`` (same writer, no manifest), both one item at a
   time; plus the manifest's own claim + finish per item, timed alone.

Usage::

    python benchmarks/bench_archive.py [--repeats 3] [--items 200] [--size 1024]

Every ratio compares runs made in the same invocation; say how loaded the
machine was (``uptime``) with the figures.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _write_scene(path: Path, size: int, chunks: int, seed: int) -> None:
    import zarr

    from tileseg.testing import blobs_2d

    image, _ = blobs_2d((size, size), seed, dtype=np.float32, radius=(3.0, 12.0), coverage=0.3)
    g = zarr.open_group(str(path), mode="w")
    g.create_array("image", shape=image.shape, chunks=(chunks, chunks), dtype="float32")[:] = image


def _pipeline(path: Path, inputs: str, body: str, output: str, execution: str) -> Path:
    path.write_text(textwrap.dedent(f"""\
        version: 1
        input: {{path: "{inputs}", array: image}}
        {body}
        output: {{path: "{output}", overwrite: true}}
        execution: {execution}
        """))
    return path


def _median_interleaved(fns: dict[str, callable], repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_workers(root: Path, size: int, repeats: int) -> list[tuple[str, float, float]]:
    import distributed

    import tileseg

    _write_scene(root / "big.zarr", size, 256, seed=1)
    classical = "method: {gaussian: {sigma: 4}}\n        postprocess: []\n        tiling: {chunks: [256, 256]}"
    model = (f"model: {{torchscript: {{path: {ROOT / 'examples/models/unet2d.pt'}}}, batch_size: 8}}\n"
             "        tiling: {patch_size: [128, 128], overlap: 0.25, chunks: [256, 256]}")
    pipes = {
        "classical": _pipeline(root / "c.yaml", "big.zarr", classical, "w/{stem}_c.zarr", "{retries: 0}"),
        "model": _pipeline(root / "m.yaml", "big.zarr", model, "w/{stem}_m.zarr", "{retries: 0}"),
    }
    rows = []
    clusters = {n: distributed.LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                            dashboard_address=None) for n in (1, 2)}
    try:
        clients = {n: distributed.Client(c, set_as_default=False) for n, c in clusters.items()}
        for kind, pipe in pipes.items():
            def run(n: int, pipe: Path = pipe) -> None:
                report = tileseg.run(pipe, client=clients[n], fresh=True)
                assert report.ok, [i.error for i in report.items]
            run(1)  # warm-up: imports and model load on the workers
            run(2)
            t = _median_interleaved({"1": lambda: run(1), "2": lambda: run(2)}, repeats)
            rows.append((kind, t["1"], t["2"]))
        for c in clients.values():
            c.close()
    finally:
        for c in clusters.values():
            c.close()
    return rows


def bench_in_flight(root: Path, n_items: int, repeats: int) -> dict[str, dict[str, float]]:
    """Seconds for all items with 1 and 8 in flight, on the threaded scheduler and on a 2-process cluster."""
    import distributed

    import tileseg

    folder = root / "small"
    for i in range(n_items):
        _write_scene(folder / f"s{i:04d}.zarr", 128, 64, seed=i)
    out: dict[str, dict[str, float]] = {}
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    client = distributed.Client(cluster, set_as_default=False)
    try:
        for where, execution, kw in (("threads", "{scheduler: threads, workers: 2, max_items_in_flight: %d}", {}),
                                     ("cluster", "{max_items_in_flight: %d}", {"client": client})):
            pipes = {k: _pipeline(root / f"f{where}{k}.yaml", "small/*.zarr", "method: otsu",
                                  f"f{where}{k}/{{stem}}.zarr", execution % k) for k in (1, 8)}

            def run(k: int, pipes: dict = pipes, kw: dict = kw) -> None:
                report = tileseg.run(pipes[k], fresh=True, **kw)
                assert report.ok and len(report.items) == n_items, [i.error for i in report.items][:3]

            run(8)  # warm-up
            out[where] = _median_interleaved({"1": lambda: run(1), "8": lambda: run(8)}, repeats)
    finally:
        client.close()
        cluster.close()
    return out


def bench_manifest(root: Path, n_items: int, repeats: int) -> dict[str, float]:
    import dask

    import tileseg
    from tileseg.image import Image
    from tileseg.manifest import DONE, Manifest, item_key
    from tileseg.methods import apply_method

    items = sorted(str(p) for p in (root / "small").glob("*.zarr"))
    pipe = _pipeline(root / "m1.yaml", "small/*.zarr", "method: otsu", "m1/{stem}.zarr",
                     "{scheduler: threads, workers: 2, max_items_in_flight: 1}")

    def with_manifest() -> None:
        assert tileseg.run(pipe, fresh=True).ok

    def plain() -> None:
        with dask.config.set(scheduler="threads", num_workers=2):
            for item in items:
                img = tileseg.open(item, array="image")
                out: Image = apply_method(img, "otsu", {})
                tileseg.write(out, str(root / "plain" / Path(item).name), overwrite=True)

    t = _median_interleaved({"run": with_manifest, "plain": plain}, repeats)
    m = Manifest(str(root / "micro.sqlite"))
    kw = dict(input="x", output_hashes=["h"], input_fingerprint="stat:1:1", pipeline_fingerprint="p",
              outputs_complete=False)
    t0 = time.perf_counter()
    for i in range(n_items):
        key = item_key([f"/o/{i}"])
        m.claim(key, outputs=[f"/o/{i}"], **kw)
        m.finish(key, DONE)
    t["claim_finish_ms"] = (time.perf_counter() - t0) / n_items * 1e3
    m.close()
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--size", type=int, default=1024, help="side of the image of measurement 1")
    ap.add_argument("--only", choices=["workers", "inflight", "manifest"], nargs="*")
    args = ap.parse_args()
    only = set(args.only or ["workers", "inflight", "manifest"])
    root = Path(tempfile.mkdtemp(prefix="bench-archive-"))
    os.chdir(root)
    print(f"load: {os.getloadavg()}, cpus: {os.cpu_count()}")
    try:
        if "workers" in only:
            print("\n| pipeline | 1 worker s | 2 workers s | speed-up |\n|---|---|---|---|")
            for kind, t1, t2 in bench_workers(root, args.size, args.repeats):
                print(f"| {kind} {args.size}^2 | {t1:.2f} | {t2:.2f} | {t1 / t2:.2f}x |")
        if "inflight" in only or "manifest" in only:
            t = bench_in_flight(root, args.items, args.repeats)
            if "inflight" in only:
                print(f"\n| {args.items} items 128^2, otsu | 1 in flight, items/s | 8 in flight, items/s | ratio |")
                print("|---|---|---|---|")
                for where, label in (("threads", "threads, 2 workers"), ("cluster", "LocalCluster, 2 processes")):
                    tw = t[where]
                    print(f"| {label} | {args.items / tw['1']:.1f} | {args.items / tw['8']:.1f} | "
                          f"{tw['1'] / tw['8']:.2f}x |")
        if "manifest" in only:
            t = bench_manifest(root, args.items, args.repeats)
            print(f"\n| {args.items} items, one at a time | s |\n|---|---|")
            print(f"| tileseg run (manifest, fingerprints, report) | {t['run']:.2f} |")
            print(f"| open -> otsu -> write loop, no manifest | {t['plain']:.2f} |")
            print(f"| overhead | {t['run'] / t['plain']:.2f}x |")
            print(f"| manifest claim + finish alone | {t['claim_finish_ms']:.2f} ms per item |")
    finally:
        os.chdir("/")
        shutil.rmtree(root, ignore_errors=True)
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
