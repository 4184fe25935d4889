"""One item of a pipeline: list the items, open one, load the model, build its lazy result.

What :mod:`tileseg.runner` (runs) and :mod:`tileseg.planning` (``tileseg plan``)
share: an item is an input path (or a DICOM series ``folder#uid``) from
``input.path``; its result is a lazy :class:`~tileseg.image.Image` built from
the pipeline's model or method and post-processing steps, computed later by
the writers.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from .config import PipelineConfig
from .errors import PIPELINE_KEYS, ConfigError, ModelError, reword
from .execution import SchedulerInfo
from .image import Image
from .outputs import render_output


def expand_items(cfg: PipelineConfig) -> list[tuple[str, Exception | None]]:
    """The input items, each with the error that prevents opening it (or ``None``).

    Every ``input.path`` entry is expanded on its own, so one missing file in
    a list becomes one failed item instead of failing the whole run.

    Raises
    ------
    ConfigError
        If no entry yields any item at all.
    """
    from .readers import expand_inputs

    storage = cfg.input.options.get("storage_options")
    items: list[tuple[str, Exception | None]] = []
    seen: set[str] = set()
    for entry in cfg.input.path:
        try:
            found = expand_inputs(entry, storage_options=storage, options=dict(cfg.input.options))
        except Exception as exc:  # ImageNotFoundError, FormatError, OSError from fsspec
            if len(cfg.input.path) == 1:
                raise ConfigError(f"input.path: {exc}") from exc
            items.append((entry, exc))
            continue
        for item in found:
            if item not in seen:
                seen.add(item)
                items.append((item, None))
    if not items:
        raise ConfigError(f"input.path: no items found in {cfg.input.path!r}")
    return items



def render_all(cfg: PipelineConfig, items: list[tuple[str, Exception | None]]) -> list[list[str]]:
    """Every item's rendered output paths; an item whose name cannot make a safe path gets that error in ``items``."""
    from .errors import InputError

    paths: list[list[str]] = []
    for index, (item, err) in enumerate(items):
        try:
            paths.append([render_output(o.path, item, index) for o in cfg.all_outputs()])
        except InputError as exc:
            paths.append([])
            if err is None:
                items[index] = (item, exc)
    return paths


def open_item(cfg: PipelineConfig, item: str, index: int = 0) -> Image:
    """The input image of one item, with ``input.nodata`` and ``input.aoi`` applied when given."""
    from .readers import open_image

    i = cfg.input
    image = open_image(item, reader=i.reader, array=i.array, level=i.level, axes=i.axes, **dict(i.options))
    if i.nodata is not None:
        image = dataclasses.replace(image, nodata=i.nodata)
    if i.aoi is not None:
        from .aoi import apply_aoi

        image = apply_aoi(image, render_output(i.aoi, item, index))
    return image


def load_model(cfg: PipelineConfig):
    """The predictor of a model pipeline (loaded once per run)."""
    from .predictors import load_predictor

    assert cfg.model is not None
    device = None if cfg.model.device == "auto" else cfg.model.device
    return load_predictor(cfg.model.spec(), device=device, precision=cfg.model.precision, tta=cfg.model.tta,
                          channels_last=cfg.model.channels_last, compile=cfg.model.compile)


def build_item(cfg: PipelineConfig, image: Image, predictor: Any,
               sched: SchedulerInfo | None = None) -> tuple[Image, Image, dict[str, int]]:
    """The lazy results of one item: ``(raw, result, stats)``.

    ``raw`` is the model's (or method's) output, ``result`` the same after
    the postprocess steps; both carry the input's geometry. ``stats`` holds
    ``n_patches`` and ``n_patches_skipped`` (all-nodata patches) for models.
    """
    from .postprocess import apply_postprocess

    stats: dict[str, int] = {}
    if cfg.model is not None:
        from .graph import segment_with_stats
        from .predictors.check import dry_run_on

        resources = sched.resources if sched is not None and sched.distributed and sched.resources else None
        n_ch = int(image.data.shape[0]) if image.has_channels else 1
        client = sched.client if sched is not None and sched.distributed else None
        k = dry_run_on(client, predictor, n_ch, cfg.tiling.patch_size,  # type: ignore[union-attr]
                       resources=resources, class_names=cfg.model.classes, source=image.source or "image")
        _check_classes(cfg, k)
        tiling = cfg.tiling_options()
        inference = cfg.inference_options(resources=resources, lookahead=_lookahead(sched))
        declared = getattr(predictor, "class_names", None)
        if inference.class_names is None and declared and len(declared) == k:
            inference = dataclasses.replace(inference, class_names=tuple(declared))
        raw, stats = segment_with_stats(image, predictor, tiling, inference)
    else:
        from .methods import apply_method

        name, params = cfg.method_step() or ("", {})
        data = image.data
        chunks = method_chunks(cfg, image)
        if chunks is not None:
            lead = (data.chunks[0],) if image.has_channels else ()
            data = data.rechunk(lead + chunks)
        if cfg.preprocess:
            from .preprocess import apply_preprocess

            chw = data if image.has_channels else data[None]
            data = apply_preprocess(chw, cfg.preprocess)
            data = data if image.has_channels else data[0]
        # the validity of the pixels as read (nodata values change meaning once preprocessed)
        raw = apply_method(image.with_data(data, mask=image.valid(), nodata=None), name, params)
    return raw, apply_postprocess(raw, cfg.postprocess), stats


def method_chunks(cfg: PipelineConfig, image: Image) -> tuple[int, ...] | None:
    """``tiling.chunks`` of a method pipeline checked against ``image`` (None when not set).

    Raises
    ------
    ConfigError
        The number of entries differs from the image's spatial axes.
    """
    if cfg.tiling is None or cfg.tiling.chunks is None:
        return None
    if len(cfg.tiling.chunks) != image.spatial_ndim:
        raise ConfigError(f"tiling.chunks: {cfg.tiling.chunks!r} has {len(cfg.tiling.chunks)} entries but "
                          f"the image has {image.spatial_ndim} spatial axes {image.axes!r}")
    return tuple(int(c) for c in cfg.tiling.chunks)


def _check_classes(cfg: PipelineConfig, k: int | None) -> None:
    """``model.classes`` must match the model's output channels (two names for one channel), before computing."""
    names = cfg.model.classes if cfg.model is not None else None
    if names is None or k is None:
        return
    if len(names) != k and not (k == 1 and len(names) == 2):
        files = ", ".join(cfg.model.files().values()) or cfg.model.kind
        raise ModelError(f"model.classes lists {len(names)} classes {names!r} but the model {files} outputs "
                         f"{k} channels")


def _lookahead(sched: SchedulerInfo | None) -> int:
    """How many blocks prediction may run ahead of finished output (see ``segment_image``).

    The run stores the whole result, so ordering edges cost nothing and keep
    the working set to about one slab of overlap margins. A cluster gets a
    window of two blocks per worker thread so no worker waits.
    """
    workers = 2
    if sched is not None and sched.client is not None:
        try:
            workers = sum(w.get("nthreads", 1) for w in sched.client.scheduler_info()["workers"].values())
        except Exception:  # pragma: no cover - a scheduler that went away
            pass
    elif sched is not None and sched.workers:
        workers = sched.workers
    return max(4, 2 * workers)


def error_text(exc: BaseException, item: str) -> str:
    msg = reword(str(exc) or repr(exc), PIPELINE_KEYS)
    if item not in msg and os.path.basename(item.rstrip("/")) not in msg:
        msg = f"{item}: {msg}"
    return f"{type(exc).__name__}: {msg}"


__all__ = ["build_item", "error_text", "expand_items", "load_model", "open_item", "render_all"]
