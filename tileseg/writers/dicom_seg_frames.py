"""The pixel side of the DICOM SEG finalize, slab by slab from the partial store.

Two passes over the slab store of :mod:`tileseg.writers.dicom_seg`, each
holding one slab (one store chunk, about 64 MiB) at a time:

1. :func:`scan_store` checks the values and records, per segment and slice,
   whether the frame holds the segment (:class:`Occupancy`), and names the
   segments;
2. :func:`write_pixel_data` streams the Pixel Data of a list of frames
   ``(segment number, slice index)`` to a file: bit-packed (little-endian bit
   order, frames packed back to back without padding) for BINARY, one byte
   per pixel (``round(p * 255)``) for FRACTIONAL, padded to an even length,
   as DICOM and highdicom encode them.

Segment conventions (the dicom_seg module docstring): BINARY stores a class
map, segment ``k`` is label ``k`` (nodata is background); FRACTIONAL stores
probabilities ``(z, y, x)`` (one segment) or ``(c, z, y, x)`` (channel 0 is
the background when class names label the channels).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

from ..errors import OutputError
from .base import WriteHandle

STORE = "slabs.zarr"
MAX_FRACTIONAL = 255
#: Pixels encoded per batch while streaming (one 512 x 512 x 32 batch).
BATCH_PIXELS = 32 * 512 * 512


@dataclass(frozen=True)
class Occupancy:
    """Which frames hold which segment, from :func:`scan_store`.

    Attributes
    ----------
    labels : list of str
        Segment labels; segment number ``k`` is ``labels[k - 1]``.
    present : numpy.ndarray
        ``(n_segments, z)`` bool: the encoded frame of the segment on the slice
        has a non-zero pixel (for FRACTIONAL after rounding to 8 bits).
    touched : numpy.ndarray
        ``(n_segments, z)`` bool: the stored value has a non-zero pixel (before
        rounding; equals ``present`` for BINARY).
    channels : list of int
        FRACTIONAL ``(c, z, y, x)`` stores: the channel of each segment; else empty.
    """

    labels: list[str]
    present: np.ndarray
    touched: np.ndarray
    channels: list[int]


def open_store(handle: WriteHandle) -> Any:
    """The partial slab store of ``handle``, read-only."""
    import zarr
    from zarr.storage import LocalStore

    try:
        return zarr.open_array(store=LocalStore(os.path.join(handle.target, STORE)), mode="r")
    except Exception as exc:
        raise OutputError(f"{handle.path!r}: partial store {handle.target!r} cannot be opened: {exc}") from None


def _nodata(handle: WriteHandle) -> int | None:
    value = handle.details["nodata"]
    if value is not None and float(value).is_integer() and value >= 0:
        return int(value)
    return None


def _read_slab(handle: WriteHandle, arr: Any, z0: int) -> np.ndarray:
    """Slices ``z0 .. z0 + slab`` of the store; BINARY: with nodata set to background."""
    thick = handle.chunks[-3]
    slab = np.asarray(arr[..., z0:z0 + thick, :, :])
    nodata = _nodata(handle) if handle.details["type"] == "binary" else None
    if nodata is not None:
        slab[slab == nodata] = 0
    return slab


def _slab_starts(handle: WriteHandle) -> range:
    return range(0, handle.shape[-3], handle.chunks[-3])


def _quantise(values: np.ndarray) -> np.ndarray:
    """FRACTIONAL probabilities as stored in the SEG (highdicom's rounding)."""
    return np.around(values * float(MAX_FRACTIONAL)).astype(np.uint8)


def _binary_labels(handle: WriteHandle, top: int) -> list[str]:
    names = handle.details["class_names"]
    if names is not None:
        if top >= len(names):
            raise OutputError(f"{handle.path!r}: label {top} found but only {len(names)} class names")
        return [str(n) for n in names[1:]]
    return ["foreground"] if top <= 1 else [f"class {k}" for k in range(1, top + 1)]


def _fractional_segments(handle: WriteHandle) -> tuple[list[str], list[int]]:
    names = handle.details["class_names"]
    if len(handle.shape) == 3:
        label = names[1] if names is not None and len(names) == 2 else names[0] if names else "foreground"
        return [str(label)], []
    channels = list(range(handle.shape[0]))
    if names is not None and len(names) == handle.shape[0] and handle.shape[0] > 1:
        return [str(n) for n in names[1:]], channels[1:]
    return [f"class {k}" for k in channels], channels


def scan_store(handle: WriteHandle) -> Occupancy:
    """Check the stored values and find the frames holding each segment (one slab in memory at a time).

    Raises
    ------
    OutputError
        The store cannot be opened, a label has no class name, or a
        FRACTIONAL value is outside [0, 1] (or NaN).
    """
    arr = open_store(handle)
    nz = handle.shape[-3]
    if handle.details["type"] == "binary":
        found: list[np.ndarray] = []  # per slice: the labels present (sorted, without 0)
        for z0 in _slab_starts(handle):
            slab = _read_slab(handle, arr, z0)
            for plane in slab:
                counts = np.bincount(plane.ravel())
                found.append(np.flatnonzero(counts[1:]) + 1)
        top = max((int(f[-1]) for f in found if f.size), default=0)
        labels = _binary_labels(handle, top)
        present = np.zeros((len(labels), nz), dtype=bool)
        for k, values in enumerate(found):
            present[values - 1, k] = True
        return Occupancy(labels, present, present, [])
    labels, channels = _fractional_segments(handle)
    present = np.zeros((len(labels), nz), dtype=bool)
    touched = np.zeros_like(present)
    for z0 in _slab_starts(handle):
        slab = _read_slab(handle, arr, z0)
        if not np.all((slab >= 0) & (slab <= 1)):  # NaN fails too
            raise OutputError(f"{handle.path!r}: fractional SEG values must be probabilities in [0, 1]")
        stack = slab[channels] if channels else slab[None]
        z1 = z0 + stack.shape[1]
        touched[:, z0:z1] = stack.any(axis=(2, 3))
        present[:, z0:z1] = (_quantise(stack) > 0).any(axis=(2, 3))
    return Occupancy(labels, present, touched, channels)


def _encode(handle: WriteHandle, occ: Occupancy, slab: np.ndarray, segment: int, rows: np.ndarray) -> np.ndarray:
    """The frames of ``segment`` on slab planes ``rows``, as flat uint8 (0/1 for BINARY, 0..255 FRACTIONAL)."""
    if handle.details["type"] == "binary":
        return (slab[rows] == segment).view(np.uint8).ravel()
    plane = slab[occ.channels[segment - 1]] if occ.channels else slab
    return _quantise(plane[rows]).ravel()


def write_pixel_data(handle: WriteHandle, occ: Occupancy, frames: list[tuple[int, int]], out: BinaryIO) -> int:
    """Stream the Pixel Data of ``frames`` (``(segment number, slice index)``, in order) to ``out``.

    The store is read a slab at a time (a slab is read again only when the
    frame order returns to it, e.g. once per segment for the usual
    segment-major order); frames are encoded in batches of about
    :data:`BATCH_PIXELS` pixels.

    Returns
    -------
    int
        Bytes written (even).
    """
    arr = open_store(handle)
    thick = handle.chunks[-3]
    rows_cols = int(np.prod(handle.shape[-2:]))
    per_batch = max(1, BATCH_PIXELS // rows_cols)
    binary = handle.details["type"] == "binary"
    carry = np.empty(0, dtype=np.uint8)  # BINARY: bits not yet packed (fewer than 8)
    written = 0
    cached: tuple[int, np.ndarray] | None = None
    i = 0
    while i < len(frames):
        segment, k = frames[i]
        z0 = (k // thick) * thick
        run = [k - z0]
        while (i + len(run) < len(frames) and len(run) < per_batch and frames[i + len(run)][0] == segment
               and z0 <= frames[i + len(run)][1] < z0 + thick):
            run.append(frames[i + len(run)][1] - z0)
        if cached is None or cached[0] != z0:
            cached = None  # free the previous slab before reading the next
            cached = (z0, _read_slab(handle, arr, z0))
        values = _encode(handle, occ, cached[1], segment, np.asarray(run))
        if binary:
            bits = np.concatenate([carry, values]) if carry.size else values
            cut = bits.size - bits.size % 8
            chunk, carry = np.packbits(bits[:cut], bitorder="little"), bits[cut:].copy()
        else:
            chunk = values
        out.write(chunk.tobytes())
        written += chunk.size
        i += len(run)
    if carry.size:
        tail = np.packbits(carry, bitorder="little")
        out.write(tail.tobytes())
        written += tail.size
    if written % 2:
        out.write(b"\x00")
        written += 1
    return written


__all__ = ["Occupancy", "scan_store", "write_pixel_data"]
