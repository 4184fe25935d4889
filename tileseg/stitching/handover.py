"""What an owner task hands over: its block's interior already reduced, K-channel scores only where blocks meet.

An owner block's patches spill only forwards (a patch belongs to the block
holding its start corner), so the pixels of block ``t`` that another owner
also writes to lie in a strip along the leading faces of ``t``. The rest,
the *interior*, is final as soon as owner ``t`` has added its last patch: the
owner reduces it there (argmax, or normalisation and activation), on the
model's device for torch models, and only the reduced interior plus the
``K``-channel strips and spill-over pieces leave the task (cross to the host
on a GPU). The final task of the block sums the strips from every owner
and reduces them (:mod:`.reduce`).

Everything here is pure geometry on boxes: tuples of ``(start, stop)`` per axis.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Box = tuple[tuple[int, int], ...]

__all__ = ["Handover", "OwnPiece", "OwnerResult", "interior", "box_minus"]


@dataclass(frozen=True)
class Handover:
    """How an owner task splits its accumulator (built with the graph).

    Attributes
    ----------
    block : Box
        The owner's own output block.
    interior : Box or None
        The part of ``block`` no other owner writes to (reduced by the owner), or None.
    targets : tuple of Box
        The other output blocks its patches spill into.
    output : str
        ``labels``, ``logits`` or ``probabilities``.
    dtype : str
        Label dtype (for ``labels``).
    """

    block: Box
    interior: Box | None
    targets: tuple[Box, ...]
    output: str
    dtype: str


@dataclass(frozen=True)
class OwnPiece:
    """An owner's contribution to its own block: the reduced interior and ``K x box`` parts around it."""

    interior: Box | None
    reduced: np.ndarray | None  # labels (interior shape) or normalised scores (K x interior)
    parts: tuple[tuple[Box, np.ndarray], ...]

    def __sizeof__(self) -> int:  # what Dask's memory accounting sees (``dask.sizeof`` falls back to it)
        arrays = [a for _, a in self.parts] + ([self.reduced] if self.reduced is not None else [])
        return 64 + held_bytes(arrays)


@dataclass(frozen=True)
class OwnerResult:
    """An owner task's result: its own piece and one ``(box, K x box)`` spill piece per other target block."""

    region: Box
    own: OwnPiece
    spill: dict[Box, tuple[Box, np.ndarray]]

    def __sizeof__(self) -> int:
        own = [a for _, a in self.own.parts] + ([self.own.reduced] if self.own.reduced is not None else [])
        return 64 + held_bytes(own + [a for _, a in self.spill.values()])


def held_bytes(arrays: list[np.ndarray]) -> int:
    """Bytes that ``arrays`` keep alive: a view counts the whole array it was cut from, once.

    Own strips handed over as views of a host accumulator (only where they are
    most of it, see :func:`tileseg.stitching.overlap_add.keep_whole`) keep the
    whole ``K x region`` buffer alive until the block's final task has run.
    """
    roots: dict[int, int] = {}
    for a in arrays:
        root = a
        while isinstance(root.base, np.ndarray):
            root = root.base
        roots[id(root)] = root.nbytes
    return sum(roots.values())


def intersect(a: Box, b: Box) -> Box | None:
    """Intersection of two boxes, or None when empty."""
    out = tuple((max(x0, y0), min(x1, y1)) for (x0, x1), (y0, y1) in zip(a, b))
    return None if any(lo >= hi for lo, hi in out) else out


def interior(block: Box, own_region: Box | None, other_regions: Sequence[Box]) -> Box | None:
    """A box of ``block`` that the owner covers and no other owner's region touches (None if empty).

    Other owners' regions reach into ``block`` only from the lower side along
    at least one axis where they start before it, so cutting the block's
    leading strip up to the furthest such reach, per axis, leaves pixels only
    ``own_region`` covers.

    Examples
    --------
    >>> interior(((0, 10), (10, 20)), ((0, 14), (12, 26)), [((0, 10), (4, 14))])
    ((0, 10), (14, 20))
    """
    if own_region is None:
        return None
    lo = [a for a, _ in block]
    for reg in other_regions:
        before = [d for d, ((r0, _), (b0, _)) in enumerate(zip(reg, block)) if r0 < b0]
        if not before:  # not an earlier owner (cannot happen on a patch grid): give up the interior
            return None
        for d in before:  # one axis would do for a diagonal neighbour; on a grid its reach equals the face's
            lo[d] = max(lo[d], reg[d][1])
    box = tuple((a, b) for a, (_, b) in zip(lo, block))
    return intersect(box, own_region)


def box_minus(box: Box, inner: Box | None) -> list[Box]:
    """Disjoint boxes covering ``box`` minus ``inner`` (a box inside it, or None: all of ``box``).

    >>> box_minus(((0, 4), (0, 4)), ((1, 4), (2, 4)))
    [((0, 1), (0, 4)), ((1, 4), (0, 2))]
    """
    if inner is None:
        return [box]
    out = []
    head = list(box)
    for d, ((a, b), (i0, i1)) in enumerate(zip(box, inner)):
        if a < i0:
            out.append(tuple(head[:d]) + ((a, i0),) + tuple(box[d + 1:]))
        if i1 < b:
            out.append(tuple(head[:d]) + ((i1, b),) + tuple(box[d + 1:]))
        head[d] = (i0, i1)
    return out
