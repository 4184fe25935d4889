"""A per-process, byte-bounded LRU cache of decoded DICOM slabs (whole planes).

The engine's owner tasks read their own input region (:mod:`tileseg.tiling.reads`),
a few hundred pixels wide, while a DICOM slab can only be decoded as whole
planes. Without a cache every owner under a slab would decode all of its files
again; with shared slab tasks instead, whole slabs (the image's cross-section
times the slab thickness, as float32 after preprocessing) stay alive until the
last owner of a layer of blocks has run. The cache keeps the decoded stored
values (rescaled, in the reader's dtype) of the most recent slabs, bounded in
bytes, so the owners of one layer of blocks decode each file about once and
the memory it holds does not grow with the image.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable

import numpy as np

#: Default bound of the per-process slab cache, bytes (a 160-slice layer of 512 x 512 int16 planes is 80 MiB).
DEFAULT_CACHE_BYTES = 128 * 2**20


class SlabCache:
    """Thread-safe LRU of arrays bounded by their total ``nbytes``.

    Parameters
    ----------
    limit : int
        Bound in bytes; an array larger than it is returned but not kept.
    """

    def __init__(self, limit: int = DEFAULT_CACHE_BYTES) -> None:
        self.limit = int(limit)
        self.items: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self.nbytes = self.hits = self.misses = 0
        self.lock = threading.Lock()

    def get(self, key: Hashable, make: Callable[[], np.ndarray]) -> np.ndarray:
        """The cached array for ``key``, made by ``make()`` (outside the lock) when missing.

        The returned array is shared: callers must not modify it.
        """
        with self.lock:
            value = self.items.get(key)
            if value is not None:
                self.items.move_to_end(key)
                self.hits += 1
                return value
            self.misses += 1
        value = make()
        value.setflags(write=False)
        if value.nbytes > self.limit:
            return value
        with self.lock:
            old = self.items.pop(key, None)
            self.nbytes -= old.nbytes if old is not None else 0
            self.items[key] = value
            self.nbytes += value.nbytes
            while self.nbytes > self.limit and self.items:
                _, dropped = self.items.popitem(last=False)
                self.nbytes -= dropped.nbytes
        return value

    def clear(self) -> None:
        """Drop every entry and reset the counters."""
        with self.lock:
            self.items.clear()
            self.nbytes = self.hits = self.misses = 0


#: The per-process slab cache (module state: one per worker process).
SLAB_CACHE = SlabCache()
