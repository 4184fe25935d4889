"""``tileseg plan``: per item its shape, chunks, patches, task count and memory per task, computing nothing heavy."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from .config import load_pipeline
from .items import error_text, expand_items, load_model, method_chunks, open_item, render_all
from .outputs import check_not_inputs, check_outputs, protected_paths

log = logging.getLogger(__name__)


def plan_pipeline(pipeline: Any) -> list[dict[str, Any]]:
    """Per item: shape, chunks, patches and estimated peak memory per task, computing nothing heavy.

    Items that cannot be opened get an ``error`` entry instead.

    Raises
    ------
    ConfigError
        What :func:`~tileseg.runner.run_pipeline` refuses before any item
        starts: two items writing the same output, an output that is or
        contains an input.
    """
    cfg = load_pipeline(pipeline)
    items = expand_items(cfg)
    paths = render_all(cfg, items)
    check_outputs([paths[i] for i, (_, err) in enumerate(items) if err is None],
                  [item for item, err in items if err is None])
    check_not_inputs([p for ps in paths for p in ps], list(protected_paths(cfg, [item for item, _ in items])))
    k = None
    if cfg.model is not None:
        if cfg.model.classes:
            k = len(cfg.model.classes)
        else:
            try:
                k = load_model(cfg).out_channels
            except Exception as exc:  # plan must not need the model to run
                log.debug("could not load the model for plan: %s", exc)
    rows = []
    for index, ((item, err), outs) in enumerate(zip(items, paths)):
        row: dict[str, Any] = {"index": index, "input": item, "output": (outs or [None])[0], "outputs": outs}
        rows.append(row)
        if err is not None:
            row["error"] = error_text(err, item)
            continue
        try:
            image = open_item(cfg, item, index)
            if cfg.model is not None:
                from .graph import plan

                p = plan(image, cfg.tiling_options(), out_channels=k or 1, batch_size=cfg.model.batch_size,
                         output=cfg.model.output)
                row.update({key: (list(v) if isinstance(v, tuple) else v) for key, v in p.items()})
                row["out_channels"] = k
            else:
                chunks = list(method_chunks(cfg, image) or [int(max(c)) for c in image.data.chunks[-image.spatial_ndim:]])
                row.update(shape=list(image.spatial_shape), channels=image.data.shape[0] if image.has_channels else 1,
                           chunks=chunks, n_patches=None, est_peak_task_bytes=None)
            row["dtype"] = str(image.dtype)
            row["est_tasks"] = estimate_tasks(row, len(cfg.postprocess or ()) + len(cfg.preprocess or ()),
                                              spatial_ndim=image.spatial_ndim)
            if row["est_tasks"] > MAX_TASKS_PER_ITEM:
                row.setdefault("warnings", []).append(
                    f"about {row['est_tasks']:.3g} tasks in its graph (more than {MAX_TASKS_PER_ITEM:.0e}): "
                    "graph building and the scheduler will be slow; use larger tiling.chunks")
        except Exception as exc:
            row["error"] = error_text(exc, item)
    return rows


#: ``tileseg plan`` warns about items whose graph would have more tasks than this.
MAX_TASKS_PER_ITEM = 100_000


def estimate_tasks(row: dict[str, Any], n_steps: int, *, spatial_ndim: int) -> int:
    """Rough task count of one item's graph from its plan row (``n_blocks`` or ``shape``/``chunks``).

    A model's block has an owner, up to ``2**ndim`` pieces, a final task, an
    ordering token and a store task; a classical block one task per step plus
    its read and store.
    """
    if row.get("n_owner_tasks") is not None:
        return int(row["n_owner_tasks"]) * (1 + 2 ** spatial_ndim) + 3 * int(row["n_blocks"]) + \
            n_steps * int(row["n_blocks"])
    blocks = int(np.prod([-(-int(s) // int(c)) for s, c in zip(row["shape"], row["chunks"])], dtype=np.int64))
    return blocks * (3 + n_steps)


__all__ = ["MAX_TASKS_PER_ITEM", "estimate_tasks", "plan_pipeline"]
