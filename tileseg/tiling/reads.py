"""Private input reads: each owner task reads its own input region.

An owner task needs the input blocks under its region, which reaches one
overlap margin into the following blocks. When owners share those input
blocks, every block under the overlap strip stays in memory from the first
owner that reads it until the last one, which in raster order is a whole
slab of input (the image's cross-section times one input chunk): memory
that grows with the image. Separate read tasks per owner do not help either:
having no dependencies they are ready at once, and the scheduler runs them
far ahead of their owners (measured: about six owners' regions waiting).

So the tasks behind an owner's input blocks (store reads, casts, NaN
filling, preprocessing, padding) are packed into a :class:`RegionRead` that
the owner task runs itself, synchronously, when it starts: the input exists
only while its owner runs. The cost is decoding the chunks under the overlap
strip more than once (by up to ``2**ndim`` owners), small next to a model.
Graph-level constants (string keys, such as the opened store) are shared.

Only public Dask API is used: :func:`dask.core.get_dependencies` walks both
legacy (tuple) tasks and the newer task objects, and
:func:`dask.local.get_sync` runs either kind, so the graph is passed on as
Dask built it.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from typing import Any

import numpy as np
from dask.core import get_dependencies


class RegionRead:
    """An owner's input: a small task graph, run inside the owner task.

    Parameters
    ----------
    graph : dict
        The tasks behind ``keys`` (and the constants they use).
    keys : list
        Input chunk keys to return, in order.
    """

    __slots__ = ("graph", "keys")

    def __init__(self, graph: dict[Hashable, Any], keys: list[tuple]) -> None:
        self.graph, self.keys = graph, keys

    def __call__(self) -> list[np.ndarray]:
        """Compute the input blocks with the synchronous scheduler."""
        from dask.local import get_sync

        return list(get_sync(self.graph, self.keys))

    def __repr__(self) -> str:
        return f"RegionRead({len(self.keys)} blocks, {len(self.graph)} tasks)"


MAX_CONSTANT_BYTES = 1 << 20


def private_reads(
    graph: Mapping[Hashable, Any], wanted: Mapping[Hashable, Iterable[tuple]]
) -> dict[Hashable, RegionRead] | None:
    """Pack the tasks behind each consumer's input keys into a :class:`RegionRead`.

    Parameters
    ----------
    graph : mapping
        Low-level Dask graph of the input array.
    wanted : mapping
        Consumer id -> input chunk keys it reads (tuples ``(name, *index)``).

    Returns
    -------
    dict or None
        Consumer id -> its :class:`RegionRead`, returning the blocks in the
        order given. None when the graph holds in-memory data (an array
        larger than :data:`MAX_CONSTANT_BYTES`, e.g. from
        ``dask.array.from_array(numpy_array)``): it would travel with every
        consumer task to a distributed worker, so such inputs stay shared.
    """
    tasks = dict(graph)
    deps: dict[Hashable, list[Hashable]] = {}  # per task, computed once (consumers share input tasks)
    out: dict[Hashable, RegionRead] = {}
    for consumer, keys in wanted.items():
        keys = list(keys)
        sub: dict[Hashable, Any] = {}
        stack = list(keys)
        while stack:
            key = stack.pop()
            if key in sub:
                continue
            node = tasks[key]
            sub[key] = node
            found = deps.get(key)
            if found is None:
                if not isinstance(key, tuple) and _nbytes(node) > MAX_CONSTANT_BYTES:
                    return None
                found = deps[key] = list(get_dependencies(tasks, key))
            stack.extend(d for d in found if d not in sub)
        out[consumer] = RegionRead(sub, keys)
    return out


def _nbytes(node: Any) -> int:
    value = getattr(node, "value", node)  # constants may be wrapped in a DataNode
    return int(getattr(value, "nbytes", 0)) if isinstance(value, np.ndarray) else 0
