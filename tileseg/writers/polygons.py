"""Pixel polygons on the integer lattice: per-chunk pieces, exact merging across chunks, WKB.

Coordinates here are pixel-corner coordinates ``(x, y)`` = ``(col, row)`` of the
whole image (y down). Every ring is oriented like the boundary of a single
pixel traversed ``(x, y) -> (x+1, y) -> (x+1, y+1) -> (x, y+1)``: exterior
rings have positive shoelace area, holes negative, and the region is always
to the right of an edge's direction (``(-dy, dx)`` side).

Merging a component cut by chunk borders needs no geometry library: the
pieces' boundary edges that lie on a chunk border are split into unit edges;
a unit edge and its reverse (the same border seen from both pieces) cancel;
the remaining edges are traced back into rings, turning towards the region
first at a vertex with two ways out, so rings are simple and only touch at
points (4-connectivity: diagonal pixels are not joined). The result covers
exactly the component's pixels.
"""

from __future__ import annotations

import struct
from collections import defaultdict
from typing import Any

import numpy as np

Ring = np.ndarray  # (n, 2) int64 closed ring (first point repeated at the end)


def signed_area(ring: np.ndarray) -> float:
    """Shoelace area (positive for exterior rings in this module's orientation)."""
    x, y = ring[:, 0].astype(np.float64), ring[:, 1].astype(np.float64)
    return float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1])) / 2.0


def oriented(ring: np.ndarray, exterior: bool) -> np.ndarray:
    """``ring`` reversed if needed so its area is positive (exterior) or negative (hole)."""
    return ring if (signed_area(ring) > 0) == exterior else ring[::-1].copy()


def chunk_pieces(block: np.ndarray, valid: np.ndarray, offset: tuple[int, int]) -> list[tuple[int, list[Ring]]]:
    """4-connected regions of equal value in one chunk as ``(value, rings)`` (exterior first).

    ``valid`` marks pixels to polygonise (not background, not nodata).
    Coordinates are global pixel corners (``offset`` = ``(row0, col0)``).
    """
    from rasterio.features import shapes
    from rasterio.transform import Affine

    out = []
    if not valid.any():
        return out
    # x shifted by one so the transform is never the identity (rasterio then warns
    # NotGeoreferencedWarning; catch_warnings is not thread-safe); removed below.
    t = Affine(1, 0, offset[1] + 1, 0, 1, offset[0])
    shift = np.array([1, 0], dtype=np.int64)
    for geom, value in shapes(block, mask=valid, connectivity=4, transform=t):
        rings = [oriented(np.rint(np.asarray(r)).astype(np.int64) - shift, i == 0)
                 for i, r in enumerate(geom["coordinates"])]
        out.append((int(value), rings))
    return out


def _edges(rings: list[Ring], xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Segments ``(x0, y0, x1, y1)`` of ``rings``; those on a chunk border line split into unit edges."""
    segs = np.concatenate([np.concatenate([r[:-1], r[1:]], axis=1) for r in rings])
    vertical = segs[:, 0] == segs[:, 2]
    on_border = np.where(vertical, np.isin(segs[:, 0], xs), np.isin(segs[:, 1], ys))
    keep = [segs[~on_border]]
    for x0, y0, x1, y1 in segs[on_border]:
        n = abs(x1 - x0) + abs(y1 - y0)
        dx, dy = np.sign(x1 - x0), np.sign(y1 - y0)
        k = np.arange(n)
        keep.append(np.stack([x0 + dx * k, y0 + dy * k, x0 + dx * (k + 1), y0 + dy * (k + 1)], axis=1))
    return np.concatenate(keep)


def _cancel(segs: np.ndarray) -> np.ndarray:
    """Drop every edge whose reverse is present (a border shared by two pieces)."""
    fwd = {tuple(s) for s in segs.tolist()}
    return np.array([s for s in segs.tolist() if (s[2], s[3], s[0], s[1]) not in fwd], dtype=np.int64).reshape(-1, 4)


def _trace(segs: np.ndarray) -> list[Ring]:
    """Closed rings from directed axis-parallel segments (collinear vertices removed)."""
    out_of: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, (x0, y0, _, _) in enumerate(segs.tolist()):
        out_of[(x0, y0)].append(i)
    used = np.zeros(len(segs), dtype=bool)
    rings = []
    for first in range(len(segs)):
        if used[first]:
            continue
        start = tuple(segs[first, :2].tolist())
        pts = [start]
        cur = first
        while True:
            used[cur] = True
            x0, y0, x1, y1 = segs[cur].tolist()
            v = (x1, y1)
            pts.append(v)
            dx, dy = np.sign(x1 - x0), np.sign(y1 - y0)
            choices = [i for i in out_of[v] if not used[i] or i == first]
            if not choices:  # pragma: no cover - inconsistent input
                raise ValueError(f"open boundary at {v}")
            # towards the region first (same pixel), then straight on, then away
            pref = {(-dy, dx): 0, (dx, dy): 1, (dy, -dx): 2}
            cur = min(choices, key=lambda i: pref.get(
                (int(np.sign(segs[i, 2] - segs[i, 0])), int(np.sign(segs[i, 3] - segs[i, 1]))), 3))
            if cur == first:
                break
        rings.append(_drop_collinear(np.array(pts, dtype=np.int64)))
    return rings


def _drop_collinear(ring: np.ndarray) -> np.ndarray:
    pts = ring[:-1]
    prev, nxt = np.roll(pts, 1, axis=0), np.roll(pts, -1, axis=0)
    cross = (pts[:, 0] - prev[:, 0]) * (nxt[:, 1] - pts[:, 1]) - (pts[:, 1] - prev[:, 1]) * (nxt[:, 0] - pts[:, 0])
    pts = pts[cross != 0]
    return np.concatenate([pts, pts[:1]])


def merge(pieces: list[list[Ring]], xs: np.ndarray, ys: np.ndarray) -> list[list[Ring]]:
    """Polygons (exterior ring, then its holes) of the union of pieces of one component.

    ``xs``/``ys``: the interior chunk border lines (pixel corner coordinates).
    """
    segs = _cancel(_edges([r for rings in pieces for r in rings], xs, ys))
    rings = _trace(segs)
    shells = [r for r in rings if signed_area(r) > 0]
    holes = [r for r in rings if signed_area(r) < 0]
    polys: list[list[Ring]] = [[s] for s in shells]
    if len(shells) == 1:
        polys[0].extend(holes)
        return polys
    areas = [signed_area(s) for s in shells]
    for h in holes:
        (x0, y0), (x1, y1) = h[0], h[1]
        dx, dy = np.sign(x1 - x0), np.sign(y1 - y0)
        p = (x0 + 0.5 * dx - 0.5 * dy, y0 + 0.5 * dy + 0.5 * dx)  # a region pixel centre next to the hole
        inside = [i for i, s in enumerate(shells) if _contains(s, p)]
        polys[min(inside, key=lambda i: areas[i])].append(h)
    return polys


def _contains(ring: np.ndarray, p: tuple[float, float]) -> bool:
    """Even-odd point in polygon (``p`` never lies on a lattice edge)."""
    x, y = ring[:-1, 0], ring[:-1, 1]
    x2, y2 = ring[1:, 0], ring[1:, 1]
    crosses = (y > p[1]) != (y2 > p[1])
    with np.errstate(divide="ignore", invalid="ignore"):
        xi = x + (p[1] - y) * (x2 - x) / (y2 - y)
    return bool(np.count_nonzero(crosses & (p[0] < xi)) % 2)


def simplify(ring: np.ndarray, tolerance: float) -> np.ndarray:
    """Douglas-Peucker on a closed ring (float coordinates); fewer than 4 points -> the ring unchanged."""
    if tolerance <= 0 or len(ring) <= 4:
        return ring
    keep = np.zeros(len(ring), dtype=bool)
    far = int(np.argmax(np.hypot(*(ring - ring[0]).T)))
    keep[[0, far, len(ring) - 1]] = True
    stack = [(0, far), (far, len(ring) - 1)]
    while stack:
        i, j = stack.pop()
        if j <= i + 1:
            continue
        a, b = ring[i], ring[j]
        seg = b - a
        pts = ring[i + 1 : j] - a
        norm = np.hypot(*seg)
        d = np.abs(seg[0] * pts[:, 1] - seg[1] * pts[:, 0]) / norm if norm else np.hypot(pts[:, 0], pts[:, 1])
        k = int(np.argmax(d))
        if d[k] > tolerance:
            keep[i + 1 + k] = True
            stack += [(i, i + 1 + k), (i + 1 + k, j)]
    out = ring[keep]
    return out if len(out) >= 4 else ring


def to_wkb(polys: list[list[np.ndarray]], multi: bool) -> bytes:
    """Little-endian WKB Polygon (one polygon, ``multi`` false) or MultiPolygon."""

    def polygon(rings: list[np.ndarray]) -> bytes:
        parts = [struct.pack("<BII", 1, 3, len(rings))]
        for r in rings:
            parts.append(struct.pack("<I", len(r)))
            parts.append(np.ascontiguousarray(r, dtype="<f8").tobytes())
        return b"".join(parts)

    if not multi:
        return polygon(polys[0])
    return struct.pack("<BII", 1, 6, len(polys)) + b"".join(polygon(p) for p in polys)


def apply_affine(ring: np.ndarray, t: Any) -> np.ndarray:
    """Map pixel-corner ``(x, y)`` through an affine ``(a, b, c, d, e, f)``."""
    a, b, c, d, e, f = t
    x, y = ring[:, 0].astype(np.float64), ring[:, 1].astype(np.float64)
    return np.stack([a * x + b * y + c, d * x + e * y + f], axis=1)
