"""Benchmark: set-up time and client memory of huge images, 10^5 x 10^5 against 10^6 x 10^6 pixels.

The images are virtual Zarr arrays (metadata only: no chunk is stored, every chunk reads as the fill
value), so nothing but the set-up is measured: from the start of a fresh process to the first model
call made by a computing task (the model is the ``counting`` kind of :mod:`tileseg.testing.counting`;
the process exits at that call). Two entry points, each in its own fresh process:

* ``run``: ``tileseg run PIPELINE --fresh`` (z-score statistics, graph, write graph, scheduler);
* ``segment``: ``tileseg.open`` + ``tileseg.segment`` + ``tileseg.write``.

Per run it reports ``graph_s`` (process start to the complete write graph: what tileseg itself
does), ``first_task_s`` (to the first task of that graph started by the scheduler: Dask's conversion
and ordering of the graph come between the two), ``setup_s`` (to the first model call in a task: the
first owner task's input reads, preprocessing and region assembly come before it), ``client_mb`` (resident memory when the
graph is complete: the graph and the client, before any task ran), ``peak_mb`` (peak resident memory up
to the first model call, the first tasks' working memory included: it grows with the block size), ``tasks``
(tasks in the graph) and ``blocks`` (output blocks). Sizes are interleaved (A, B, A, B ...), medians of
``--repeat``; the ratios divide the 10^6 row by the 10^5 row (the baseline of the same run): set-up
and graph should grow no faster than the output blocks, whose ratio is printed alongside.

Usage::

    python benchmarks/bench_huge.py                      # both entry points, 3 repeats
    python benchmarks/bench_huge.py --entry run --repeat 5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

T0 = time.perf_counter()
MARK = "bench_huge: "

PIPELINE = """version: 1
input: {{path: {image}, array: image}}
preprocess: [zscore]
tiling: {{patch_size: [256, 256], overlap: 0.25}}
model: {{counting: {{}}, classes: [background, object]}}
output: {{path: '{out}/{{stem}}.zarr'}}
execution: {{check_free_space: false}}
"""


def _rss_mb() -> tuple[float, float]:
    """Current and peak resident memory of this process, MiB (Linux ``/proc``)."""
    with open("/proc/self/status") as fh:
        fields = dict(line.split(":", 1) for line in fh)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def child(entry: str, image: str, out: str) -> None:
    """One measurement in this (fresh) process; prints one JSON line and exits at the first model call."""
    from tileseg.testing import counting

    state: dict = {}
    forward = counting._forward

    def first_call(batch):
        if "graph_s" in state:  # a task computing (not the probe made while building)
            peak = _rss_mb()[1]
            state.update(setup_s=time.perf_counter() - T0, peak_mb=peak)
            print("\n" + MARK + json.dumps(state), flush=True)
            os._exit(0)
        return forward(batch)

    counting._forward = first_call

    import tileseg.writers.zarr as zarr_writer

    store_blocks = zarr_writer.store_blocks

    def built(*args, **kwargs):  # the write graph is complete: what is left is Dask's scheduling
        task = store_blocks(*args, **kwargs)
        state["graph_s"] = time.perf_counter() - T0
        state["client_mb"] = _rss_mb()[0]
        state["tasks"] = len(task.__dask_graph__())
        return task

    zarr_writer.store_blocks = built

    from dask.callbacks import Callback

    def pretask(key, dsk, state_):  # the local scheduler starts a task of the write graph
        if "graph_s" in state and "first_task_s" not in state:
            state["first_task_s"] = time.perf_counter() - T0

    Callback(pretask=pretask).register()
    if entry == "run":
        counting.register()
        from tileseg.cli import main

        path = os.path.join(out, "p.yaml")
        with open(path, "w") as fh:
            fh.write(PIPELINE.format(image=image, out=out))
        main(["-q", "run", path, "--fresh"], standalone_mode=False)
    else:
        import tileseg

        img = tileseg.open(image, array="image")
        seg = tileseg.segment(img, counting._forward, patch_size=(256, 256), overlap=0.25, preprocess=["zscore"],
                              out_channels=2, class_names=["background", "object"])
        tileseg.write(seg, os.path.join(out, "seg.zarr"))
    print("\n" + MARK + json.dumps({"error": "no model call"}), flush=True)


def make_image(path: str, side: int) -> None:
    """A virtual ``side x side`` uint8 Zarr (no chunk stored: every pixel reads as the fill value 7)."""
    import zarr

    g = zarr.open_group(path, mode="w")
    g.create_array("image", shape=(side, side), chunks=(1024, 1024), dtype="uint8", fill_value=7)


def blocks_of(side: int) -> int:
    """Output blocks of the pipeline's default grid for a ``side x side`` image."""
    from tileseg.tiling.grid import make_grid

    grid = make_grid((side, side), (256, 256), overlap=0.25, batch_size=8)
    return int(grid.n_blocks[0] * grid.n_blocks[1])


def measure(entry: str, image: str, work: str, timeout: float) -> dict:
    out = tempfile.mkdtemp(dir=work)
    try:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", entry, image, out],
                              capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))})
        lines = [line[len(MARK):] for line in proc.stdout.splitlines() if line.startswith(MARK)]
        row = json.loads(lines[-1]) if lines else {"error": proc.stderr.strip().splitlines()[-1:]}
    except subprocess.TimeoutExpired:
        row = {"error": f"timeout after {timeout:.0f} s"}
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--entry", choices=["run", "segment", "both"], default="both")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--work", default=None, help="folder for the virtual images (default: a temporary one)")
    ap.add_argument("--child", nargs=3, metavar=("ENTRY", "IMAGE", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    work = args.work or tempfile.mkdtemp(prefix="bench_huge-")
    os.makedirs(work, exist_ok=True)
    sides = {"1e5": 10**5, "1e6": 10**6}
    images = {}
    for name, side in sides.items():
        images[name] = os.path.join(work, f"huge{name}.zarr")
        make_image(images[name], side)
    entries = ["run", "segment"] if args.entry == "both" else [args.entry]
    print(f"# {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    rows: dict[tuple[str, str], list[dict]] = {}
    try:
        for _ in range(args.repeat):
            for entry in entries:
                for name in sides:
                    row = measure(entry, images[name], work, args.timeout)
                    rows.setdefault((entry, name), []).append(row)
                    print(f"# {entry} {name}: {row}", flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"# {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    keys = ["graph_s", "first_task_s", "setup_s", "client_mb", "peak_mb", "tasks"]
    print("| entry | image | blocks | " + " | ".join(keys) + " |")
    print("|---|---|---:|" + "---:|" * len(keys))
    med: dict[tuple[str, str], dict] = {}
    for (entry, name), rs in rows.items():
        ok = [r for r in rs if "error" not in r]
        m = {k: statistics.median(r[k] for r in ok) for k in keys} if ok else {}
        med[(entry, name)] = m
        cells = [f"{m[k]:.1f}" if k != "tasks" else f"{m[k]:.0f}" for k in keys] if m else ["failed"] * len(keys)
        print(f"| {entry} | {name} ({len(ok)}/{len(rs)} ok) | {blocks_of(sides[name])} | " + " | ".join(cells) + " |")
    ratio_blocks = blocks_of(sides["1e6"]) / blocks_of(sides["1e5"])
    for entry in entries:
        a, b = med.get((entry, "1e5")), med.get((entry, "1e6"))
        if a and b:
            print(f"| {entry} | ratio 1e6/1e5 (pixels x100) | {ratio_blocks:.2f} | "
                  + " | ".join(f"{b[k] / a[k]:.2f}" for k in keys) + " |")


if __name__ == "__main__":
    main()
