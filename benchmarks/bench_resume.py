"""Benchmark: the cost of chunk records, and what a rerun recomputes after a kill at about 50%.

Part 1, overhead of writing with chunk records (in this process): the lazy result of
:func:`tileseg.segment` (a cheap NumPy model, so the write path dominates) written to Zarr three
ways, interleaved, median of ``--repeat`` runs each:

* ``da.store``: ``dask.array.store`` into the partial output, the write path before chunk records;
* ``unguarded``: :func:`tileseg.writers.blocks.store_blocks` without records and without the
  partial-folder guard (no lock: the cost of :mod:`tileseg.writers.partial_lock` is ``blocks`` over this);
* ``blocks``: :func:`tileseg.writers.blocks.store_blocks` without records (one store task per chunk,
  graph culled per chunk; each write holds the partial folder's shared lock);
* ``records``: the writer's real write task (``store_blocks`` plus one marker file per chunk).

Part 2, kill at ~50% (real processes): ``tileseg run`` with the ``counting`` model of
:mod:`tileseg.testing.counting` (each batch sleeps ``--delay`` s, like a model), SIGKILLed once half
of the output chunks are recorded, then rerun. Reports the model calls and wall time of the rerun
against an uninterrupted run (before chunk records, a rerun recomputed 100%).

Usage::

    python benchmarks/bench_resume.py                # both parts
    python benchmarks/bench_resume.py --size 4096 --repeat 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _result(size: int, chunk: int):
    import dask.array as da

    import tileseg

    rng = da.random.default_rng(0)
    image = rng.random((size, size), chunks=chunk, dtype=np.float32)

    def model(batch: np.ndarray) -> np.ndarray:
        return np.concatenate([batch, 1 - batch], axis=1)

    return tileseg.segment(image, model, patch_size=(64, 64), overlap=0.25, chunks=chunk, batch_size=16,
                           out_channels=2)


def _write(result, path: str, how: str) -> float:
    import dask
    import zarr
    from zarr.storage import LocalStore

    from tileseg.writers import get_writer
    from tileseg.writers.base import GuardedTarget
    from tileseg.writers.blocks import store_blocks
    from tileseg.writers.zarr import align

    writer = get_writer("zarr")
    t0 = time.perf_counter()
    handle = writer.prepare(result, path, overwrite=True)
    if how == "records":
        task = writer.write_task(handle, result)
    else:
        arr = zarr.open_array(store=LocalStore(handle.target), path="0", mode="r+")
        data = align(result.data, handle.chunks)
        if how == "da.store":
            import dask.array as da

            task = da.store(data, GuardedTarget(arr, handle.target), lock=False, compute=False)
        elif how == "unguarded":
            task = store_blocks(data, arr)
        else:
            task = store_blocks(data, arr, guard=handle.target)
    with dask.config.set(scheduler="threads"):
        dask.compute(task)
    writer.finalize(handle)
    return time.perf_counter() - t0


def part_overhead(size: int, chunk: int, repeat: int, tmp: str) -> None:
    result = _result(size, chunk)
    n_chunks = int(np.prod(result.data.numblocks))
    hows = ("da.store", "unguarded", "blocks", "records")
    times: dict[str, list[float]] = {h: [] for h in hows}
    _write(result, os.path.join(tmp, "warm.zarr"), "records")
    for r in range(repeat):
        for how in hows:
            times[how].append(_write(result, os.path.join(tmp, f"{how}-{r}.zarr"), how))
            shutil.rmtree(os.path.join(tmp, f"{how}-{r}.zarr"), ignore_errors=True)
    base = statistics.median(times["da.store"])
    print(f"\n## write overhead: {size}^2 float32 probabilities (2 classes), {n_chunks} chunks of {chunk}^2, "
          f"median of {repeat} interleaved runs")
    print("| write path | time (s) | vs da.store |")
    print("|---|---|---|")
    for how in hows:
        m = statistics.median(times[how])
        print(f"| {how} | {m:.2f} | {m / base:.2f}x |")


#: ``tileseg run`` checks the model with one single-patch forward before the item (not counted).
DRY = 1

PIPELINE = """version: 1
input: {{path: a.zarr, array: image}}
tiling: {{patch_size: [64, 64], overlap: 0.25, chunks: [{chunk}, {chunk}]}}
model:
  counting: {{}}
  output: probabilities
  batch_size: 4
output: {{path: 'out/{{stem}}_prob.zarr'}}
execution: {{scheduler: threads, workers: 2}}
"""


def _run(folder: Path, calls: Path, delay: float) -> subprocess.Popen:
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
           "TILESEG_TEST_CALLS": str(calls), "TILESEG_TEST_DELAY": str(delay)}
    return subprocess.Popen([sys.executable, "-m", "tileseg.testing.counting", "run", "p.yaml", "--quiet"],
                            cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _recorded(out: Path) -> int:
    from tileseg.writers.blocks import RECORDS

    return sum(len(os.listdir(p / RECORDS)) for p in out.parent.glob(f".{out.name}.partial-*")
               if (p / RECORDS).is_dir())


def part_kill(size: int, chunk: int, delay: float, tmp: str) -> None:
    import zarr

    from tileseg.testing.counting import calls

    rng = np.random.default_rng(1)
    image = rng.random((size, size), dtype=np.float32)
    n_chunks = (size // chunk) ** 2
    rows = []
    for name in ("clean", "killed"):
        folder = Path(tmp) / name
        folder.mkdir()
        g = zarr.open_group(str(folder / "a.zarr"), mode="w")
        g.create_array("image", shape=image.shape, chunks=(chunk, chunk), dtype="float32")[:] = image
        (folder / "p.yaml").write_text(PIPELINE.format(chunk=chunk))
    t0 = time.perf_counter()
    assert _run(Path(tmp) / "clean", Path(tmp) / "clean.txt", delay).wait() == 0
    t_clean = time.perf_counter() - t0
    n_clean = len(calls(Path(tmp) / "clean.txt")) - DRY
    out = Path(tmp) / "killed" / "out" / "a_prob.zarr"
    proc = _run(Path(tmp) / "killed", Path(tmp) / "first.txt", delay)
    while _recorded(out) < n_chunks // 2 and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = _recorded(out)
    t0 = time.perf_counter()
    assert _run(Path(tmp) / "killed", Path(tmp) / "second.txt", delay).wait() == 0
    t_rerun = time.perf_counter() - t0
    n_rerun = len(calls(Path(tmp) / "second.txt")) - DRY
    same = np.array_equal(zarr.open_group(str(out), mode="r")["0"][...],
                          zarr.open_group(str(Path(tmp) / "clean" / "out" / "a_prob.zarr"), mode="r")["0"][...])
    rows.append((done, n_chunks, n_clean, n_rerun, t_clean, t_rerun, same))
    print(f"\n## kill at ~50%: {size}^2, {n_chunks} chunks of {chunk}^2, patch 64, overlap 0.25, batch 4, "
          f"model {delay * 1000:.0f} ms per batch, 2 threads")
    print("| chunks recorded at the kill | model calls, clean run | model calls, rerun | recomputed fraction "
          "| time clean (s) | time rerun (s) | rerun / clean time | output identical |")
    print("|---|---|---|---|---|---|---|---|")
    for done, n, nc, nr, tc, tr, ok in rows:
        print(f"| {done} of {n} | {nc} | {nr} | {nr / nc:.2f} | {tc:.1f} | {tr:.1f} | {tr / tc:.2f} | {ok} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096, help="image side for the overhead part")
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--kill-size", type=int, default=1024, help="image side for the kill part")
    ap.add_argument("--kill-chunk", type=int, default=128)
    ap.add_argument("--delay", type=float, default=0.02, help="seconds per model batch in the kill part")
    ap.add_argument("--parts", nargs="+", default=["overhead", "kill"], choices=["overhead", "kill"])
    args = ap.parse_args()
    print("load:", os.getloadavg())
    tmp = tempfile.mkdtemp(prefix="bench_resume_")
    try:
        if "overhead" in args.parts:
            part_overhead(args.size, args.chunk, args.repeat, tmp)
        if "kill" in args.parts:
            part_kill(args.kill_size, args.kill_chunk, args.delay, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("load:", os.getloadavg())


if __name__ == "__main__":
    main()
