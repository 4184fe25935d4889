"""Generated inputs, models and independent oracles shared by tests/test_run.py and tests/test_cli.py.

Scenes are structured (a smooth background gradient, blobs and noise from
:mod:`tileseg.testing.synthetic`), and the model looks at neighbourhoods (two
3x3 convolutions, zero-padded at every patch border), so each output pixel
depends on its position and on which patches cover it: a stitching error
(wrong blending weight, a missing or misplaced patch) changes written values.

The oracles never use tileseg: MONAI's ``sliding_window_inference`` with the
same patch, overlap and Gaussian blending (tileseg's grid and window equal
MONAI's), or one forward pass over the whole image (what ``blend: crop``
gives when the receptive-field radius, 2 here, is <= the overlap / 2).
"""

from __future__ import annotations

import math
import textwrap
import warnings
from pathlib import Path

import numpy as np

#: receptive-field radius of :func:`make_conv_model` (two 3x3 convolutions)
RADIUS = 2


def write_scene(path: Path, shape=(70, 90), seed: int = 0, chunks=(32, 32)) -> tuple[np.ndarray, np.ndarray]:
    """A zarr group with ``image`` (float32 blobs on a gradient, with noise) and ``labels`` (the blobs).

    Returns ``(image, labels)``.
    """
    import zarr

    from tileseg.testing import blobs_2d, blobs_3d

    if len(shape) == 2:
        image, labels = blobs_2d(shape, seed, dtype=np.float32, radius=(3.0, 10.0), coverage=0.25)
    else:
        image, labels = blobs_3d(shape, seed, dtype=np.float32, radius=(2.0, 5.0), coverage=0.25)
    group = zarr.open_group(str(path), mode="w")
    group.create_array("image", shape=shape, chunks=chunks[: len(shape)], dtype="float32")[:] = image
    group.create_array("labels", shape=shape, chunks=chunks[: len(shape)], dtype="uint8")[:] = labels
    return image, labels


def make_conv_model(ndim: int = 2, classes: int = 2):
    """Two 3x3 convolutions (zero padding) with a tanh between them, fixed weights.

    Hidden channels: ``8 (mean3(x) - 0.45)`` and ``4 (x - mean3(x))``; the
    logits mix a 3x3 mean of the first with the centre of the second, so
    both classes' logits vary with the neighbourhood and the patch borders.
    """
    import torch

    conv = torch.nn.Conv2d if ndim == 2 else torch.nn.Conv3d
    first, second = conv(1, 2, 3, padding=1), conv(2, classes, 3, padding=1)
    n = 3**ndim
    centre = (1,) * ndim
    with torch.no_grad():
        for layer in (first, second):
            layer.weight.zero_()
            layer.bias.zero_()
        first.weight[0].fill_(8.0 / n)
        first.bias[0] = -8.0 * 0.45
        first.weight[1].fill_(-4.0 / n)
        first.weight[(1, 0) + centre] += 4.0
        if classes == 2:
            second.weight[(0, 1) + centre] = -0.5
            second.bias[0] = 0.3
        second.weight[-1, 0].fill_(2.0 / n)
        second.weight[(classes - 1, 1) + centre] = 0.5
        if classes == 1:
            second.bias[0] = 0.5
    return torch.nn.Sequential(first, torch.nn.Tanh(), second).eval()


def save_conv_model(path: Path, ndim: int = 2, classes: int = 2) -> Path:
    """:func:`make_conv_model` saved as TorchScript."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(make_conv_model(ndim, classes)), str(path))
    return path


def monai_logits(image: np.ndarray, patch, overlap: float, classes: int = 2, batch_size: int = 3) -> np.ndarray:
    """``(K, *shape)`` logits of MONAI's sliding window with Gaussian blending (the image covers the patch)."""
    import pytest
    import torch

    inferers = pytest.importorskip("monai.inferers")
    assert all(s >= p for s, p in zip(image.shape, patch)), "keep images >= the patch: no padding to match"
    net = make_conv_model(image.ndim, classes)
    with torch.inference_mode():
        out = inferers.sliding_window_inference(torch.from_numpy(image[None, None]), tuple(patch), batch_size, net,
                                                overlap=overlap, mode="gaussian")
    return out[0].numpy()


def whole_image_logits(image: np.ndarray, classes: int = 2) -> np.ndarray:
    """``(K, *shape)`` logits of one forward pass over the whole image."""
    import torch

    with torch.inference_mode():
        return make_conv_model(image.ndim, classes)(torch.from_numpy(image[None, None]))[0].numpy()


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=0, keepdims=True))
    return e / e.sum(axis=0, keepdims=True)


def argmax_labels(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Oracle labels of ``(K, ...)`` logits and their margin (top logit minus the runner-up)."""
    top = np.sort(logits, axis=0)
    return logits.argmax(axis=0), top[-1] - top[-2]


def threshold_labels(logit: np.ndarray, p: float) -> tuple[np.ndarray, np.ndarray]:
    """Oracle ``sigmoid(logit) > p`` and its margin in logit units."""
    cut = math.log(p / (1 - p))
    return (logit > cut).astype(np.uint8), np.abs(logit - cut)


def assert_labels_match(got: np.ndarray, want: np.ndarray, margin: np.ndarray, tie: float = 1e-4) -> None:
    """``got == want`` except where the oracle is within ``tie`` of its decision boundary (float near-ties)."""
    assert got.shape == want.shape
    near_tie = margin < tie
    bad = (got != want) & ~near_tie
    assert not bad.any(), f"{bad.sum()} pixels differ from the oracle, the first at {np.argwhere(bad)[0].tolist()}"
    assert near_tie.mean() < 1e-3
    # a segmentation worth comparing: foreground covers a fair part of the image, not nothing or everything
    assert 0.03 < (want > 0).mean() < 0.97


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


def write_pipeline(path: Path, inputs, *, patch=(24, 24), overlap=0.25, chunks=(40, 40), post="[]",
                   model="model.pt", extra: str = "", output='"out/{stem}_seg.zarr"', engine="labels") -> Path:
    inputs = f'"{inputs}"' if isinstance(inputs, str) else "[" + ", ".join(f'"{i}"' for i in inputs) + "]"
    path.write_text(textwrap.dedent(f"""\
        version: 1
        input: {{path: {inputs}, array: image}}
        tiling: {{patch_size: {list(patch)}, overlap: {overlap}, chunks: {list(chunks)}}}
        model: {{torchscript: {{path: {model}}}, output: {engine}, batch_size: 4, classes: [background, object]}}
        postprocess: {post}
        output: {{path: {output}}}
        execution: {{scheduler: threads, workers: 2}}
        evaluate: {{reference: {{array: labels}}}}
        """) + extra)
    return path
