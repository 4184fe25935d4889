"""Pixel clustering on chunked images: k-means and a Gaussian mixture.

The model is fitted once, on a reproducible random sample of pixels drawn
across the whole image, then applied chunk by chunk, so a class means the
same thing in every chunk.

Sampling: ``sample_size`` pixel positions are drawn without replacement from
the whole image's flat index range with ``numpy.random.default_rng(seed)``;
each chunk then reads the sampled pixels that fall inside it (so each chunk
contributes in proportion to its size, in expectation), and the sample is put
back in raster order. The sample therefore depends only on the image shape,
``sample_size`` and ``seed``, never on the chunking; pixels excluded by
``mask``/``nodata``/NaN are dropped from it.

Prediction is elementwise numpy (no BLAS), so every pixel's class is the same
whatever the chunking. Classes are ``0 .. n_clusters - 1`` ordered by the
cluster mean of the first feature (band), then the next ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError, InputError, require


@dataclass(frozen=True)
class ClusterModel:
    """A fitted pixel-clustering model.

    Attributes
    ----------
    kind : str
        ``"kmeans"`` or ``"gmm"``.
    means : numpy.ndarray
        ``(K, F)`` cluster centres, sorted (class ``i`` is row ``i``).
    precisions_cholesky : numpy.ndarray or None
        ``(K, F, F)`` for ``gmm`` (full covariances).
    log_weights : numpy.ndarray or None
        ``(K,)`` for ``gmm``.
    """

    kind: str
    means: np.ndarray
    precisions_cholesky: np.ndarray | None = None
    log_weights: np.ndarray | None = None

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Classes of ``features`` ``(F, *spatial)`` -> ``(*spatial)``, chunk-independent."""
        feats = [np.asarray(features[f], dtype=np.float64) for f in range(features.shape[0])]
        k = self.means.shape[0]
        best = None
        best_score = None
        for c in range(k):
            if self.kind == "kmeans":
                score = np.zeros(feats[0].shape, dtype=np.float64)
                for f, x in enumerate(feats):
                    score -= (x - self.means[c, f]) ** 2
            else:
                pc = self.precisions_cholesky[c]
                nf = len(feats)
                score = np.full(
                    feats[0].shape, self.log_weights[c] + np.log(np.diag(pc)).sum(), dtype=np.float64
                )
                for j in range(nf):  # y_j = sum_f (x_f - mu_f) * pc[f, j]
                    y = np.zeros(feats[0].shape, dtype=np.float64)
                    for f in range(nf):
                        if pc[f, j] != 0:
                            y += (feats[f] - self.means[c, f]) * pc[f, j]
                    score -= 0.5 * y * y
            if best is None:
                best = np.zeros(score.shape, dtype=np.uint8 if k < 256 else np.uint16)
                best_score = score
            else:
                better = score > best_score  # ties keep the lower class
                best[better] = c
                best_score = np.where(better, score, best_score)
        return best


def _features(data: Any, has_channels: bool) -> Any:
    import dask.array as da

    data = da.asarray(data)
    return data if has_channels else data[None]


def _sample_block(block: np.ndarray, mask: np.ndarray | None, coords: np.ndarray, nodata: Any):
    """Values ``(n, F)`` at local ``coords`` ``(n, ndim)`` and which are valid."""
    idx = (slice(None),) + tuple(coords.T)
    vals = np.asarray(block)[idx].T.astype(np.float64)
    ok = np.all(np.isfinite(vals), axis=1)
    if nodata is not None:
        ok &= ~np.all(vals == nodata, axis=1)
    if mask is not None:
        ok &= np.asarray(mask, dtype=bool)[tuple(coords.T)]
    return vals, ok


def draw_sample(
    features: Any, *, sample_size: int = 100_000, seed: int = 0, mask: Any = None, nodata: Any = None
) -> np.ndarray:
    """A chunking-independent random sample of pixel feature vectors.

    Parameters
    ----------
    features : dask.array.Array
        ``(F, *spatial)``; the channel axis must be one chunk.
    sample_size : int
        Number of positions drawn (fewer remain after excluding invalid pixels).
    seed : int
        Seed of ``numpy.random.default_rng``.
    mask, nodata
        Exclude pixels outside ``mask`` or whose every band equals ``nodata``.

    Returns
    -------
    numpy.ndarray
        ``(n, F)`` float64 samples in raster order.
    """
    import dask
    import dask.array as da
    from dask import delayed

    features = da.asarray(features)
    features = features.rechunk({0: -1})
    spatial = features.shape[1:]
    total = int(np.prod(spatial))
    if total == 0:
        raise InputError("cannot cluster an empty image")
    n = min(int(sample_size), total)
    if n < 1:
        raise ConfigError(f"sample_size must be >= 1, got {sample_size!r}")
    flat = np.sort(np.random.default_rng(int(seed)).choice(total, size=n, replace=False))
    coords = np.stack(np.unravel_index(flat, spatial), axis=1)
    schunks = features.chunks[1:]
    bounds = [np.cumsum((0,) + c) for c in schunks]
    bidx = np.stack(
        [np.searchsorted(b, coords[:, k], side="right") - 1 for k, b in enumerate(bounds)], axis=1
    )
    grid = tuple(len(c) for c in schunks)
    block_id = np.ravel_multi_index(tuple(bidx.T), grid)
    fblocks = features.to_delayed()
    mblocks = None
    if mask is not None:
        m = da.asarray(mask).astype(bool)
        if m.shape != spatial:
            raise InputError(f"mask shape {m.shape!r} does not match image shape {spatial!r}")
        mblocks = m.rechunk(schunks).to_delayed()
    parts, orders = [], []
    for b in np.unique(block_id):
        sel = np.flatnonzero(block_id == b)
        bi = np.unravel_index(b, grid)
        local = coords[sel] - np.array([bounds[k][bi[k]] for k in range(len(grid))])
        mb = None if mblocks is None else mblocks[tuple(bi)]
        parts.append(delayed(_sample_block)(fblocks[(0,) + tuple(bi)], mb, local, nodata))
        orders.append(sel)
    results = dask.compute(parts)[0]
    vals = np.empty((n, features.shape[0]), dtype=np.float64)
    ok = np.empty(n, dtype=bool)
    for sel, (v, k) in zip(orders, results):
        vals[sel] = v
        ok[sel] = k
    out = vals[ok]
    if out.shape[0] == 0:
        raise InputError("no valid pixel in the clustering sample (all masked, nodata or NaN)")
    return out


def _order(means: np.ndarray) -> np.ndarray:
    return np.lexsort(tuple(means[:, f] for f in range(means.shape[1] - 1, -1, -1)))


def fit(
    features: Any,
    n_clusters: int = 3,
    *,
    kind: str = "kmeans",
    sample_size: int = 100_000,
    seed: int = 0,
    mask: Any = None,
    nodata: Any = None,
    n_init: int = 4,
    max_iter: int = 300,
) -> ClusterModel:
    """Fit k-means or a Gaussian mixture (full covariances) on a whole-image sample.

    Parameters
    ----------
    features : dask.array.Array
        ``(F, *spatial)`` pixel features (bands).
    n_clusters : int
        Number of classes.
    kind : {"kmeans", "gmm"}
        The model (scikit-learn ``KMeans`` / ``GaussianMixture``, seeded).
    sample_size, seed, mask, nodata
        See :func:`draw_sample`.
    n_init, max_iter
        Passed to scikit-learn.

    Returns
    -------
    ClusterModel
    """
    if int(n_clusters) < 1 or int(n_clusters) > 65535:
        raise ConfigError(f"n_clusters must be between 1 and 65535, got {n_clusters!r}")
    if kind not in ("kmeans", "gmm"):
        raise ConfigError(f"clustering kind must be 'kmeans' or 'gmm', got {kind!r}")
    require("sklearn", "classical")
    sample = draw_sample(features, sample_size=sample_size, seed=seed, mask=mask, nodata=nodata)
    if sample.shape[0] < n_clusters:
        raise InputError(f"only {sample.shape[0]} valid sampled pixels for {n_clusters} clusters")
    if kind == "kmeans":
        from sklearn.cluster import KMeans

        km = KMeans(
            n_clusters=int(n_clusters), n_init=int(n_init), max_iter=int(max_iter), random_state=int(seed)
        )
        km.fit(sample)
        means = km.cluster_centers_
        order = _order(means)
        return ClusterModel(kind="kmeans", means=means[order])
    if kind == "gmm":
        from sklearn.mixture import GaussianMixture

        gm = GaussianMixture(
            n_components=int(n_clusters),
            covariance_type="full",
            n_init=int(n_init),
            max_iter=int(max_iter),
            random_state=int(seed),
        )
        gm.fit(sample)
        order = _order(gm.means_)
        return ClusterModel(
            kind="gmm",
            means=gm.means_[order],
            precisions_cholesky=gm.precisions_cholesky_[order],
            log_weights=np.log(gm.weights_[order]),
        )
    raise ConfigError(f"clustering kind must be 'kmeans' or 'gmm', got {kind!r}")


def predict(model: ClusterModel, features: Any) -> Any:
    """Classes of every pixel, chunk by chunk: ``(F, *spatial)`` -> ``(*spatial)`` uint8/uint16."""
    import dask.array as da

    features = da.asarray(features).rechunk({0: -1})
    dtype = np.uint8 if model.means.shape[0] < 256 else np.uint16
    return features.map_blocks(
        model.predict, drop_axis=0, dtype=dtype, meta=np.empty((0,) * (features.ndim - 1), dtype)
    )


def _cluster(kind: str, data: Any, spacing: Any, n_clusters: int, **kw: Any) -> Any:
    from ._input import unwrap

    inp = unwrap(data, spacing)
    feats = inp.bands()
    if kw.get("mask") is None:
        kw["mask"] = inp.mask
    if kw.get("nodata") is None:
        kw["nodata"] = inp.nodata
    return predict(fit(feats, n_clusters, kind=kind, **kw), feats)


def kmeans(
    image: Any,
    *,
    spacing: Any = None,
    n_clusters: int = 3,
    sample_size: int = 100_000,
    seed: int = 0,
    mask: Any = None,
    nodata: Any = None,
) -> Any:
    """Pipeline method: k-means classes ``0 .. n_clusters-1`` on the bands (ordered by mean of band 0).

    Examples
    --------
    >>> import dask.array as da, numpy as np
    >>> img = da.from_array(np.repeat([0, 100, 200], 50).reshape(10, 15).astype("uint8"), chunks=4)
    >>> np.unique(kmeans(img, n_clusters=3).compute()).tolist()
    [0, 1, 2]
    """
    return _cluster(
        "kmeans", image, spacing, n_clusters, sample_size=sample_size, seed=seed, mask=mask, nodata=nodata
    )


def gmm(
    image: Any,
    *,
    spacing: Any = None,
    n_clusters: int = 3,
    sample_size: int = 100_000,
    seed: int = 0,
    mask: Any = None,
    nodata: Any = None,
) -> Any:
    """Pipeline method: Gaussian-mixture classes (full covariances), ordered like :func:`kmeans`."""
    return _cluster(
        "gmm", image, spacing, n_clusters, sample_size=sample_size, seed=seed, mask=mask, nodata=nodata
    )
