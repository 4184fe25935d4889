"""Stitching benchmark: light and many-class models against a bare forward loop and MONAI.

Not a test. ``python benchmarks/bench_stitch.py`` runs every case; ``--cases light16``
picks some, ``--profile CASE`` prints a cProfile of one synchronous ``tileseg.segment``
run instead. Each measurement runs in its own subprocess; times are the median of
``--repeat`` interleaved runs, and ratios are against the bare loop of the same run.

Cases
-----
light16   Conv3d(1, 8, 3) + ReLU + Conv3d(8, 16, 1); volume 96 x 160 x 160, patch 48^3,
          overlap 0.5, batch 4, chunks 96 (where stitching costs as much as the model)
light64   the same with 64 output classes
heavy2d   three 32-channel 3x3 convolutions + a 1x1 to 4 classes; image 1024 x 1024,
          patch 256, overlap 0.25, batch 4, chunks 512

Variants
--------
loop      the same patches cut from the in-memory image, batched, forwarded; no stitching
loop2     the same loop in two Python threads (alternate batches), torch's threads as set: the forwards
          alone as concurrently as tileseg's two scheduler threads run them (information: the
          ratios are against ``loop``, the issue's baseline)
bound     the loop plus one read of every output value (a sum per batch): no exact stitching
          can do less, since each value the model writes must be read once to be blended
floor     the loop plus the least any stitching must do: each patch times the window added in
          place (one fused ``addcmul_``) into one preallocated K x volume float32 tensor, then
          an argmax. Its gap to the loop is the memory traffic of weighting and accumulating.
monai     ``monai.inferers.sliding_window_inference`` (gaussian), then argmax
segment   ``tileseg.segment(..., output="labels").data.compute()`` (numpy in, numpy out)

Every variant runs one warm-up forward, then the whole variant once untimed, before the clock
starts: the steady state of a process that segments many items (``--cold`` times the first run
instead: thread pools and first page faults included; imports, including the ``distributed`` that
dask's ``compute()`` imports to look for a client when it is installed, happen before the clock).
"CPU s" is the process's CPU time over the same span (all threads): the work done, which
other jobs on a shared machine disturb far less than the wall-clock time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this tree's tileseg, also in the children that run this file

CASES = {
    "light16": {"ndim": 3, "classes": 16, "shape": (96, 160, 160), "patch": (48, 48, 48), "overlap": 0.5,
                "batch": 4, "chunks": 96},
    "light64": {"ndim": 3, "classes": 64, "shape": (96, 160, 160), "patch": (48, 48, 48), "overlap": 0.5,
                "batch": 4, "chunks": 96},
    "heavy2d": {"ndim": 2, "classes": 4, "shape": (1024, 1024), "patch": (256, 256), "overlap": 0.25,
                "batch": 4, "chunks": 512},
}


def _net(case: dict):
    import torch

    torch.manual_seed(0)
    nn = torch.nn
    if case["ndim"] == 3:
        net = nn.Sequential(nn.Conv3d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv3d(8, case["classes"], 1))
    else:
        net = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, case["classes"], 1))
    return net.eval()


def _image(case: dict) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.standard_normal(case["shape"]).astype(np.float32)


def _segment(x, net, case):
    import tileseg

    return tileseg.segment(x, net, patch_size=case["patch"], overlap=case["overlap"], batch_size=case["batch"],
                           output="labels", chunks=case["chunks"])


def variant(name: str, case_name: str, warm: bool = True) -> dict:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    case = CASES[case_name]
    net = _net(case)
    x = _image(case)
    patch, batch = case["patch"], case["batch"]
    from tileseg.tiling.grid import make_grid

    grid = make_grid(case["shape"], patch, overlap=case["overlap"])
    starts = np.array([s for o in grid.owners() for s in grid.patches_of(o)])
    if name == "monai":
        from monai.inferers import sliding_window_inference
    elif name == "segment":
        import dask.array  # noqa: F401
        import dask.threaded  # noqa: F401

        import tileseg.graph  # noqa: F401

        try:  # dask's compute() imports distributed (0.3 s) to look for a client: dask's cost, paid once by any
            import distributed  # noqa: F401  # user of dask, imported here with the other imports
        except ImportError:
            pass
    with torch.inference_mode():  # warm-up forward, same for every variant
        net(torch.zeros((batch, 1) + tuple(patch)))

    def work() -> None:
        if name == "loop":
            with torch.inference_mode():
                for i in range(0, len(starts), batch):
                    b = np.stack([x[tuple(slice(a, a + p) for a, p in zip(s, patch))] for s in starts[i: i + batch]])
                    net(torch.from_numpy(b[:, None]))
        elif name == "loop2":
            from concurrent.futures import ThreadPoolExecutor

            def forward(i: int) -> None:
                with torch.inference_mode():
                    b = np.stack([x[tuple(slice(a, a + p) for a, p in zip(s, patch))] for s in starts[i: i + batch]])
                    net(torch.from_numpy(b[:, None]))

            with ThreadPoolExecutor(2) as pool:
                list(pool.map(forward, range(0, len(starts), batch)))
        elif name == "bound":
            with torch.inference_mode():
                for i in range(0, len(starts), batch):
                    b = np.stack([x[tuple(slice(a, a + p) for a, p in zip(s, patch))] for s in starts[i: i + batch]])
                    net(torch.from_numpy(b[:, None])).sum()
        elif name == "floor":
            from tileseg.stitching.weights import blend_window

            with torch.inference_mode():
                w = torch.from_numpy(np.array(blend_window(patch, "gaussian")))
                acc = torch.zeros((case["classes"],) + tuple(case["shape"]))
                for i in range(0, len(starts), batch):
                    b = np.stack([x[tuple(slice(a, a + p) for a, p in zip(s, patch))] for s in starts[i: i + batch]])
                    y = net(torch.from_numpy(b[:, None]))
                    for s, yj in zip(starts[i: i + batch], y):
                        acc[(slice(None),) + tuple(slice(a, a + p) for a, p in zip(s, patch))].addcmul_(yj, w)
                acc.argmax(0).to(torch.uint8).numpy()
        elif name == "monai":
            with torch.inference_mode():
                out = sliding_window_inference(torch.from_numpy(x[None, None]), patch, batch, net,
                                               overlap=case["overlap"], mode="gaussian")
                out.argmax(1).to(torch.uint8).numpy()
        elif name == "segment":
            _segment(x, net, case).data.compute()
        else:
            raise ValueError(name)

    if warm:  # one untimed run of the whole variant first: the steady state of a process that segments many items
        work()
    t0, c0 = time.perf_counter(), _cpu()
    work()
    seconds, cpu = time.perf_counter() - t0, _cpu() - c0
    return {"variant": name, "case": case_name, "n_patches": len(starts), "seconds": seconds, "cpu_seconds": cpu,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _cpu() -> float:
    """CPU seconds of this process, all threads (user + system)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def profile(case_name: str, top: int, cpu: bool) -> None:
    """cProfile of one synchronous tileseg run (after a warm-up run), top entries by own time.

    With ``cpu``, torch runs on one thread and the profile counts that thread's CPU
    time (``time.thread_time``): the work done, unaffected by other jobs on the machine.
    """
    import cProfile
    import pstats

    import torch

    torch.set_num_threads(1 if cpu else os.cpu_count() or 1)
    case = CASES[case_name]
    net, x = _net(case), _image(case)
    _segment(x, net, case).data.compute(scheduler="synchronous")
    clock = time.thread_time if cpu else time.perf_counter
    prof = cProfile.Profile(clock)
    t0 = clock()
    prof.enable()
    _segment(x, net, case).data.compute(scheduler="synchronous")
    prof.disable()
    print(f"# {case_name}: one synchronous run, {clock() - t0:.2f} s {'CPU (one thread)' if cpu else 'wall'} "
          "under cProfile")
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)


def run_sub(name: str, case_name: str, cold: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--variant", name, "--case", case_name] + (["--cold"] if cold else [])
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if out.returncode != 0:
        return {"variant": name, "case": case_name, "error": out.stderr.strip().splitlines()[-1:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _median(results: list[dict]) -> dict:
    ok = sorted((r for r in results if "seconds" in r), key=lambda r: r["seconds"])
    if not ok:
        return results[0]
    row = dict(ok[len(ok) // 2])
    row["all_seconds"] = [round(r["seconds"], 2) for r in results if "seconds" in r]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant")
    ap.add_argument("--cold", action="store_true",
                    help="time each variant's first run in its process (imports, thread pools and first page "
                         "faults included) instead of the run after an untimed one")
    ap.add_argument("--case")
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--variants", nargs="+", default=["loop", "loop2", "bound", "floor", "monai", "segment"],
                    choices=["loop", "loop2", "bound", "floor", "monai", "segment"], help="loop must come first (the baseline)")
    ap.add_argument("--repeat", type=int, default=5, help="interleaved runs per variant")
    ap.add_argument("--profile", choices=list(CASES), help="print a cProfile of one tileseg run of this case")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--cpu", action="store_true", help="profile CPU time on one torch thread (for a busy machine)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.variants[0] != "loop":
        ap.error("--variants: the first must be loop (the baseline of the ratios)")
    if args.variant:
        print(json.dumps(variant(args.variant, args.case, warm=not args.cold)))
        return
    if args.profile:
        profile(args.profile, args.top, args.cpu)
        return
    print(f"# {os.cpu_count()} CPU cores; {'first run timed (--cold)' if args.cold else 'run after an untimed one'}; "
          f"load average before: {os.getloadavg()[0]:.2f}; "
          f"median of {args.repeat} interleaved runs per variant")
    variants = tuple(args.variants)
    results = {}
    for case_name in args.cases:
        runs: dict[str, list] = {v: [] for v in variants}
        for _ in range(args.repeat):
            for v in variants:
                runs[v].append(run_sub(v, case_name, args.cold))
        rows = [_median(runs[v]) for v in variants]
        results[case_name] = rows
        c = CASES[case_name]
        print(f"\n## {case_name}: {c['classes']} classes, image {c['shape']}, patch {c['patch']}, "
              f"overlap {c['overlap']}, batch {c['batch']}, chunks {c['chunks']}")
        print("| variant | patches | seconds | throughput vs loop | vs MONAI | CPU s | peak RSS (MiB) | all runs (s) |")
        print("|---|---:|---:|---:|---:|---:|---:|---|")
        base = rows[0].get("seconds")
        monai = rows[variants.index("monai")].get("seconds") if "monai" in variants else None
        for r in rows:
            if "error" in r:
                print(f"| {r['variant']} | - | failed: {r['error']} | | | | | |")
                continue
            vs_monai = f"{monai / r['seconds']:.2f}x" if monai else "-"
            print(f"| {r['variant']} | {r['n_patches']} | {r['seconds']:.2f} | {base / r['seconds']:.2f}x | "
                  f"{vs_monai} | {r['cpu_seconds']:.2f} | {r['peak_rss_mib']:.0f} | {r['all_seconds']} |")
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
