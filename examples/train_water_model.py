"""Train a small 4-band U-Net for water on synthetic satellite scenes (CPU, well under a minute).

Usage::

    python examples/train_water_model.py            # writes examples/models/water_unet2d.pt

The scenes come from :mod:`tileseg.testing.geoscene` (blue, green, red, near
infrared as uint16 reflectance x 10000, a tilted nodata swath edge), rendered
in memory. The input is scaled to reflectance (``x * 0.0001``), exactly the
``preprocess: [{scale: {multiply: 0.0001}}]`` of ``pipelines/water_cog.yaml``;
nodata pixels are 0, which is also what tileseg hands the model for nodata
(``input.fill_value``). Ground truth outside the swath (255) is ignored by the
loss. The saved file is ``torch.jit.script`` of the net in eval mode.
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from train_demo_model import trainer_args  # noqa: E402  (examples/ is on sys.path)

from tileseg.predictors.unet import UNet  # noqa: E402
from tileseg.testing.geoscene import LABEL_NODATA, render_window, scene  # noqa: E402
from tileseg.testing.synthetic import dice  # noqa: E402

SHAPE, SCENES, CROP, BATCH, ITERS, BASE = (512, 512), 4, 96, 8, 150, 8


def make_scenes(seeds: list[int], shape: tuple[int, int]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    images, labels = [], []
    for s in seeds:
        bands, lab = render_window(scene(shape, s), slice(0, shape[0]), slice(0, shape[1]))
        images.append(bands.astype(np.float32) * np.float32(1e-4))
        labels.append(lab.astype(np.int64))
    return images, labels


def sample_batch(rng: np.random.Generator, images, labels) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for _ in range(BATCH):
        k = rng.integers(len(images))
        r, c = (int(rng.integers(0, s - CROP + 1)) for s in images[k].shape[1:])
        x, y = images[k][:, r:r + CROP, c:c + CROP], labels[k][r:r + CROP, c:c + CROP]
        if rng.random() < 0.5:
            x, y = x[:, ::-1], y[::-1]
        if rng.random() < 0.5:
            x, y = x[:, :, ::-1], y[:, ::-1]
        xs.append(np.ascontiguousarray(x))
        ys.append(np.ascontiguousarray(y))
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))


def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    ce = F.cross_entropy(logits, target, ignore_index=LABEL_NODATA)
    valid = (target != LABEL_NODATA).float()
    prob = logits.softmax(1)[:, 1] * valid
    fg = (target == 1).float()
    return ce + 1 - (2 * (prob * fg).sum() + 1) / (prob.sum() + fg.sum() + 1)


def main(argv: list[str] | None = None) -> int:
    args = trainer_args(argv, __doc__, ROOT / "examples" / "models" / "water_unet2d.pt", ITERS, 7)
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    images, labels = make_scenes([args.seed * 100 + i for i in range(SCENES)], SHAPE)
    model = UNet(4, 2, spatial_dims=2, depth=3, base_features=BASE, norm="batch")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=args.iters, pct_start=0.2)
    model.train()
    for it in range(args.iters):
        x, y = sample_batch(rng, images, labels)
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if (it + 1) % 50 == 0:
            print(f"  iter {it + 1}/{args.iters} loss {loss.item():.3f}", flush=True)
    train_s = time.perf_counter() - t0
    model.eval()
    val_img, val_lab = make_scenes([args.seed * 100 + 99], (768, 768))
    with torch.inference_mode():
        pred = model(torch.from_numpy(val_img[0])[None]).argmax(1)[0].numpy()
    valid = val_lab[0] != LABEL_NODATA
    score = dice(pred[valid], val_lab[0][valid])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated but still the portable format
        scripted = torch.jit.script(model)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    scripted.save(str(args.out))
    print(f"water U-Net: {sum(p.numel() for p in model.parameters())} parameters, {args.iters} iterations in "
          f"{train_s:.1f} s, validation Dice {score:.4f}, saved {args.out} ({args.out.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
