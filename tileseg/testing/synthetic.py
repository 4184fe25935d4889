"""Synthetic images with ground truth: bright blobs in noise, 2D and 3D, any size.

A scene is defined analytically by a seed: random ellipses (2D) or ellipsoids
(3D) with positions, semi-axes, orientations and contrasts, on a dark
background with a smooth linear intensity gradient across the image, plus
Gaussian noise. Any region can be rendered on its own (:func:`render`), so
:func:`write_blobs_zarr` writes a store chunk by chunk with memory bounded by
one chunk per thread, whatever the image size.

Reproducibility: the noise is drawn on a fixed grid of ``noise_tile`` pixels
per axis, each tile from its own generator seeded by ``(seed, tile
position)``; blobs and background are pure functions of the global pixel
coordinates. So the pixels depend only on ``(shape, seed, parameters)``, never
on the chunking or the order of rendering: a region rendered alone equals the
same region of the whole image.

The background spans ``background`` (low to high across the image) and each
blob adds ``contrast`` over it, so a global threshold on the raw image is
imperfect (noise, dim blobs on the bright side) while local context separates
blobs from background.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["BlobScene", "make_scene", "render", "blobs_2d", "blobs_3d", "write_blobs_zarr", "dice"]

MAX_BLOBS = 5_000_000


@dataclass(frozen=True)
class BlobScene:
    """Parameters of a synthetic scene (see :func:`make_scene`)."""

    shape: tuple[int, ...]
    seed: int
    centers: np.ndarray = field(repr=False)       # (n, ndim) float, pixel coordinates
    semi_axes: np.ndarray = field(repr=False)     # (n, ndim) float, pixels
    rotations: np.ndarray = field(repr=False)     # (n, ndim, ndim) orthonormal
    contrasts: np.ndarray = field(repr=False)     # (n,)
    direction: np.ndarray = field(repr=False)     # (ndim,) unit vector of the background gradient
    background: tuple[float, float] = (0.1, 0.4)
    noise: float = 0.08
    noise_tile: int = 128

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def n_blobs(self) -> int:
        return len(self.centers)

    def bbox_radius(self) -> np.ndarray:
        """(n,) radius of a sphere enclosing each blob."""
        return self.semi_axes.max(axis=1) if len(self.semi_axes) else np.zeros(0)


def _random_rotation(rng: np.random.Generator, n: int, ndim: int) -> np.ndarray:
    if ndim == 2:
        a = rng.uniform(0, np.pi, n)
        c, s = np.cos(a), np.sin(a)
        return np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)
    q, r = np.linalg.qr(rng.normal(size=(n, ndim, ndim)))
    return q * np.sign(np.diagonal(r, axis1=1, axis2=2))[:, None, :]


def make_scene(shape: Sequence[int], seed: int = 0, *, radius: tuple[float, float] | None = None,
               coverage: float = 0.12, contrast: tuple[float, float] = (0.25, 0.5),
               background: tuple[float, float] = (0.1, 0.4), noise: float = 0.08,
               noise_tile: int | None = None) -> BlobScene:
    """Draw the blobs of a scene.

    Parameters
    ----------
    shape : sequence of int
        2D ``(Y, X)`` or 3D ``(Z, Y, X)``.
    seed : int
        Everything follows from it.
    radius : (float, float)
        Range of the largest semi-axis in pixels (log-uniform); default
        ``(4, 30)`` in 2D, ``(3, 12)`` in 3D. The other semi-axes are 0.6-1x it.
    coverage : float
        Expected fraction of the image covered by blobs (before overlaps).
    contrast : (float, float)
        Range of blob brightness above the local background (image in [0, 1]).
    background : (float, float)
        Background level at the dark and the bright end of the gradient.
    noise : float
        Standard deviation of the Gaussian noise.
    noise_tile : int
        Edge of the noise grid tiles; default 128 (2D) or 32 (3D).

    Returns
    -------
    BlobScene
    """
    shape = tuple(int(s) for s in shape)
    ndim = len(shape)
    if ndim not in (2, 3) or min(shape) < 1:
        raise ValueError(f"shape must be 2D or 3D with positive sizes, got {shape!r}")
    radius = radius or ((4.0, 30.0) if ndim == 2 else (3.0, 12.0))
    noise_tile = noise_tile or (128 if ndim == 2 else 32)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5EED]))
    r0, r1 = np.log(radius[0]), np.log(radius[1])
    # mean of r**ndim for log-uniform r, times the mean of the other axes' factor (0.8)
    mean_pow = (np.exp(ndim * r1) - np.exp(ndim * r0)) / (ndim * (r1 - r0)) if r1 > r0 else np.exp(ndim * r0)
    unit = np.pi if ndim == 2 else 4.0 / 3.0 * np.pi
    mean_volume = unit * mean_pow * 0.8 ** (ndim - 1)
    n = rng.poisson(coverage * math.prod(shape) / mean_volume)
    if n > MAX_BLOBS:
        raise ValueError(f"{n} blobs requested (> {MAX_BLOBS}); lower coverage or shape")
    big = np.exp(rng.uniform(r0, r1, n))
    semi = np.empty((n, ndim))
    semi[:, 0] = big
    semi[:, 1:] = big[:, None] * rng.uniform(0.6, 1.0, (n, ndim - 1))
    centers = rng.uniform(0, 1, (n, ndim)) * np.asarray(shape, dtype=float)
    rotations = _random_rotation(rng, n, ndim)
    contrasts = rng.uniform(contrast[0], contrast[1], n)
    direction = rng.normal(size=ndim)
    direction /= np.linalg.norm(direction)
    return BlobScene(shape, int(seed), centers, semi, rotations, contrasts, direction,
                     (float(background[0]), float(background[1])), float(noise), int(noise_tile))


def _region(scene: BlobScene, region: Sequence[slice] | None) -> tuple[slice, ...]:
    if region is None:
        return tuple(slice(0, s) for s in scene.shape)
    out = []
    for sl, size in zip(region, scene.shape):
        start, stop, step = sl.indices(size)
        if step != 1:
            raise ValueError("render: region slices must have step 1")
        out.append(slice(start, stop))
    return tuple(out)


def _coords(region: tuple[slice, ...]) -> list[np.ndarray]:
    ndim = len(region)
    return [np.arange(sl.start, sl.stop, dtype=np.float64).reshape([-1 if j == i else 1 for j in range(ndim)])
            for i, sl in enumerate(region)]


def _noise(scene: BlobScene, region: tuple[slice, ...]) -> np.ndarray:
    t = scene.noise_tile
    out = np.empty(tuple(sl.stop - sl.start for sl in region), dtype=np.float32)
    ranges = [range(sl.start // t, (sl.stop - 1) // t + 1) for sl in region]
    for tile in np.ndindex(*[len(r) for r in ranges]):
        tidx = tuple(r[i] for r, i in zip(ranges, tile))
        rng = np.random.default_rng(np.random.SeedSequence([scene.seed, 0x401CE, *tidx]))
        block = rng.standard_normal((t,) * scene.ndim, dtype=np.float32)
        src, dst = [], []
        for sl, ti in zip(region, tidx):
            lo, hi = max(sl.start, ti * t), min(sl.stop, (ti + 1) * t)
            src.append(slice(lo - ti * t, hi - ti * t))
            dst.append(slice(lo - sl.start, hi - sl.start))
        out[tuple(dst)] = block[tuple(src)]
    return out * np.float32(scene.noise)


def render(scene: BlobScene, region: Sequence[slice] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Render a region of a scene.

    Parameters
    ----------
    scene : BlobScene
    region : sequence of slice, optional
        Region in global pixel coordinates (step 1); default the whole image.

    Returns
    -------
    image : numpy.ndarray
        float32, noise included, clipped to [0, 1].
    instances : numpy.ndarray
        uint32 object ids (0 = background; where blobs overlap the later one wins).
    """
    region = _region(scene, region)
    ndim = scene.ndim
    shape = tuple(sl.stop - sl.start for sl in region)
    coords = _coords(region)
    u = sum(((c + 0.5) / s - 0.5) * d for c, s, d in zip(coords, scene.shape, scene.direction))
    span = 0.5 * np.abs(scene.direction).sum()
    lo, hi = scene.background
    bg = (lo + (hi - lo) * (u / span + 1.0) / 2.0) * np.ones(shape)
    blobs = np.zeros(shape, dtype=np.float64)
    inst = np.zeros(shape, dtype=np.uint32)
    start = np.array([sl.start for sl in region], dtype=float)
    stop = np.array([sl.stop for sl in region], dtype=float)
    rad = scene.bbox_radius()
    hit = np.all((scene.centers + rad[:, None] >= start) & (scene.centers - rad[:, None] < stop), axis=1)
    for k in np.flatnonzero(hit):
        c, r = scene.centers[k], rad[k]
        box = tuple(slice(int(max(a, np.floor(ci - r))) - int(a), int(min(b, np.ceil(ci + r) + 1)) - int(a))
                    for ci, a, b in zip(c, start, stop))
        if any(b.stop <= b.start for b in box):
            continue
        # coords[i] varies along axis i only; cut it to the box along that axis
        local = [co[tuple(box[i] if j == i else slice(None) for j in range(ndim))] - c[i]
                 for i, co in enumerate(coords)]
        # rotate into the blob frame: q_j = sum_i R[i, j] * x_i, scaled by the semi-axes
        d2 = 0.0
        for j in range(ndim):
            q = sum(scene.rotations[k][i, j] * local[i] for i in range(ndim))
            d2 = d2 + (q / scene.semi_axes[k, j]) ** 2
        inside = np.broadcast_to(d2 <= 1.0, tuple(b.stop - b.start for b in box))
        value = np.where(inside, scene.contrasts[k] * (1.0 - 0.3 * d2), 0.0)
        np.maximum(blobs[box], value, out=blobs[box])
        inst[box][inside] = k + 1
    image = (bg + blobs).astype(np.float32) + _noise(scene, region)
    np.clip(image, 0.0, 1.0, out=image)
    return image, inst


def _quantise(image: np.ndarray, dtype: Any) -> np.ndarray:
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return image.astype(dtype)
    scale = np.iinfo(dtype).max
    return np.rint(image * scale).astype(dtype)


def _blobs(shape: Sequence[int], seed: int, dtype: Any, instances: bool, **kwargs: Any):
    scene = make_scene(shape, seed, **kwargs)
    image, inst = render(scene)
    labels = inst if instances else (inst > 0).astype(np.uint8)
    return _quantise(image, dtype), labels


def blobs_2d(shape: Sequence[int] = (512, 512), seed: int = 0, *, dtype: Any = np.uint8,
             instances: bool = False, **kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
    """A 2D blob image and its ground truth, in memory.

    Parameters
    ----------
    shape : (int, int)
    seed : int
    dtype : numpy dtype
        ``uint8``/``uint16`` (scaled to the full range) or a float dtype ([0, 1]).
    instances : bool
        Return object ids (uint32) instead of the binary foreground mask (uint8 0/1).
    **kwargs
        Passed to :func:`make_scene` (radius, coverage, contrast, background, noise).

    Examples
    --------
    >>> img, lab = blobs_2d((64, 96), seed=1)
    >>> img.shape, img.dtype, lab.dtype, set(np.unique(lab)) <= {0, 1}
    ((64, 96), dtype('uint8'), dtype('uint8'), True)
    """
    if len(shape) != 2:
        raise ValueError(f"blobs_2d needs a 2D shape, got {tuple(shape)!r}")
    return _blobs(shape, seed, dtype, instances, **kwargs)


def blobs_3d(shape: Sequence[int] = (64, 64, 64), seed: int = 0, *, dtype: Any = np.uint8,
             instances: bool = False, **kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
    """A 3D blob volume and its ground truth, in memory (see :func:`blobs_2d`)."""
    if len(shape) != 3:
        raise ValueError(f"blobs_3d needs a 3D shape, got {tuple(shape)!r}")
    return _blobs(shape, seed, dtype, instances, **kwargs)


def write_blobs_zarr(path: Any, shape: Sequence[int], chunks: Sequence[int], seed: int = 0,
                     ndim: int | None = None, *, dtype: Any = np.uint8, instances: bool = True,
                     workers: int = 2, overwrite: bool = False, **kwargs: Any):
    """Write a blob scene into a zarr v3 group, chunk by chunk.

    The group holds ``image`` (``dtype``), ``labels`` (uint8 0/1 foreground)
    and, if ``instances``, ``instances`` (uint32 object ids), all with the same
    chunks and ``dimension_names`` ``("y", "x")`` / ``("z", "y", "x")``; the
    group attributes record the generator parameters under ``"tileseg_synthetic"``.
    Each chunk is rendered and written whole by one thread, so memory stays
    at about one chunk per worker thread.

    Parameters
    ----------
    path : str or Path
        Store location (a directory).
    shape, chunks : sequence of int
    seed : int
    ndim : int, optional
        Checked against ``len(shape)`` when given.
    dtype : numpy dtype
        Image dtype (``uint8``, ``uint16`` or float).
    instances : bool
        Also write the object ids.
    workers : int
        Threads rendering chunks.
    overwrite : bool
        Replace an existing store.
    **kwargs
        Passed to :func:`make_scene`.

    Returns
    -------
    zarr.Group
    """
    import zarr

    shape = tuple(int(s) for s in shape)
    chunks = tuple(int(c) for c in chunks)
    if ndim is not None and ndim != len(shape):
        raise ValueError(f"ndim={ndim!r} does not match shape {shape!r}")
    if len(chunks) != len(shape):
        raise ValueError(f"chunks {chunks!r} must have one entry per axis of {shape!r}")
    scene = make_scene(shape, seed, **kwargs)
    dims = ("y", "x") if len(shape) == 2 else ("z", "y", "x")
    group = zarr.open_group(str(path), mode="w" if overwrite else "w-", zarr_format=3)
    params = {"shape": list(shape), "seed": int(seed), "dtype": np.dtype(dtype).name, "n_blobs": scene.n_blobs,
              "background": list(scene.background), "noise": scene.noise, "noise_tile": scene.noise_tile,
              **{k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items()}}
    group.attrs["tileseg_synthetic"] = params
    kw = {"shape": shape, "chunks": chunks, "dimension_names": dims}
    image = group.create_array("image", dtype=np.dtype(dtype), **kw)
    labels = group.create_array("labels", dtype=np.uint8, **kw)
    inst_arr = group.create_array("instances", dtype=np.uint32, **kw) if instances else None

    def one(index: tuple[int, ...]) -> None:
        region = tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(index, chunks, shape))
        img, inst = render(scene, region)
        image[region] = _quantise(img, dtype)
        labels[region] = (inst > 0).astype(np.uint8)
        if inst_arr is not None:
            inst_arr[region] = inst

    grid = [math.ceil(s / c) for s, c in zip(shape, chunks)]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        list(pool.map(one, np.ndindex(*grid)))
    return group


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice coefficient of two binary masks (1.0 when both are empty)."""
    p, t = np.asarray(pred) > 0, np.asarray(truth) > 0
    denom = p.sum() + t.sum()
    return 1.0 if denom == 0 else float(2.0 * np.logical_and(p, t).sum() / denom)
