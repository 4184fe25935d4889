"""Chunk-level resume: the record of finished chunks and a store task for the chunks still missing.

A run that dies mid-item leaves its partial output (a hidden sibling of the
final path, named after the item and the pipeline fingerprint, see
:func:`tileseg.writers.base.partial_sibling`). The next run with the same
fingerprint reuses it and writes only the chunks that are not yet recorded.

The record
----------
Zarr does not store chunks equal to the fill value, so a chunk file that is
missing (or present) says nothing about completion. Each store task writes
its chunk, then creates one empty marker file ``<partial>/.tileseg-chunks/
<i>.<j>[.<k>]`` named after the chunk's grid index. Creating an existing
marker again is harmless, so Dask running a task twice changes nothing; a
process killed between the data and the marker leaves no marker and the
chunk is written again. Markers are not fsynced: they survive a killed
process (the page cache outlives it), not a power cut before the kernel
flushed the chunk (then the chunk may be recorded but torn).

Only the blocks still missing
-----------------------------
:func:`store_blocks` builds one store task per missing chunk and culls the
source graph to what those chunks need: the owner tasks (model calls) of
finished chunks are not in the graph at all. The engine's ordering tokens
(:data:`tileseg.graph.ORDER_TOKEN`, edges that only bound memory) that point
at work no longer needed are replaced by constants; otherwise one token
would pull in every earlier block.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Hashable, Iterable
from functools import partial
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

#: Folder of chunk markers inside a partial output.
RECORDS = ".tileseg-chunks"
#: What a partial output was created for (key and layout), inside it.
PARTIAL_INFO = ".tileseg-partial.json"


class ChunkRecords:
    """Markers of finished chunks in ``folder`` (one empty file per chunk, see the module docstring).

    Parameters
    ----------
    folder : str
        The records folder (created on first :meth:`mark`).
    """

    def __init__(self, folder: str) -> None:
        self.folder = folder

    @staticmethod
    def name(index: Iterable[int]) -> str:
        """Marker file name of a chunk index (``"3.0.12"``)."""
        return ".".join(str(int(i)) for i in index)

    def mark(self, index: tuple[int, ...]) -> None:
        """Record chunk ``index`` as written (idempotent)."""
        os.makedirs(self.folder, exist_ok=True)
        fd = os.open(os.path.join(self.folder, self.name(index)), os.O_CREAT | os.O_WRONLY, 0o644)
        os.close(fd)

    def finished(self, ndim: int) -> set[tuple[int, ...]]:
        """The recorded chunk indices (markers with another dimensionality are ignored)."""
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return set()
        out = set()
        for n in names:
            parts = n.split(".")
            if len(parts) == ndim and all(p.isdigit() for p in parts):
                out.add(tuple(int(p) for p in parts))
        return out


def records_of(target: str) -> ChunkRecords:
    """The chunk records of the partial output folder ``target``."""
    return ChunkRecords(os.path.join(target, RECORDS))


def reusable(target: str, layout: dict[str, Any]) -> bool:
    """Whether the partial output ``target`` was created for exactly ``layout`` (key, shape, chunks, dtype ...).

    ``layout`` must be JSON-serialisable; it is compared with what
    :func:`mark_partial` stored when the folder was created.
    """
    try:
        with open(os.path.join(target, PARTIAL_INFO)) as fh:
            stored = json.load(fh)
    except (OSError, ValueError):
        return False
    return stored == json.loads(json.dumps(layout, default=str))


def mark_partial(target: str, layout: dict[str, Any]) -> None:
    """Record what the partial output ``target`` was created for (see :func:`reusable`)."""
    tmp = os.path.join(target, f"{PARTIAL_INFO}.{uuid.uuid4().hex[:8]}")
    with open(tmp, "w") as fh:
        json.dump(layout, fh, default=str)
    os.replace(tmp, os.path.join(target, PARTIAL_INFO))


def drop_records(target: str) -> None:
    """Remove the resume bookkeeping from a finished partial output before it is moved into place."""
    shutil.rmtree(os.path.join(target, RECORDS), ignore_errors=True)
    try:
        os.remove(os.path.join(target, PARTIAL_INFO))
    except FileNotFoundError:
        pass


class _BlockTarget:
    """Writes one block into the store, then records it; nothing once the partial folder is gone (aborted).

    With a ``guard`` folder the write and its record happen while holding that folder
    (:func:`~tileseg.writers.partial_lock.writing_into`), so an abort that removes it
    meanwhile waits for them, and a write that starts after the abort writes nothing.
    """

    def __init__(self, arr: Any, guard: str | None, records: ChunkRecords | None) -> None:
        self.arr, self.guard, self.records = arr, guard, records

    def __call__(self, block: np.ndarray, region: tuple[slice, ...], index: tuple[int, ...]) -> None:
        if self.guard is None:
            self._write(block, region, index)
            return
        from .partial_lock import writing_into

        with writing_into(self.guard) as ok:
            if ok:
                self._write(block, region, index)

    def _write(self, block: np.ndarray, region: tuple[slice, ...], index: tuple[int, ...]) -> None:
        self.arr[region] = block
        if self.records is not None:
            self.records.mark(index)


def _all_done(*_: Any) -> None:
    return None


def store_blocks(data: Any, arr: Any, *, guard: str | None = None, records: ChunkRecords | None = None) -> Any:
    """A ``Delayed`` storing each block of ``data`` (one whole store chunk each) that is not recorded yet.

    Parameters
    ----------
    data : dask.array.Array
        Chunked exactly as the store (see :func:`tileseg.writers.zarr.align`).
    arr : array-like
        The store array (``__setitem__`` with a tuple of slices).
    guard : str, optional
        A folder that must still exist for a block to be written (the local partial output).
    records : ChunkRecords, optional
        Chunk records: recorded blocks are skipped, written ones recorded.

    Returns
    -------
    dask.delayed.Delayed
        Computing it writes the missing blocks; its graph holds only the
        tasks those blocks need (see the module docstring).
    """
    from dask.delayed import Delayed
    from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

    done = records.finished(data.ndim) if records is not None else set()
    grid = [range(n) for n in data.numblocks]
    offsets = [np.concatenate([[0], np.cumsum(c)]).astype(int) for c in data.chunks]
    todo = [idx for idx in np.ndindex(*data.numblocks) if idx not in done]
    if done:
        log.info("resuming: %d of %d chunks already written, %d to go", len(done & set(np.ndindex(*data.numblocks))),
                 int(np.prod([len(g) for g in grid])), len(todo))
    source_keys = [(data.name,) + idx for idx in todo]
    token = uuid.uuid4().hex
    writer = _BlockTarget(arr, guard, records)
    store: dict[Hashable, Any] = {}
    for idx, key in zip(todo, source_keys):
        region = tuple(slice(int(o[i]), int(o[i + 1])) for o, i in zip(offsets, idx))
        store[(f"tileseg-store-{token}",) + idx] = (partial(writer, region=region, index=idx), key)
    final = f"tileseg-stored-{token}"
    store[final] = (_all_done, list(store))
    graph = _layer_optimized(data) if todo else HighLevelGraph({}, {})
    if done:  # only what the missing chunks need: a plain dict, culled here
        return Delayed(final, {**needed(dict(graph), source_keys), **store})
    # every block is stored: the store tasks are one more layer over the array's (lazy) layers, so the
    # graph is materialised once, by the scheduler, never here (its cost grows with the tasks, see
    # tests/test_huge.py)
    layers = {**graph.layers, final: MaterializedLayer(store)}
    deps = {**graph.dependencies, final: {data.name} if data.name in graph.layers else set(graph.layers)}
    return Delayed(final, HighLevelGraph(layers, deps))


def _layer_optimized(data: Any) -> Any:
    """The array's graph with Dask's layer-level optimisations (blockwise fusion, roots), nothing materialised.

    Dask's full array optimisation would also build the low-level dict and
    fuse linear chains: seconds for a huge image's graph, spent again by the
    scheduler when it materialises the graph itself.
    """
    from dask.blockwise import fuse_roots, optimize_blockwise
    from dask.core import flatten

    keys = list(flatten(data.__dask_keys__()))
    graph = optimize_blockwise(data.__dask_graph__(), keys=keys)
    return fuse_roots(graph, keys=keys)


def needed(dsk: dict[Hashable, Any], keys: list[Hashable]) -> dict[Hashable, Any]:
    """The part of ``dsk`` that ``keys`` need, with ordering tokens to unneeded work replaced by constants.

    An ordering token (a key whose name starts with :data:`tileseg.graph.ORDER_TOKEN`)
    is followed only when everything it waits for is needed anyway.
    """
    from dask.core import get_dependencies

    from ..graph import ORDER_TOKEN

    def is_token(k: Hashable) -> bool:
        name = k[0] if isinstance(k, tuple) else k
        return isinstance(name, str) and name.startswith(ORDER_TOKEN)

    out: dict[Hashable, Any] = {}
    tokens: set[Hashable] = set()
    stack = list(keys)
    while stack:
        k = stack.pop()
        if k in out:
            continue
        out[k] = dsk[k]
        for d in get_dependencies(dsk, k):
            if is_token(d):
                tokens.add(d)
            elif d not in out:
                stack.append(d)
    for t in tokens:
        deps = get_dependencies(dsk, t)
        out[t] = dsk[t] if all(d in out for d in deps) else None
    return out


__all__ = ["ChunkRecords", "drop_records", "mark_partial", "needed", "records_of", "reusable", "store_blocks"]
