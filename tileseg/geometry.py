"""Pure geometry of an image grid: spacing, origin, direction, CRS transform.

Conventions (stated once, used everywhere)
------------------------------------------
* Axis order is tileseg's: spatial axes ``(z, y, x)`` (or ``(y, x)``), the same
  order as the array. ``spacing[i]`` and ``origin[i]`` belong to array axis ``i``.
* ``origin`` is the physical position of the **centre** of the first pixel
  (OME-Zarr ``translation``, DICOM ``ImagePositionPatient``, NIfTI/ITK origin).
* ``direction`` is an ``n x n`` matrix whose row ``i`` is the physical unit
  vector of array axis ``i`` (identity: axis ``i`` runs along physical axis ``i``).
  Physical position of pixel index ``p``: ``origin + (p * spacing) @ direction``.
* ``transform`` is a GDAL/rasterio affine ``(a, b, c, d, e, f)`` for the last two
  axes: ``x = a * col + b * row + c``, ``y = d * col + e * row + f``, where
  ``(col, row) = (0, 0)`` is the **corner** of the first pixel (rasterio's
  convention). North-up rasters have ``b = d = 0`` and ``e < 0``.

The conversions between the corner-based affine and the centre-based
spacing/origin live here and nowhere else (:func:`affine_from_grid`,
:func:`grid_from_affine`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

Affine6 = tuple[float, float, float, float, float, float]


def identity(n: int) -> tuple[tuple[float, ...], ...]:
    """The ``n x n`` identity direction matrix.

    >>> identity(2)
    ((1.0, 0.0), (0.0, 1.0))
    """
    return tuple(tuple(1.0 if i == j else 0.0 for j in range(n)) for i in range(n))


def check_direction(direction: Any, n: int) -> tuple[tuple[float, ...], ...]:
    """Validate an ``n x n`` direction matrix of finite numbers with unit-length rows.

    Raises
    ------
    ValueError
        Wrong shape, non-finite entries, or rows that are not unit vectors.
    """
    try:
        rows = tuple(tuple(float(v) for v in row) for row in direction)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"direction must be an {n}x{n} matrix of numbers, got {direction!r}") from exc
    if len(rows) != n or any(len(r) != n for r in rows):
        raise ValueError(f"direction must be an {n}x{n} matrix, got {direction!r}")
    for r in rows:
        if not all(math.isfinite(v) for v in r) or abs(math.hypot(*r) - 1.0) > 1e-4:
            raise ValueError(f"direction rows must be finite unit vectors, got {direction!r}")
    return rows


def check_affine(transform: Any) -> Affine6:
    """Validate a 6-number affine ``(a, b, c, d, e, f)`` (an ``affine.Affine`` works too).

    Raises
    ------
    ValueError
        Not 6 finite numbers, or a degenerate (non-invertible) matrix.
    """
    values = tuple(transform)[:6] if transform is not None else ()
    try:
        t = tuple(float(v) for v in values)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"transform must be 6 numbers (a, b, c, d, e, f), got {transform!r}") from exc
    if len(t) != 6 or not all(math.isfinite(v) for v in t):
        raise ValueError(f"transform must be 6 finite numbers (a, b, c, d, e, f), got {transform!r}")
    a, b, _, d, e, _ = t
    if a * e - b * d == 0:
        raise ValueError(f"transform {t!r} is degenerate (its determinant is 0)")
    return t  # type: ignore[return-value]


def affine_from_grid(spacing: Sequence[float], origin: Sequence[float]) -> Affine6:
    """North-up affine of the last two axes from centre-based ``(y, x)`` spacing and origin.

    Rows point south (``e = -spacing_y``), the usual layout of a raster whose
    first row is its northern edge.

    >>> affine_from_grid((30.0, 30.0), (4000015.0, 500015.0))
    (30.0, 0.0, 500000.0, 0.0, -30.0, 4000030.0)
    """
    sy, sx = (float(v) for v in spacing[-2:])
    oy, ox = (float(v) for v in origin[-2:])
    return (sx, 0.0, ox - sx / 2, 0.0, -sy, oy + sy / 2)


def grid_from_affine(transform: Any) -> tuple[tuple[float, float], tuple[float, float]]:
    """Centre-based ``(y, x)`` spacing and origin of a north-up affine (inverse of :func:`affine_from_grid`).

    Spacing is the (positive) length of each pixel edge and the origin the
    centre of the first pixel; for rotated, sheared or south-up affines the
    affine itself stays authoritative.

    >>> grid_from_affine((30.0, 0.0, 500000.0, 0.0, -30.0, 4000030.0))
    ((30.0, 30.0), (4000015.0, 500015.0))
    """
    a, b, c, d, e, f = check_affine(transform)
    sx = math.hypot(a, d)
    sy = math.hypot(b, e)
    cx = c + a / 2 + b / 2
    cy = f + d / 2 + e / 2
    return (sy, sx), (cy, cx)


# --------------------------------------------------------------------------- 3D patient space

#: Patient coordinates are DICOM's LPS (x to the patient's Left, y to Posterior, z to Superior).
#: An Image lists physical coordinates in its own axis order, ``(z, y, x)``: a point ``(S, P, L)``.
#: NIfTI's RAS world is ``diag(-1, -1, 1)`` times LPS (the one place that conversion lives).
RAS_FROM_LPS = ((-1.0, 0.0, 0.0), (0.0, -1.0, 0.0), (0.0, 0.0, 1.0))


def world_affine(spacing: Sequence[float], origin: Sequence[float], direction: Any) -> list[list[float]]:
    """4x4 matrix mapping an index ``(x, y, z, 1)`` (column, row, slice) to LPS ``(x, y, z, 1)``.

    ``spacing``/``origin``/``direction`` are an Image's 3D geometry in ``(z, y, x)`` order
    (``origin`` the centre of voxel 0, ``direction`` rows the unit vectors of the array axes).
    This is the affine NIfTI and ITK use, before the RAS flip.

    >>> world_affine((3.0, 0.5, 0.5), (-100.0, 20.0, 10.0), ((1, 0, 0), (0, 1, 0), (0, 0, 1)))[0]
    [0.5, 0.0, 0.0, 10.0]
    """
    d = [list(map(float, row)) for row in direction]
    out = [[0.0] * 4 for _ in range(4)]
    out[3][3] = 1.0
    for col, axis in enumerate((2, 1, 0)):  # index column x, y, z = array axes 2, 1, 0
        for row in range(3):  # LPS component row = tileseg physical component 2 - row
            out[row][col] = d[axis][2 - row] * float(spacing[axis])
    for row in range(3):
        out[row][3] = float(origin[2 - row])
    return out


def geometry_from_world_affine(affine: Any) -> tuple[tuple[float, ...], tuple[float, ...], tuple[tuple[float, ...], ...]]:
    """``(spacing, origin, direction)`` in ``(z, y, x)`` order from a 4x4 index->LPS affine (inverse of :func:`world_affine`).

    >>> geometry_from_world_affine(world_affine((3.0, 0.5, 0.5), (-100.0, 20.0, 10.0), ((1, 0, 0), (0, 1, 0), (0, 0, 1))))
    ((3.0, 0.5, 0.5), (-100.0, 20.0, 10.0), ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)))
    """
    a = [[float(v) for v in row] for row in affine]
    spacing, direction = [0.0] * 3, [[0.0] * 3 for _ in range(3)]
    for col, axis in enumerate((2, 1, 0)):
        vec = [a[row][col] for row in range(3)]  # LPS components of this index axis
        norm = math.sqrt(sum(v * v for v in vec))
        if norm == 0:
            raise ValueError(f"affine {affine!r} has a zero column")
        spacing[axis] = norm
        direction[axis] = [vec[2 - k] / norm for k in range(3)]  # back to (z, y, x) component order
    origin = tuple(a[2 - k][3] for k in range(3))
    return tuple(spacing), origin, tuple(tuple(r) for r in direction)  # type: ignore[return-value]


def ras_from_lps_affine(affine: Any) -> list[list[float]]:
    """A 4x4 affine to LPS turned into the same affine to RAS (NIfTI), or back (the flip is its own inverse).

    >>> ras_from_lps_affine(world_affine((1, 1, 1), (3.0, 2.0, 1.0), ((1, 0, 0), (0, 1, 0), (0, 0, 1))))[0]
    [-1.0, 0.0, 0.0, -1.0]
    """
    a = [[float(v) for v in row] for row in affine]
    if len(a) != 4 or any(len(r) != 4 for r in a):
        raise ValueError(f"expected a 4x4 affine, got {affine!r}")
    flip = [list(row) + [0.0] for row in RAS_FROM_LPS] + [[0.0, 0.0, 0.0, 1.0]]
    return [[sum(flip[i][k] * a[k][j] for k in range(4)) for j in range(4)] for i in range(4)]


#: The inverse flip is the same matrix.
lps_from_ras_affine = ras_from_lps_affine
