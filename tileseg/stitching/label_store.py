"""Where provisional per-chunk labels wait between the scan and the relabel pass.

The labelling in :mod:`tileseg.stitching.labels` labels every chunk once. Its
local labels are kept, compressed (Blosc, LZ4 with bit shuffle: label images
are long runs of equal values and compress 10-30x), so that the relabel pass
only reads them back and maps them through a lookup table instead of
recomputing the upstream graph and the labelling a second time.

Two places:

* ``"disk"``: one file per chunk in a temporary directory (written under a
  temporary name and renamed, so a task that Dask runs twice writes the same
  file twice, harmlessly). The directory is removed when the last object
  referring to it (the labels array's graph, the :class:`Components`) is
  garbage collected, or at interpreter exit. Only for schedulers whose tasks
  run on this machine (threads, processes, synchronous).
* ``"memory"``: the compressed bytes are the scan tasks' results and travel
  inside the relabel tasks; works with any scheduler (a distributed cluster
  included), at the cost of holding them in the client.

``"auto"`` picks ``"memory"`` under a distributed client and ``"disk"`` otherwise.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
import weakref
from typing import Any

import numpy as np

from ..errors import ConfigError

__all__ = ["LabelStore", "SPILL_MODES", "compress", "decompress", "resolve_spill"]

SPILL_MODES = ("auto", "disk", "memory")


def _codec() -> Any:
    import numcodecs

    return numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.BITSHUFFLE)


def compress(lab: np.ndarray) -> tuple[bytes, str, tuple[int, ...]]:
    """Compressed bytes of a label block (in the smallest of uint16/uint32 that holds it), its dtype and shape."""
    top = int(lab.max()) if lab.size else 0
    small = lab
    for dtype in (np.uint16, np.uint32):
        if top < np.iinfo(dtype).max and lab.dtype.itemsize > np.dtype(dtype).itemsize:
            small = lab.astype(dtype)
            break
    return _codec().encode(np.ascontiguousarray(small)), small.dtype.str, lab.shape


def decompress(packed: tuple[bytes, str, tuple[int, ...]]) -> np.ndarray:
    """Inverse of :func:`compress` (read-only array of the stored dtype)."""
    data, dtype, shape = packed
    return np.frombuffer(_codec().decode(data), dtype=np.dtype(dtype)).reshape(shape)


def _distributed_client() -> bool:
    try:
        from dask.base import get_scheduler

        sched = get_scheduler()
    except Exception:  # pragma: no cover - dask internals moved
        return False
    owner = getattr(sched, "__self__", sched)
    return type(owner).__module__.split(".")[0] == "distributed"


def resolve_spill(spill: str) -> str:
    """``"disk"`` or ``"memory"`` for a ``spill`` option, checked.

    Raises
    ------
    ConfigError
        For an unknown mode.
    """
    if spill not in SPILL_MODES:
        raise ConfigError(f"spill must be one of {SPILL_MODES}, got {spill!r}")
    if spill == "auto":
        return "memory" if _distributed_client() else "disk"
    return spill


def _remove(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


class LabelStore:
    """Compressed per-chunk local labels, on disk (a temporary directory) or in memory.

    Parameters
    ----------
    mode : {"disk", "memory"}
        See the module docstring.
    dir : str, optional
        Parent of the temporary directory (default :func:`tempfile.gettempdir`).
    """

    def __init__(self, mode: str, dir: str | None = None) -> None:
        if mode not in ("disk", "memory"):
            raise ConfigError(f"label store mode must be 'disk' or 'memory', got {mode!r}")
        self.mode = mode
        self.path: str | None = None
        self._owner = False
        if mode == "disk":
            self.path = tempfile.mkdtemp(prefix="tileseg-labels-", dir=dir)
            self._owner = True
            # Removed with the last reference in this process (never by pickled copies in workers).
            self._finalizer = weakref.finalize(self, _remove, self.path)

    def __reduce__(self) -> tuple:
        return (_reader, (self.mode, self.path))

    def put(self, index: int, lab: np.ndarray) -> Any:
        """Store chunk ``index``'s labels; returns what :meth:`get` needs back (bytes or a marker)."""
        packed = compress(lab)
        if self.mode == "memory":
            return packed
        data, dtype, shape = packed
        final = os.path.join(self.path, f"{index}.blosc")
        tmp = f"{final}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, final)
        return (None, dtype, shape)

    def get(self, index: int, token: Any) -> np.ndarray:
        """Chunk ``index``'s labels, from the token :meth:`put` returned."""
        data, dtype, shape = token
        if data is None:
            final = os.path.join(self.path, f"{index}.blosc")
            try:
                with open(final, "rb") as fh:
                    data = fh.read()
            except FileNotFoundError:
                raise FileNotFoundError(
                    f"provisional labels of chunk {index} are gone from {self.path!r}: the labels array "
                    "outlived its temporary store (compute it while the object that made it is alive)"
                ) from None
        return decompress((data, dtype, shape))

    def cleanup(self) -> None:
        """Remove the temporary directory now (disk mode, owning process only)."""
        if self._owner:
            self._finalizer()


def _reader(mode: str, path: str | None) -> LabelStore:
    """A non-owning copy (in a worker process): reads and writes, never removes."""
    store = LabelStore.__new__(LabelStore)
    store.mode = mode
    store.path = path
    store._owner = False
    return store
