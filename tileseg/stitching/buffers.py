"""Buffers for arrays that outlive the task that made them.

Between tasks the engine keeps two kinds of arrays alive: input blocks under
the overlap strip and the spill-over pieces waiting for their neighbour
block. They are allocated while the model's much larger, short-lived
activations come and go. When both share the C heap, every long-lived
array pins the memory around it and the heap keeps growing with the number
of such arrays (glibc also raises its mmap threshold after each large free,
so multi-megabyte arrays end up on the heap).

Arrays made here live in their own anonymous memory mapping instead, so
freeing one returns its pages to the operating system at once and the heap
only ever holds short-lived data. Small arrays (under :data:`MIN_BYTES`) use
ordinary numpy memory.

The mappings are private and ask for transparent huge pages (as NumPy does
for its own large arrays): first touching a fresh mapping then costs about
what zeroing it costs. A shared mapping (Python's ``mmap`` default) is
backed by shared memory and took 4.5x as long to fault in (63 vs 14 ms for
110 MiB, measured here), which showed in every accumulator and spill piece.

:func:`zeros` (accumulators) faults its pages in at once, in one sequential
pass, instead of leaving them to the first strided writes of patches: for a
64 x 96 x 160 x 160 float32 accumulator filled by 75 patches of 48^3 with one
``addcmul_`` each (one thread, CPU time with the kernel's), 0.51-0.57 s with
the pass against 0.78-1.74 s without (the lazy huge-page faults varied with
the kernel's compaction work), and 0.76-0.81 s for ``torch.zeros``.

Measured on the engine benchmark (512^3 volume, threads scheduler), this alone
lowered peak RSS only a little (1880 -> 1808 MiB); most of the growth came
from glibc's per-thread arenas, see :mod:`tileseg.allocator`. It is kept
because it makes the bound independent of the allocator's heuristics.
"""

from __future__ import annotations

import mmap

import numpy as np

MIN_BYTES = 256 * 1024
#: Mappings from this size on ask for transparent huge pages.
HUGE_BYTES = 4 * 1024 * 1024


def empty(shape: tuple[int, ...], dtype: np.dtype | str = np.float32) -> np.ndarray:
    """Uninitialised array; in its own memory mapping when large.

    Parameters
    ----------
    shape : tuple of int
        Array shape.
    dtype : numpy dtype
        Element type.

    Returns
    -------
    numpy.ndarray
        A writable C-contiguous array. The mapping is released when the
        array (and every view of it) is garbage collected.
    """
    dt = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    if nbytes < MIN_BYTES:
        return np.empty(shape, dtype=dt)
    return np.frombuffer(_mapping(nbytes), dtype=dt, count=nbytes // dt.itemsize).reshape(shape)


def _mapping(nbytes: int) -> mmap.mmap:
    """A private anonymous mapping of ``nbytes``, with huge pages where the kernel offers them."""
    flags = getattr(mmap, "MAP_PRIVATE", None)
    m = mmap.mmap(-1, nbytes) if flags is None else mmap.mmap(-1, nbytes, flags=flags)
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None and nbytes >= HUGE_BYTES:
        try:
            m.madvise(advice)
        except OSError:  # kernels without transparent huge pages
            pass
    return m


def zeros(shape: tuple[int, ...], dtype: np.dtype | str = np.float32) -> np.ndarray:
    """Zero-filled array, its pages faulted in here in one sequential pass (see the module's notes)."""
    dt = np.dtype(dtype)
    if int(np.prod(shape, dtype=np.int64)) * dt.itemsize < MIN_BYTES:
        return np.zeros(shape, dtype=dt)
    out = empty(shape, dt)
    out.fill(0)  # the mapping is zero already: this only faults its pages in, in order
    return out


def copy(arr: np.ndarray) -> np.ndarray:
    """C-contiguous copy of ``arr`` (in its own mapping when large)."""
    arr = np.asarray(arr)
    out = empty(arr.shape, arr.dtype)
    out[...] = arr
    return out
