"""Memory benchmark: peak RSS as a 2D input grows 16x, through ``tileseg run`` and embedded.

Not a test. ``python benchmarks/bench_memory.py`` (``--sizes 2048 8192`` by default). Each
case runs in a fresh subprocess and reports its peak RSS (``ru_maxrss``); the growth ratio is
the largest size's peak over the smallest's. The input is a float32 Zarr array on disk
(chunks 1024, generated chunk by chunk before any case runs), the model the demo's 2D U-Net
(``examples/models/unet2d.pt``), patch 256, overlap 0.25, batch 8, labels out.

Modes
-----
run          ``tileseg run`` on a pipeline file (its default ``execution.malloc_arenas: 1``)
run-nocap    the same with ``malloc_arenas: null`` (glibc's default arenas)
embed        user code: ``tileseg.segment(tileseg.open(...), ...)`` then ``.data.to_zarr(...)``
             with dask's threaded scheduler, allocator untouched (``segment``'s default ordering
             edges, ``lookahead=None``)
embed-noorder the same with ``lookahead=0``: no ordering edges, Dask's own order (the default
             before the edges became the default)
embed-cap    ``embed`` after ``tileseg.allocator.limit_arenas(1)``

The table prints the growth of every mode and, for each mode, its seconds at the largest size
against ``embed``'s measured in the same run, and its CPU seconds there (user + system of the
case's process: the work done, which other jobs on a shared machine disturb less than the
wall clock).
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
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples" / "models" / "unet2d.pt"
PATCH, OVERLAP, BATCH, CHUNK = 256, 0.25, 8, 1024
MODES = ("run", "run-nocap", "embed", "embed-noorder", "embed-cap")


def _input(size: int, workdir: Path) -> Path:
    """A smooth-plus-noise float32 image of ``size``^2 stored as Zarr, written one chunk row at a time."""
    import zarr

    path = workdir / f"img_{size}.zarr"
    if path.exists():
        return path
    rng = np.random.default_rng(size)
    z = zarr.open_group(str(path), mode="w")
    arr = z.create_array("image", shape=(size, size), chunks=(CHUNK, CHUNK), dtype="float32")
    yy = np.arange(CHUNK, dtype=np.float32)[:, None]
    xx = np.arange(size, dtype=np.float32)[None, :]
    for i in range(0, size, CHUNK):
        rows = np.sin((yy + i) / 37.0) * np.cos(xx / 53.0) + 0.3 * rng.standard_normal((CHUNK, size), np.float32)
        arr[i: i + CHUNK] = rows.astype(np.float32)
    return path


def case(mode: str, size: int, workdir: Path) -> dict:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    img = _input(size, workdir)
    out = workdir / f"out_{mode}_{size}.zarr"
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    if mode.startswith("run"):
        from click.testing import CliRunner

        from tileseg.cli import main

        arenas = "1" if mode == "run" else "null"
        pipe = workdir / f"pipe_{mode}_{size}.yaml"
        pipe.write_text(
            "version: 1\n"
            f"input: {{path: '{img}', array: image}}\n"
            f"tiling: {{patch_size: [{PATCH}, {PATCH}], overlap: {OVERLAP}, blend: gaussian}}\n"
            f"model: {{torchscript: {{path: '{MODEL}'}}, output: labels, batch_size: {BATCH}}}\n"
            f"output: {{path: '{out}', overwrite: true}}\n"
            f"execution: {{scheduler: threads, workers: 2, malloc_arenas: {arenas}}}\n")
        res = CliRunner().invoke(main, ["run", str(pipe), "--no-resume", "--quiet"], catch_exceptions=False)
        if res.exit_code != 0:
            raise RuntimeError(res.output)
    else:
        import tileseg

        if mode == "embed-cap":
            from tileseg.allocator import limit_arenas

            limit_arenas(1)
        image = tileseg.open(str(img), array="image")
        result = tileseg.segment(image, {"torchscript": {"path": str(MODEL)}}, patch_size=PATCH, overlap=OVERLAP,
                                 batch_size=BATCH, output="labels", lookahead=0 if mode == "embed-noorder" else None)
        result.data.to_zarr(str(out), overwrite=True)
    return {"mode": mode, "size": size, "seconds": time.perf_counter() - t0, "cpu_seconds": _cpu_seconds() - cpu0,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (the work done, less sensitive to other jobs)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_sub(mode: str, size: int, workdir: Path) -> dict:
    cmd = [sys.executable, __file__, "--mode", mode, "--size", str(size), "--workdir", str(workdir)]
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if out.returncode != 0:
        return {"mode": mode, "size": size, "error": out.stderr.strip().splitlines()[-1:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=MODES)
    ap.add_argument("--size", type=int)
    ap.add_argument("--workdir")
    ap.add_argument("--sizes", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--repeat", type=int, default=2, help="interleaved runs per case (median peak RSS)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.mode:
        print(json.dumps(case(args.mode, args.size, Path(args.workdir))))
        return
    with tempfile.TemporaryDirectory(prefix="tileseg-mem-", dir=os.environ.get("TMPDIR")) as tmp:
        workdir = Path(tmp)
        for size in args.sizes:
            _input(size, workdir)
        print(f"# {os.cpu_count()} CPU cores; load average before: {os.getloadavg()[0]:.2f}; 2D U-Net "
              f"(examples/models/unet2d.pt), patch {PATCH}, overlap {OVERLAP}, batch {BATCH}, input chunks {CHUNK}; "
              f"median of {args.repeat} runs per case")
        runs: dict[tuple[str, int], list[dict]] = {}
        for _ in range(args.repeat):
            for mode in args.modes:
                for size in args.sizes:
                    r = run_sub(mode, size, workdir)
                    runs.setdefault((mode, size), []).append(r)
                    print(f"# {mode} {size}^2: {json.dumps(r)}", flush=True)
        print("\n| mode | " + " | ".join(f"{s}^2 peak RSS (MiB)" for s in args.sizes)
              + " | growth | " + " | ".join(f"{s}^2 s" for s in args.sizes)
              + f" | {args.sizes[-1]}^2 time vs embed | {args.sizes[-1]}^2 CPU s |")
        print("|---|" + "---:|" * (2 * len(args.sizes) + 3))
        table = {}
        base = [r["seconds"] for r in runs.get(("embed", args.sizes[-1]), []) if "seconds" in r]
        base_s = float(np.median(base)) if base else float("nan")
        for mode in args.modes:
            peaks, secs, cpus = [], [], []
            for size in args.sizes:
                ok = [r for r in runs[(mode, size)] if "peak_rss_mib" in r]
                peaks.append(float(np.median([r["peak_rss_mib"] for r in ok])) if ok else float("nan"))
                secs.append(float(np.median([r["seconds"] for r in ok])) if ok else float("nan"))
                cpus.append(float(np.median([r["cpu_seconds"] for r in ok])) if ok else float("nan"))
                if not ok:
                    print(f"<!-- {mode} {size} failed: {runs[(mode, size)][0].get('error')} -->")
            growth = peaks[-1] / peaks[0] - 1
            table[mode] = {"peaks": peaks, "seconds": secs, "cpu_seconds": cpus, "growth": growth,
                           "all": {s: [round(r.get("peak_rss_mib", float("nan"))) for r in runs[(mode, s)]]
                                   for s in args.sizes}}
            print(f"| {mode} | " + " | ".join(f"{p:.0f}" for p in peaks) + f" | {growth:+.1%} | "
                  + " | ".join(f"{s:.1f}" for s in secs) + f" | {secs[-1] / base_s:.2f}x | {cpus[-1]:.1f} |")
        print(f"\nall peaks (MiB): {json.dumps({m: t['all'] for m, t in table.items()})}")
        print(f"load average after: {os.getloadavg()[0]:.2f}")
        if args.json:
            Path(args.json).write_text(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
