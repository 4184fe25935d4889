"""Train a tiny 3D U-Net for bone and soft tissue on the CT phantom (CPU, seconds) and save TorchScript.

Usage::

    python examples/train_ct_model.py         # writes examples/models/ct_unet3d.pt

Training volumes are the phantom of :func:`tileseg.testing.dicom.phantom_hu`
at a few sizes, with Gaussian noise (10 HU) so the net does not learn exact
HU values, preprocessed exactly as ``pipelines/ct_model.yaml`` does
(``ct_window: {center: 40, width: 200}``). Classes: 0 background (air and
water), 1 bone, 2 soft tissue (:func:`tileseg.testing.dicom.phantom_labels`).
Validation Dice is measured on another size without noise. The training loop
and the TorchScript export are those of ``examples/train_demo_model.py``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from train_demo_model import fit, save_torchscript, trainer_args  # noqa: E402  (examples/ is on sys.path)

from tileseg.predictors.unet import UNet  # noqa: E402
from tileseg.preprocess_medical import ct_window  # noqa: E402
from tileseg.testing.dicom import phantom_hu, phantom_labels  # noqa: E402
from tileseg.testing.synthetic import dice  # noqa: E402

#: Classes of the model, and the phantom label each one stands for (see PHANTOM_TISSUES).
CLASSES = ("background", "bone", "soft_tissue")
FROM_PHANTOM = np.array([0, 0, 1, 2], dtype=np.int64)  # air, water -> background; bone; soft tissue
WINDOW = {"center": 40.0, "width": 200.0}
SHAPES = ((48, 64, 64), (64, 96, 80), (40, 80, 96))
CROP, BATCH, ITERS, FOCUS = 16, 4, 200, 0.5


def volume(shape: tuple[int, int, int], noise_hu: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The windowed phantom (float32 in [0, 1]) and its class labels."""
    hu = phantom_hu(shape) + np.random.default_rng(seed).normal(0.0, noise_hu, shape)
    return ct_window(hu[None], **WINDOW).compute()[0], FROM_PHANTOM[phantom_labels(shape)]


def main(argv: list[str] | None = None) -> int:
    args = trainer_args(argv, __doc__, ROOT / "examples" / "models" / "ct_unet3d.pt", ITERS, 3)
    t0 = time.perf_counter()
    pairs = [volume(s, 10.0, args.seed * 10 + i) for i, s in enumerate(SHAPES)]
    model = UNet(1, len(CLASSES), spatial_dims=3, depth=2, base_features=4, norm="batch")
    fit(model, [p[0] for p in pairs], [p[1] for p in pairs], crop=CROP, batch=BATCH, iters=args.iters,
        seed=args.seed, tag="CT", focus=FOCUS)
    train_s = time.perf_counter() - t0
    val_img, val_lab = volume((56, 72, 88), 0.0, 0)
    with torch.inference_mode():
        pred = model(torch.from_numpy(val_img)[None, None]).argmax(1)[0].numpy()
    scores = {name: dice(pred == k, val_lab == k) for k, name in enumerate(CLASSES) if k}
    save_torchscript(model, args.out, val_img[:32, :32, :32])
    print(f"CT U-Net: {sum(p.numel() for p in model.parameters())} parameters, {args.iters} iterations in "
          f"{train_s:.1f} s, validation Dice " + ", ".join(f"{n} {v:.4f}" for n, v in scores.items())
          + f", saved {args.out} ({args.out.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
