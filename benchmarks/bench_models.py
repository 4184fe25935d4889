"""Model throughput: ``tileseg.segment`` vs a tight loop of forwards over the same patches, with and without TTA.

Not a test. Run ``python benchmarks/bench_models.py`` (``--quick`` for a
smoke run; ``--device cuda`` on a GPU machine). Ratios are measured in the
same process and run: every variant is repeated ``--repeat`` times,
interleaved, and the median time is kept, so load from other processes hits
all variants alike. The load average (``uptime``) is printed with the table.

Models
------
smp-unet2d  segmentation_models_pytorch ``Unet`` (resnet18 encoder, random
            weights, ``encoder_weights=None``); the built-in 2D U-Net when
            smp is not installed (the table says which)
unet3d      the built-in 3D U-Net (depth 4, 16 base features)

Variants (per model, precision and batch size)
----------------------------------------------
loop        the same patches cut from the in-memory image, batched and
            forwarded (TTA: every flip folded into the batch, flipped back
            and averaged, exactly the work tileseg does); outputs brought to
            the host; no blending, no argmax
segment     ``tileseg.segment(...).data.compute()`` to labels (Gaussian
            blending, argmax), threaded scheduler

Throughput is ``loop seconds / segment seconds`` (the target is >= 0.9x).
The process CPU time of both is printed too: on a machine shared with other
busy processes, the variant with more runnable threads (tileseg: Dask
threads plus torch's) gets a larger share of the cores, which can push the
wall-clock ratio above 1; CPU seconds show the work each variant did.
On CUDA each forward is bracketed by CUDA events; "GPU busy" is the summed
forward time over the wall time (also through tileseg, by wrapping the
model). fp16/bf16 rows use ``torch.autocast`` in both variants.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from itertools import combinations
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OVERLAP = 0.25
AXIS_DIM = {"x": -1, "y": -2, "z": -3}


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average: " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


def build_model(name: str):
    """``(module, label)``: the model with fixed random weights, eval mode."""
    import torch

    torch.manual_seed(0)
    if name == "smp-unet2d":
        try:
            import segmentation_models_pytorch as smp
        except ImportError:
            from tileseg.predictors.unet import UNet

            net = UNet(in_channels=1, out_channels=2, spatial_dims=2, depth=5, base_features=32)
            return net.eval(), "built-in 2D U-Net (depth 5, 32 features; segmentation_models_pytorch not installed)"
        net = smp.Unet(encoder_name="resnet18", encoder_weights=None, in_channels=1, classes=2)
        return net.eval(), f"smp {smp.__version__} Unet(resnet18), random weights"
    if name == "unet3d":
        from tileseg.predictors.unet import UNet

        net = UNet(in_channels=1, out_channels=2, spatial_dims=3, depth=4, base_features=16)
        return net.eval(), "built-in 3D U-Net (depth 4, 16 features)"
    raise ValueError(name)


class Timed:
    """Wraps a module; on CUDA records an event pair around every forward (for the busy fraction)."""

    def __init__(self, module, cuda: bool) -> None:
        self.module, self.cuda, self.events = module, cuda, []

    def forward(self, x):
        import torch

        if not self.cuda:
            return self.module(x)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        y = self.module(x)
        b.record()
        self.events.append((a, b))
        return y

    def busy_seconds(self) -> float:
        import torch

        if not self.events:
            return 0.0
        torch.cuda.synchronize()
        return sum(a.elapsed_time(b) for a, b in self.events) / 1000.0


def as_module(timed: Timed):
    """A ``torch.nn.Module`` whose forward goes through ``timed`` (tileseg takes modules)."""
    import torch

    class _M(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = timed.module
            self.in_channels, self.out_channels = 1, 2

        def forward(self, x):
            return timed.forward(x)

    return _M().eval()


def flips_of(axes, ndim: int) -> list[tuple[int, ...]]:
    dims = [ndim + AXIS_DIM[a] for a in axes]
    return [c for r in range(len(dims) + 1) for c in combinations(dims, r)]


def run_loop(timed: Timed, image: np.ndarray, patch, batch_size: int, axes, device: str, precision: str) -> None:
    """The baseline: batches of the grid's patches, forwarded (TTA folded), outputs on the host."""
    import torch

    from tileseg.tiling.grid import make_grid

    grid = make_grid(image.shape, patch, overlap=OVERLAP)
    starts = np.array([s for o in grid.owners() for s in grid.patches_of(o)])
    flips = flips_of(axes, image.ndim + 2)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    dev = torch.device(device)
    with torch.inference_mode():
        for i in range(0, len(starts), batch_size):
            batch = np.stack([image[tuple(slice(a, a + p) for a, p in zip(s, patch))] for s in starts[i : i + batch_size]])
            x = torch.from_numpy(batch[:, None]).to(dev)
            if len(flips) > 1:
                x = torch.cat([x.flip(d) if d else x for d in flips])
            with torch.autocast(dev.type, dtype=dtype) if dtype is not None else _null():
                y = timed.forward(x).float()
            if len(flips) > 1:
                n = len(batch)
                y = sum(y[k * n : (k + 1) * n].flip(d) if d else y[k * n : (k + 1) * n] for k, d in enumerate(flips))
                y = y / len(flips)
            y.cpu().numpy()


def _null():
    from contextlib import nullcontext

    return nullcontext()


def run_segment(timed: Timed, image: np.ndarray, patch, batch_size: int, axes, device: str, precision: str,
                workers: int) -> None:
    import tileseg

    tileseg.segment(image, as_module(timed), patch_size=patch, overlap=OVERLAP, batch_size=batch_size,
                    output="labels", out_channels=2, tta=axes, device=device,
                    precision=precision).data.compute(scheduler="threads", num_workers=workers)


def measure(args, model: str, shape, patch, axes, precision: str, batch_size: int) -> dict:
    import torch

    from tileseg.tiling.grid import make_grid

    cuda = args.device.startswith("cuda")
    net, label = build_model(model)
    net = net.to(args.device)
    image = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    n_patches = make_grid(shape, patch, overlap=OVERLAP).n_patches
    runs: dict[str, list[tuple[float, float, float]]] = {"loop": [], "segment": []}

    def one(variant: str) -> tuple[float, float, float]:
        timed = Timed(net, cuda)
        if cuda:
            torch.cuda.synchronize()
        c0, t0 = time.process_time(), time.perf_counter()
        if variant == "loop":
            run_loop(timed, image, patch, batch_size, axes, args.device, precision)
        else:
            run_segment(timed, image, patch, batch_size, axes, args.device, precision, args.workers)
        if cuda:
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        return wall, timed.busy_seconds() / wall if cuda else float("nan"), cpu

    one("loop")  # warm-up: oneDNN / cuDNN kernel selection, lazy imports
    one("segment")
    for _ in range(args.repeat):
        for v in ("loop", "segment"):
            runs[v].append(one(v))
    row = {"model": model, "label": label, "shape": list(shape), "patch": list(patch), "tta": list(axes),
           "precision": precision, "batch_size": batch_size, "n_patches": n_patches,
           "forwards_x": len(flips_of(axes, len(shape) + 2))}
    for v, rs in runs.items():
        row[f"{v}_s"] = statistics.median(r[0] for r in rs)
        row[f"{v}_all_s"] = [round(r[0], 2) for r in rs]
        row[f"{v}_busy"] = statistics.median(r[1] for r in rs)
        row[f"{v}_cpu_s"] = statistics.median(r[2] for r in rs)
    row["ratio"] = row["loop_s"] / row["segment_s"]
    row["cpu_ratio"] = row["loop_cpu_s"] / row["segment_cpu_s"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda / cuda:N")
    ap.add_argument("--quick", action="store_true", help="small images, one repeat (a smoke run)")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved runs per variant (median kept)")
    ap.add_argument("--models", default="smp-unet2d,unet3d")
    ap.add_argument("--precisions", default=None, help="comma list; default fp32 on CPU, fp32,fp16,bf16 on CUDA")
    ap.add_argument("--batch-sizes", default=None, help="comma list; default 4 on CPU, 8,32 (2D) / 2,8 (3D) on CUDA")
    ap.add_argument("--workers", type=int, default=2, help="dask threads for tileseg")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device visible to torch")
    if args.quick:
        args.repeat = 1
    precisions = (args.precisions or ("fp32,fp16,bf16" if cuda else "fp32")).split(",")
    setups = {
        # model: (image shape, patch, TTA axes); larger images on a GPU
        "smp-unet2d": ((512, 512) if args.quick else (4096, 4096) if cuda else (1024, 1024), (256, 256), ("y", "x")),
        "unet3d": ((64, 96, 96) if args.quick else (256, 256, 256) if cuda else (96, 128, 128), (64, 64, 64), ("y", "x")),
    }
    default_bs = {"smp-unet2d": [8, 32], "unet3d": [2, 8]} if cuda else {"smp-unet2d": [4], "unet3d": [2]}
    dev_name = torch.cuda.get_device_name(torch.device(args.device)) if cuda else f"{os.cpu_count()} CPU cores"
    print(f"# tileseg.segment vs a tight forward loop on {args.device} ({dev_name}), torch {torch.__version__}")
    print(f"# before: {_uptime()}")
    rows = []
    for model in args.models.split(","):
        shape, patch, axes = setups[model]
        sizes = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else default_bs[model]
        for precision in precisions:
            for bs in sizes:
                for tta in ((), axes):
                    row = measure(args, model, shape, patch, tta, precision, bs)
                    rows.append(row)
                    print(f"  {model} tta={list(tta)} {precision} batch {bs}: loop {row['loop_s']:.2f}s, "
                          f"segment {row['segment_s']:.2f}s, ratio {row['ratio']:.2f}x (CPU time {row['cpu_ratio']:.2f}x)",
                          flush=True)
    print(f"# after: {_uptime()}")
    print(f"\n(median of {args.repeat} interleaved runs per variant; image, patch, overlap {OVERLAP}; "
          "throughput = loop seconds / segment seconds)")
    print("| model | image | patch | TTA | precision | batch | patches x forwards | loop s | segment s "
          "| throughput vs loop | CPU seconds loop / segment |" + (" GPU busy loop | GPU busy segment |" if cuda else ""))
    print("|---|---|---|---|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if cuda else ""))
    for r in rows:
        line = (f"| {r['label']} | {'x'.join(map(str, r['shape']))} | {'x'.join(map(str, r['patch']))} | "
                f"{','.join(r['tta']) or '-'} | {r['precision']} | {r['batch_size']} | {r['n_patches']} x "
                f"{r['forwards_x']} | {r['loop_s']:.2f} | {r['segment_s']:.2f} | {r['ratio']:.2f}x | "
                f"{r['loop_cpu_s']:.1f} / {r['segment_cpu_s']:.1f} |")
        if cuda:
            line += f" {r['loop_busy']:.0%} | {r['segment_busy']:.0%} |"
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
