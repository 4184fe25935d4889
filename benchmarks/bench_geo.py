"""Benchmark: a 4-band satellite scene, GeoTIFF in -> COG out, with the small water U-Net.

Variants, each in its own subprocess (wall time and the child's peak RSS from ``wait4``):

* ``tileseg``: ``tileseg run`` of the scene (local GeoTIFF, 4 bands uint16,
  nodata outside a tilted swath) -> labels as a COG (tiled, deflate, overviews);
* ``usual``: what one writes without tileseg: rasterio reads the whole scene,
  MONAI ``sliding_window_inference`` (same net, patch, overlap, Gaussian
  blending, batch) on the whole array, argmax, rasterio writes a GeoTIFF;
  only where it fits (``--usual-max``);
* ``remote``: ``tileseg run`` of the same scene read over HTTP from the local
  test server (:mod:`tileseg.testing.http`), counting requests and bytes.

The scene is :mod:`tileseg.testing.geoscene`, written once per size into the
work folder. Ratios are against ``usual`` at the same size, measured in the
same run.

Usage::

    python benchmarks/bench_geo.py --sizes 5000 10000 20000 --usual-max 10000 --remote 5000
    python benchmarks/bench_geo.py --sizes 2048 --remote 2048      # smoke run

Prints a markdown table (and writes JSON with ``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this tree's tileseg, also in the children that run this file
MODEL = ROOT / "examples" / "models" / "water_unet2d.pt"
PATCH, OVERLAP, BATCH = 256, 0.25, 8


def scene(size: int, workdir: Path) -> Path:
    """The synthetic scene of ``size`` x ``size`` (written once)."""
    from tileseg.testing.geoscene import write_geotiff_scene

    path = workdir / f"scene{size}.tif"
    if not path.exists():
        write_geotiff_scene(path, workdir / f"scene{size}_water.tif", (size, size), seed=3)
    return path


def _pipeline(src: str, out: Path, workdir: Path) -> Path:
    text = (
        "version: 1\n"
        f"input: {{path: '{src}'}}\n"
        "preprocess: [{scale: {multiply: 0.0001}}]\n"
        f"tiling: {{patch_size: [{PATCH}, {PATCH}], overlap: {OVERLAP}}}\n"
        f"model: {{torchscript: {{path: '{MODEL}'}}, output: labels, batch_size: {BATCH}, classes: [land, water]}}\n"
        f"output: {{path: '{out}', writer: cog, overwrite: true}}\n"
        "execution: {scheduler: threads, workers: 2}\n"
    )
    pipe = workdir / f"{out.stem}.yaml"
    pipe.write_text(text)
    return pipe


def run_variant(name: str, size: int, workdir: Path) -> dict:
    """Body of one subprocess."""
    src = scene(size, workdir)
    out = workdir / f"out_{name}_{size}.tif"
    t0 = time.perf_counter()
    extra: dict = {}
    if name in ("tileseg", "remote"):
        import tileseg

        if name == "remote":
            from tileseg.testing.http import serve_directory

            with serve_directory(str(workdir)) as srv:
                t0 = time.perf_counter()
                report = tileseg.run(_pipeline(srv.url(src.name), out, workdir), resume=False)
                stats = srv.stats.snapshot()
            extra = {"requests": stats["get"], "bytes_read": stats["bytes"], "file_bytes": src.stat().st_size}
        else:
            report = tileseg.run(_pipeline(str(src), out, workdir), resume=False)
        item = report.items[0]
        if item.status != "ok":
            raise RuntimeError(item.error)
        extra.update(n_patches=item.n_patches, n_patches_skipped=item.n_patches_skipped)
    elif name == "usual":
        import numpy as np
        import rasterio
        import torch
        from monai.inferers import sliding_window_inference

        torch.set_num_threads(2)
        net = torch.jit.load(str(MODEL)).eval()
        with rasterio.open(src) as ds:
            x = ds.read().astype(np.float32) * np.float32(1e-4)
            profile = ds.profile
        with torch.inference_mode():
            logits = sliding_window_inference(torch.from_numpy(x[None]), (PATCH, PATCH), BATCH, net,
                                              overlap=OVERLAP, mode="gaussian")
        labels = logits.argmax(1)[0].to(torch.uint8).numpy()
        del logits
        profile.update(count=1, dtype="uint8", nodata=None, compress="deflate")
        with rasterio.open(out, "w", **profile) as dst:
            dst.write(labels, 1)
    else:
        raise ValueError(name)
    return {"variant": name, "size": size, "seconds": round(time.perf_counter() - t0, 2), **extra}


def launch(name: str, size: int, workdir: Path) -> dict:
    """Run one variant in a child process; add its peak RSS."""
    cmd = [sys.executable, __file__, "--worker", name, "--sizes", str(size), "--workdir", str(workdir)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    out = proc.stdout.read() if proc.stdout else ""
    if os.waitstatus_to_exitcode(status) != 0:
        return {"variant": name, "size": size, "error": out.strip()[-300:] or f"exit {status}"}
    row = json.loads(out.strip().splitlines()[-1])
    row["peak_rss_mib"] = round(usage.ru_maxrss / 1024)
    row["mpx_per_s"] = round(size * size / 1e6 / row["seconds"], 2)
    return row


def table(rows: list[dict]) -> str:
    base = {r["size"]: r["seconds"] for r in rows if r["variant"] == "usual" and "seconds" in r}
    lines = ["| variant | scene | seconds | Mpx/s | vs usual | peak RSS (MiB) | patches (skipped) | requests / MB read |",
             "|---|---|---:|---:|---:|---:|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['size']}^2 x 4 | error: {r['error']} | | | | | |")
            continue
        ratio = f"{base[r['size']] / r['seconds']:.2f}x" if r["size"] in base else "-"
        patches = f"{r['n_patches']} ({r['n_patches_skipped']})" if "n_patches" in r else "-"
        remote = (f"{r['requests']} / {r['bytes_read'] / 1e6:.0f} (file {r['file_bytes'] / 1e6:.0f})"
                  if "requests" in r else "-")
        lines.append(f"| {r['variant']} | {r['size']}^2 x 4 | {r['seconds']} | {r['mpx_per_s']} | {ratio} | "
                     f"{r['peak_rss_mib']} | {patches} | {remote} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[5000, 10000, 20000])
    ap.add_argument("--usual-max", type=int, default=10000, help="largest scene for the whole-scene baseline")
    ap.add_argument("--remote", type=int, nargs="*", default=[5000], help="scene sizes also read over HTTP")
    ap.add_argument("--variants", nargs="+", default=["tileseg", "usual", "remote"])
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="tileseg-bench-geo-"))
    if args.worker:
        print(json.dumps(run_variant(args.worker, args.sizes[0], workdir)))
        return
    rows = []
    for size in args.sizes:
        t0 = time.perf_counter()
        scene(size, workdir)
        print(f"scene {size}^2 x 4 written in {time.perf_counter() - t0:.1f} s", flush=True)
        variants = [v for v in ("tileseg", "usual", "remote") if v in args.variants and (
            v == "tileseg" or (v == "usual" and size <= args.usual_max) or (v == "remote" and size in args.remote))]
        for name in variants:
            rows.append(launch(name, size, workdir))
            print(rows[-1], flush=True)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
