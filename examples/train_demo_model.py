"""Train the built-in U-Net on synthetic blobs (CPU, well under a minute) and save TorchScript.

Usage::

    python examples/train_demo_model.py                 # 2D (about 15-30 s on 2 CPU cores)
    python examples/train_demo_model.py --dims 2 3      # also the 3D net (a few CPU-minutes:
                                                        # 3D conv backward is slow on CPU)

Training images are small freshly generated blob scenes
(:mod:`tileseg.testing.synthetic`), z-scored with the same global per-image
statistics the demo pipeline applies (``preprocess: [{zscore: {}}]``), cut
into random crops with random flips. Validation Dice is measured on a
held-out scene (another seed) after the same z-scoring. The saved file is
``torch.jit.script`` of the net in eval mode; it carries ``in_channels``,
``out_channels``, ``size_divisor`` and ``receptive_field`` attributes that
:class:`tileseg.predictors.torch.TorchPredictor` reads.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tileseg.predictors.unet import UNet  # noqa: E402
from tileseg.preprocess import zscore  # noqa: E402
from tileseg.testing.synthetic import blobs_2d, blobs_3d, dice  # noqa: E402

SETTINGS = {
    # dims: training scene shape, number of scenes, crop, batch, iterations, validation shape
    2: {"shape": (384, 384), "scenes": 6, "crop": 96, "batch": 12, "iters": 200, "val": (768, 768),
        "base": 8},
    3: {"shape": (64, 64, 64), "scenes": 4, "crop": 32, "batch": 2, "iters": 200, "val": (96, 96, 96),
        "base": 4},
}


def normalised(image: np.ndarray) -> np.ndarray:
    """Global z-score of a single-channel image, as the demo pipeline does."""
    return zscore(image[None]).compute()[0]


def make_scenes(dims: int, seeds: list[int], shape: tuple[int, ...]):
    maker = blobs_2d if dims == 2 else blobs_3d
    pairs = [maker(shape, seed=s) for s in seeds]
    return [normalised(img) for img, _ in pairs], [lab.astype(np.int64) for _, lab in pairs]


def sample_batch(rng: np.random.Generator, images, labels, crop: int, batch: int, focus: float = 0.0):
    """Random crops with random flips; a fraction ``focus`` of them is centred on a voxel of a
    random foreground class (small structures are then seen often enough)."""
    xs, ys = [], []
    for _ in range(batch):
        k = rng.integers(len(images))
        img, lab = images[k], labels[k]
        starts = [rng.integers(0, s - crop + 1) for s in img.shape]
        if focus > 0 and rng.random() < focus:
            classes = [c for c in np.unique(lab) if c > 0]
            where = np.argwhere(lab == classes[rng.integers(len(classes))])
            centre = where[rng.integers(len(where))]
            starts = [int(np.clip(c - crop // 2, 0, s - crop)) for c, s in zip(centre, img.shape)]
        sl = tuple(slice(a, a + crop) for a in starts)
        x, y = img[sl], lab[sl]
        for ax in range(x.ndim):
            if rng.random() < 0.5:
                x, y = np.flip(x, ax), np.flip(y, ax)
        xs.append(np.ascontiguousarray(x)[None])
        ys.append(np.ascontiguousarray(y))
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))


def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy plus the soft Dice loss averaged over the foreground classes (1, 2, ...)."""
    ce = F.cross_entropy(logits, target)
    prob = logits.softmax(1)
    losses = []
    for k in range(1, logits.shape[1]):
        fg = (target == k).float()
        losses.append(1 - (2 * (prob[:, k] * fg).sum() + 1) / (prob[:, k].sum() + fg.sum() + 1))
    return ce + torch.stack(losses).mean()


def fit(model: torch.nn.Module, images, labels, *, crop: int, batch: int, iters: int, seed: int,
        tag: str, focus: float = 0.0) -> float:
    """Train ``model`` on random flipped crops of ``images``/``labels`` (Adam, one-cycle); seconds taken."""
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=iters, pct_start=0.2)
    model.train()
    for it in range(iters):
        x, y = sample_batch(rng, images, labels, crop, batch, focus)
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if (it + 1) % 50 == 0:
            print(f"  {tag} iter {it + 1}/{iters} loss {loss.item():.3f}", flush=True)
    model.eval()
    return time.perf_counter() - t0


def save_torchscript(model: torch.nn.Module, out: Path, probe: np.ndarray) -> None:
    """Save ``torch.jit.script(model)`` (eval mode) and check it reproduces the eager model on ``probe``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated but still the portable format
        scripted = torch.jit.script(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    scripted.save(str(out))
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        x = torch.from_numpy(np.ascontiguousarray(probe))[None, None]
        diff = (torch.jit.load(str(out))(x) - model(x)).abs().max().item()
    if diff > 1e-4:
        raise RuntimeError(f"TorchScript output differs from the eager model by {diff}")


def trainer_args(argv: list[str] | None, doc: str, out: Path, iters: int, seed: int) -> argparse.Namespace:
    """``--out``, ``--iters``, ``--seed``, ``--threads`` of a one-model trainer; sets torch's threads and seed."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--out", type=Path, default=out)
    ap.add_argument("--iters", type=int, default=iters)
    ap.add_argument("--seed", type=int, default=seed)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return args


def train(dims: int, out: Path, seed: int, iters: int | None) -> dict:
    cfg = SETTINGS[dims]
    iters = iters or cfg["iters"]
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    images, labels = make_scenes(dims, [seed * 1000 + i for i in range(cfg["scenes"])], cfg["shape"])
    model = UNet(1, 2, spatial_dims=dims, depth=3, base_features=cfg["base"], norm="batch")
    fit(model, images, labels, crop=cfg["crop"], batch=cfg["batch"], iters=iters, seed=seed, tag=f"{dims}D")
    train_s = time.perf_counter() - t0
    val_img, val_lab = make_scenes(dims, [seed * 1000 + 999], cfg["val"])
    with torch.inference_mode():
        pred = model(torch.from_numpy(val_img[0])[None, None]).argmax(1)[0].numpy()
    score = dice(pred, val_lab[0])
    save_torchscript(model, out, val_img[0][tuple(slice(0, 64) for _ in range(dims))])
    info = {"dims": dims, "train_s": round(train_s, 1), "iters": iters, "val_dice": round(score, 4),
            "file": str(out), "kb": round(out.stat().st_size / 1024, 1),
            "params": sum(p.numel() for p in model.parameters())}
    print(f"{dims}D U-Net: {info['params']} parameters, trained {iters} iterations in {train_s:.1f} s, "
          f"validation Dice {score:.4f}, saved {out} ({info['kb']} KB)", flush=True)
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", type=Path, default=ROOT / "examples" / "models")
    ap.add_argument("--dims", type=int, nargs="+", default=[2], choices=[2, 3])
    ap.add_argument("--iters", type=int, default=None, help="training iterations (default per dims)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    for dims in args.dims:
        train(dims, args.out_dir / f"unet{dims}d.pt", args.seed, args.iters)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
