"""The dry forward at start-up: one patch through the model before any tile is computed.

It checks, with errors that say what to change, that the model takes the
pipeline's input channels and patch size (fixed-size models, output stride
divisibility, layout) and that its output classes match the pipeline's
class names; it also fixes the predictor's ``out_channels`` to what the model
really returns. The result is remembered per predictor and input signature,
so a run of many items pays for it once. On a Dask cluster
(:func:`dry_run_on`) it runs as one task on a worker that offers the
inference resources, where the model runs anyway, never in the client.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import ModelError

log = logging.getLogger(__name__)

__all__ = ["dry_run", "dry_run_on", "check_patch_size"]

_LOCK = threading.Lock()


def check_patch_size(predictor: Any, patch_size: Sequence[int]) -> None:
    """Refuse a patch size a fixed-size model (its conventions' ``patch_size``) does not take.

    Raises
    ------
    ModelError
        Naming both sizes and the setting to change.
    """
    fixed = getattr(getattr(predictor, "conventions", None), "patch_size", None)
    patch = [int(p) for p in patch_size]
    if fixed is not None and list(fixed) != patch:
        raise ModelError(f"model takes only patches of size {list(fixed)}, the pipeline uses {patch}: "
                         f"set tiling.patch_size: {list(fixed)}")


def dry_run(predictor: Any, n_channels: int, patch_size: Sequence[int], *, class_names: Sequence[str] | None = None,
            source: str = "image") -> int:
    """Run one zero patch ``(1, n_channels, *patch_size)`` through ``predictor``; return K.

    Parameters
    ----------
    predictor : Predictor or callable
        The model.
    n_channels : int
        Channels the pipeline feeds it (after preprocessing).
    patch_size : sequence of int
        The pipeline's patch size.
    class_names : sequence of str, optional
        The pipeline's class names (one per channel; two for a one-channel model).
    source : str
        What is being segmented, for messages.

    Returns
    -------
    int
        K, the number of output channels.

    Raises
    ------
    ModelError
        Wrong input channels, a patch size the model refuses, an output of the
        wrong shape, or class names that do not match the output channels.
    """
    patch = tuple(int(p) for p in patch_size)
    key = (int(n_channels), patch)
    done = getattr(predictor, "_tileseg_dry_run", None)
    if isinstance(done, dict) and key in done:
        k = done[key]
    else:
        expected_in = getattr(predictor, "in_channels", None)
        if expected_in is not None and int(expected_in) != int(n_channels):
            raise ModelError(f"model expects {expected_in} input channels, {source} has {n_channels} "
                             "(after preprocessing)")
        check_patch_size(predictor, patch)
        probe = np.zeros((1, int(n_channels)) + patch, dtype=np.float32)
        try:
            out = np.asarray(predictor(probe))
        except ModelError as exc:
            raise ModelError(f"model check on one {list(patch)} patch of {source} failed: {exc}") from exc
        except Exception as exc:
            raise ModelError(f"model check on one {list(patch)} patch of {source} ({n_channels} channels) failed: "
                             f"{exc.__class__.__name__}: {str(exc)[:500]}") from exc
        conv = getattr(predictor, "conventions", None)
        stride = conv.output_stride if getattr(conv, "output_grid", False) else 1
        if out.ndim != probe.ndim or out.shape[0] != 1 or tuple(out.shape[2:]) != tuple(p // stride for p in patch):
            raise ModelError(f"model returned shape {out.shape!r} for one patch {probe.shape!r}; expected (1, K, "
                             f"{', '.join(map(str, patch))}) (see the model conventions layout / output_stride)")
        k = int(out.shape[1])
        declared = getattr(predictor, "out_channels", None)
        if declared is not None and int(declared) != k:
            log.info("model declared %s output channels but returns %s; using %s", declared, k, k)
        try:
            predictor.out_channels = k
            with _LOCK:
                cache = getattr(predictor, "_tileseg_dry_run", None)
                cache = dict(cache) if isinstance(cache, dict) else {}
                cache[key] = k
                predictor._tileseg_dry_run = cache
        except AttributeError:  # a callable that takes no attributes: checked again next time
            pass
    if class_names is not None and len(class_names) != k and not (k == 1 and len(class_names) == 2):
        raise ModelError(f"model.classes lists {len(class_names)} classes {list(class_names)!r} but the model "
                         f"outputs {k} channels" + (" (one channel: give two names)" if k == 1 else ""))
    return k


def dry_run_on(client: Any, predictor: Any, n_channels: int, patch_size: Sequence[int], *,
               resources: dict[str, float] | None = None, class_names: Sequence[str] | None = None,
               source: str = "image") -> int:
    """:func:`dry_run` as one task on ``client``'s cluster (restricted to ``resources``), or here without a client.

    The result is remembered on the client's ``predictor`` like a local dry run.
    """
    if client is None:
        return dry_run(predictor, n_channels, patch_size, class_names=class_names, source=source)
    import uuid

    patch = tuple(int(p) for p in patch_size)
    key = (int(n_channels), patch)
    done = getattr(predictor, "_tileseg_dry_run", None)
    if not (isinstance(done, dict) and key in done):
        future = client.submit(dry_run, predictor, int(n_channels), patch, source=source, pure=False,
                               resources=dict(resources) if resources else None,
                               key=f"tileseg-dry-run-{uuid.uuid4().hex}")
        try:
            k = int(future.result())
        finally:
            future.release()
        try:
            predictor.out_channels = k
            predictor._tileseg_dry_run = {**(done if isinstance(done, dict) else {}), key: k}
        except AttributeError:  # pragma: no cover - a callable that takes no attributes
            return k
    return dry_run(predictor, n_channels, patch, class_names=class_names, source=source)
