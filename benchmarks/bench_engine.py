"""Engine benchmark: tileseg vs a plain forward loop and MONAI, and memory scaling.

Not a test. Run ``python benchmarks/bench_engine.py`` (``--quick`` for a
smaller run). Every measurement runs in its own subprocess so that peak RSS
(``ru_maxrss``) belongs to that variant alone. Ratios are against the plain
loop of model forwards over the same patches, measured in the same run.

Variants
--------
loop      the same patches cut from an in-memory volume, batched, forwarded; no stitching
monai     ``monai.inferers.sliding_window_inference`` (gaussian), then argmax
segment   ``tileseg.segment(...).data.compute()`` to labels (numpy in, numpy out)
run       ``tileseg run`` on a pipeline file: Zarr volume on disk -> Zarr labels on disk

All variants run the same eager module (the built-in 3D U-Net); ``run`` loads it from
its state dict. Imports happen before the clock starts.
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
PATCH = (64, 64, 64)
OVERLAP = 0.25
BATCH = 4
NET = {"in_channels": 1, "out_channels": 2, "spatial_dims": 3, "depth": 4, "base_features": 16}


def _net(workdir: Path):
    import torch

    from tileseg.predictors.unet import UNet

    torch.manual_seed(0)
    net = UNet(**NET).eval()
    # Every variant runs this same eager module: tileseg run loads it from its state dict
    # (built-in U-Net), so the ratios measure the engines, not eager vs TorchScript.
    path = workdir / "unet3d_state.pt"
    if not path.exists():
        torch.save(net.state_dict(), str(path))
    return net, path


def _volume(shape, workdir: Path):
    """A blobby float32 volume, stored as Zarr (chunks 64) and returned in memory."""
    import zarr

    path = workdir / f"vol_{'x'.join(map(str, shape))}.zarr"
    rng = np.random.default_rng(0)
    if not path.exists():
        z = zarr.open_group(str(path), mode="w")
        arr = z.create_array("image", shape=shape, chunks=(64, 64, 64), dtype="float32")
        for i in range(0, shape[0], 64):
            arr[i : i + 64] = rng.standard_normal((min(64, shape[0] - i),) + shape[1:]).astype(np.float32)
    return path


def variant(name: str, shape, workdir: Path) -> dict:
    import torch
    import zarr

    torch.set_num_threads(os.cpu_count() or 1)
    net, model_path = _net(workdir)
    vol_path = _volume(shape, workdir)
    from tileseg.tiling.grid import make_grid

    n_patches = make_grid(shape, PATCH, overlap=OVERLAP).n_patches
    # Imports before the clock starts, for every variant alike (MONAI's alone takes about a second).
    if name == "monai":
        from monai.inferers import sliding_window_inference
    elif name in ("segment", "run"):
        import dask.array  # noqa: F401 - imported lazily by tileseg.segment (about 0.4 s)
        from click.testing import CliRunner

        import tileseg
        import tileseg.graph  # noqa: F401
        import tileseg.runner  # noqa: F401 - imported lazily by the CLI
        from tileseg.cli import main
    t0 = time.perf_counter()
    if name in ("loop", "monai", "segment"):
        x = zarr.open_group(str(vol_path), mode="r")["image"][:]
    if name == "loop":
        grid = make_grid(shape, PATCH, overlap=OVERLAP)
        starts = np.array([s for o in grid.owners() for s in grid.patches_of(o)])
        with torch.inference_mode():
            for i in range(0, len(starts), BATCH):
                batch = np.stack(
                    [x[tuple(slice(a, a + p) for a, p in zip(s, PATCH))] for s in starts[i : i + BATCH]]
                )
                net(torch.from_numpy(batch[:, None]))
    elif name == "monai":
        with torch.inference_mode():
            out = sliding_window_inference(
                torch.from_numpy(x[None, None]), PATCH, BATCH, net, overlap=OVERLAP, mode="gaussian"
            )
            out.argmax(1).to(torch.uint8).numpy()
    elif name == "segment":
        tileseg.segment(
            x,
            net,
            patch_size=PATCH,
            overlap=OVERLAP,
            batch_size=BATCH,
            output="labels",
            out_channels=2,
        ).data.compute(scheduler="threads", num_workers=2)
    elif name == "run":
        pipe = workdir / f"bench_{'x'.join(map(str, shape))}.yaml"
        out = workdir / "out"
        pipe.write_text(
            "version: 1\n"
            f"input: {{path: '{vol_path}', array: image}}\n"
            f"tiling: {{patch_size: {list(PATCH)}, overlap: {OVERLAP}, blend: gaussian}}\n"
            f"model: {{state_dict: {{path: '{model_path}', architecture: {{unet: {json.dumps(NET)}}}}}, "
            f"output: labels, batch_size: {BATCH}}}\n"
            f"output: {{path: '{out}/{{stem}}_seg.zarr', overwrite: true}}\n"
            "execution: {scheduler: threads, workers: 2}\n"
        )
        res = CliRunner().invoke(main, ["run", str(pipe), "--no-resume", "--quiet"], catch_exceptions=False)
        if res.exit_code != 0:
            raise RuntimeError(res.output)
    else:
        raise ValueError(name)
    seconds = time.perf_counter() - t0
    return {
        "variant": name,
        "shape": list(shape),
        "n_patches": n_patches,
        "seconds": seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def run_sub(name: str, shape, workdir: Path) -> dict:
    _volume(shape, workdir)  # written here, so no variant's peak RSS includes writing it
    cmd = [
        sys.executable,
        __file__,
        "--variant",
        name,
        "--shape",
        "x".join(map(str, shape)),
        "--workdir",
        str(workdir),
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if out.returncode != 0:
        return {"variant": name, "shape": list(shape), "error": out.stderr.strip().splitlines()[-1:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _median(results: list[dict]) -> dict:
    ok = sorted((r for r in results if "seconds" in r), key=lambda r: r["seconds"])
    if not ok:
        return results[0]  # every run failed: show the error
    row = dict(ok[len(ok) // 2])
    row["all_seconds"] = [round(r["seconds"], 2) for r in results if "seconds" in r]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant")
    ap.add_argument("--shape")
    ap.add_argument("--workdir")
    ap.add_argument("--quick", action="store_true", help="smaller volumes (for a smoke run)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--repeat", type=int, default=3, help="runs per variant for the throughput table")
    args = ap.parse_args()
    if args.variant:
        shape = tuple(int(v) for v in args.shape.split("x"))
        print(json.dumps(variant(args.variant, shape, Path(args.workdir))))
        return

    with tempfile.TemporaryDirectory(prefix="tileseg-bench-") as tmp:
        workdir = Path(tmp)
        main_shape = (64, 128, 128) if args.quick else (128, 128, 128)
        print(
            f"# 3D U-Net (depth 4, 16 base features), patch {PATCH}, overlap {OVERLAP}, batch {BATCH}, "
            f"{os.cpu_count()} CPU cores"
        )
        print(f"\n## Throughput on {main_shape}")
        # Interleaved repeats; each variant's median time, so machine noise hits all variants alike.
        variants = ("loop", "monai", "segment", "run")
        runs = {v: [] for v in variants}
        for _ in range(args.repeat):
            for v in variants:
                runs[v].append(run_sub(v, main_shape, workdir))
        rows = [_median(runs[v]) for v in variants]
        base = rows[0]["seconds"]
        print(f"(median of {args.repeat} interleaved runs per variant)")
        print("| variant | patches | seconds | throughput vs loop | peak RSS (MiB) |")
        print("|---|---:|---:|---:|---:|")
        for r in rows:
            if "error" in r:
                print(f"| {r['variant']} | - | failed: {r['error']} | | |")
                continue
            print(
                f"| {r['variant']} | {r['n_patches']} | {r['seconds']:.1f} | {base / r['seconds']:.2f}x | "
                f"{r['peak_rss_mib']:.0f} |"
            )

        # Start where the volume already spans several output chunks (default 128^3), so the
        # steps measure growth with the image, not the step from one task to several.
        sizes = (
            [(64, 256, 256), (128, 256, 512), (256, 512, 512)]
            if args.quick
            else [(128, 256, 256), (256, 256, 512), (512, 512, 512)]
        )
        print("\n## Peak RSS as the input grows 4x per step")
        print("| input | voxels | tileseg run (MiB) | MONAI (MiB) | tileseg s | MONAI s |")
        print("|---|---:|---:|---:|---:|---:|")
        scale = []
        for shape in sizes:
            t = run_sub("run", shape, workdir)
            m = run_sub("monai", shape, workdir)
            scale.append((t, m))
            print(
                f"| {'x'.join(map(str, shape))} | {int(np.prod(shape)):,} | {t.get('peak_rss_mib', float('nan')):.0f} | "
                f"{m.get('peak_rss_mib', float('nan')):.0f} | {t.get('seconds', float('nan')):.1f} | "
                f"{m.get('seconds', float('nan')):.1f} |"
            )
        t0, t2 = scale[0][0], scale[-1][0]
        m0, m2 = scale[0][1], scale[-1][1]
        if "peak_rss_mib" in t0 and "peak_rss_mib" in t2:
            print(
                f"\ntileseg peak RSS growth for 16x input: {t2['peak_rss_mib'] / t0['peak_rss_mib'] - 1:+.0%}; "
                f"MONAI: {m2['peak_rss_mib'] / m0['peak_rss_mib'] - 1:+.0%}"
            )
        if args.json:
            Path(args.json).write_text(json.dumps({"throughput": rows, "scaling": scale}, indent=2))


if __name__ == "__main__":
    main()
