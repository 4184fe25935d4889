"""Small generated inputs and models shared by tests/test_run.py and tests/test_cli.py."""

from __future__ import annotations

import math
import textwrap
import warnings
from pathlib import Path

import numpy as np


def write_scene(path: Path, shape=(70, 90), seed: int = 0, values=(0.1, 0.9), flip: int = 25,
                chunks=(32, 32)) -> tuple[np.ndarray, np.ndarray]:
    """A zarr group with ``image`` (random pixels from ``values``) and ``labels``.

    ``labels`` is ``image > 0.5`` with ``flip`` pixels flipped, so Dice against
    it is below 1 and known exactly. Returns ``(image, labels)``.
    """
    import zarr

    rng = np.random.default_rng(seed)
    image = np.asarray(values, dtype=np.float32)[rng.integers(0, len(values), size=shape)]
    labels = (image > 0.5).astype(np.uint8)
    flat = labels.reshape(-1)
    idx = rng.choice(flat.size, size=flip, replace=False)
    flat[idx] = 1 - flat[idx]
    group = zarr.open_group(str(path), mode="w")
    group.create_array("image", shape=shape, chunks=chunks[: len(shape)], dtype="float32")[:] = image
    group.create_array("labels", shape=shape, chunks=chunks[: len(shape)], dtype="uint8")[:] = labels
    return image, labels


def save_pointwise_model(path: Path, ndim: int = 2, classes: int = 2) -> Path:
    """A 1x1 convolution saved as TorchScript.

    Two classes: logits ``(0, x - 0.5)`` so argmax is ``x > 0.5``. One class:
    logit ``10 x - 5`` so the sigmoid is above ``p`` where ``x > 0.5 + logit(p) / 10``.
    """
    import torch

    conv_cls = torch.nn.Conv2d if ndim == 2 else torch.nn.Conv3d
    conv = conv_cls(1, classes, 1)
    with torch.no_grad():
        if classes == 2:
            conv.weight.copy_(torch.tensor([0.0, 1.0]).reshape((2, 1) + (1,) * ndim))
            conv.bias.copy_(torch.tensor([0.0, -0.5]))
        else:
            conv.weight.fill_(10.0)
            conv.bias.fill_(-5.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(conv), str(path))
    return path


def n_patches(shape, patch, overlap) -> int:
    """Number of windows of MONAI's grid, computed here independently of tileseg."""
    total = 1
    for size, p in zip(shape, patch):
        stride = max(1, int(p * (1 - overlap)))
        total *= 1 if size <= p else math.ceil((size - p) / stride) + 1
    return total


def dice_numpy(pred: np.ndarray, ref: np.ndarray, c: int) -> float:
    a, b = pred == c, ref == c
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def write_pipeline(path: Path, inputs, *, patch=(32, 32), overlap=0.25, chunks=(40, 40), post="[argmax]",
                   model="model.pt", extra: str = "", output='"out/{stem}_seg.zarr"') -> Path:
    inputs = f'"{inputs}"' if isinstance(inputs, str) else "[" + ", ".join(f'"{i}"' for i in inputs) + "]"
    path.write_text(textwrap.dedent(f"""\
        version: 1
        input: {{path: {inputs}, array: image}}
        tiling: {{patch_size: {list(patch)}, overlap: {overlap}, chunks: {list(chunks)}}}
        model: {{torchscript: {model}, batch_size: 4, classes: [background, object]}}
        postprocess: {post}
        output: {{path: {output}}}
        execution: {{scheduler: threads, workers: 2}}
        evaluate: {{reference: {{array: labels}}}}
        """) + extra)
    return path
