"""Finalize step of the vector writer: join chunk pieces into objects, write the file."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import OutputError
from . import polygons as P
from .base import WriteHandle


@dataclass
class Feature:
    """One object: its value, polygons in pixel coordinates, first raster index and pixel area."""

    value: int
    polys: list[list[np.ndarray]]
    first: int
    pixels: float


def _read_pieces(name: str) -> list[tuple[int, list[np.ndarray]]]:
    flat = np.load(name)
    out, k = [], 1
    for _ in range(int(flat[0])):
        value, n_rings = int(flat[k]), int(flat[k + 1])
        k += 2
        rings = []
        for _ in range(n_rings):
            n = int(flat[k])
            rings.append(flat[k + 1 : k + 1 + 2 * n].reshape(n, 2))
            k += 1 + 2 * n
        out.append((value, rings))
    return out


def _border_keys(rings: list[np.ndarray], xs: np.ndarray, ys: np.ndarray) -> list[tuple[int, ...]]:
    """Unit edges of ``rings`` lying on an interior chunk border line."""
    segs = P._edges(rings, xs, ys)
    vertical = segs[:, 0] == segs[:, 2]
    on = np.where(vertical, np.isin(segs[:, 0], xs), np.isin(segs[:, 1], ys))
    return [tuple(s) for s in segs[on].tolist()]


def _find(parent: list[int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def build_features(handle: WriteHandle) -> list[Feature]:
    """Every object of the image, merged across chunks, in raster order of its first pixel."""
    sizes = handle.details["chunk_sizes"]
    ys = np.cumsum(sizes[0])[:-1]
    xs = np.cumsum(sizes[1])[:-1]
    width = handle.shape[1]
    pieces: list[tuple[int, list[np.ndarray]]] = []
    for i, j in np.ndindex(len(sizes[0]), len(sizes[1])):
        name = os.path.join(handle.target, "pieces", f"{i}_{j}.npy")
        if not os.path.isfile(name):
            raise OutputError(f"{handle.path!r}: pieces of chunk ({i}, {j}) are missing; the write task did not finish")
        pieces.extend(_read_pieces(name))
    parent = list(range(len(pieces)))
    owner: dict[tuple[int, ...], int] = {}
    for p, (value, rings) in enumerate(pieces):
        touches = any(np.isin(r[:, 0], xs).any() or np.isin(r[:, 1], ys).any() for r in rings)
        if not touches:
            continue
        for key in _border_keys(rings, xs, ys):
            other = owner.get((key[2], key[3], key[0], key[1]))
            if other is not None and pieces[other][0] == value:
                a, b = _find(parent, p), _find(parent, other)
                if a != b:
                    parent[max(a, b)] = min(a, b)
            owner[key] = p
    groups: dict[int, list[int]] = {}
    for p in range(len(pieces)):
        groups.setdefault(_find(parent, p), []).append(p)
    features = []
    for members in groups.values():
        value = pieces[members[0]][0]
        if len(members) == 1:
            polys = [pieces[members[0]][1]]
        else:
            polys = P.merge([pieces[m][1] for m in members], xs, ys)
        shells = [poly[0] for poly in polys]
        first = min(int(s[:, 1].min()) * width + int(s[s[:, 1] == s[:, 1].min(), 0].min()) for s in shells)
        pixels = sum(P.signed_area(r) for poly in polys for r in poly)
        features.append(Feature(value, polys, first, pixels))
    features.sort(key=lambda f: f.first)
    return features


def write_features(handle: WriteHandle, features: list[Feature], out: str, status: dict[str, Any]) -> None:
    """Write ``features`` to ``out`` (GPKG or GeoJSON) with the completion record."""
    import pyogrio.raw

    d = handle.details
    t = d["transform"]
    det = abs(t[0] * t[4] - t[1] * t[3])
    tol = d["simplify_tolerance"]
    names = d["class_names"]
    multi = any(len(f.polys) > 1 for f in features)
    geoms = np.empty(len(features), dtype=object)
    for k, f in enumerate(features):
        polys = [[P.simplify(P.apply_affine(r, t), tol) for r in poly] for poly in f.polys]
        geoms[k] = P.to_wkb(polys, multi)
    values = np.array([f.value for f in features], dtype=np.int64)
    cls = np.array([names[v] if names and 0 <= v < len(names) else str(v) for v in values.tolist()], dtype=object)
    fields = ["class", "class_id", "area", "label"]
    field_data = [cls, values, np.array([f.pixels * det for f in features], dtype=np.float64),
                  np.arange(1, len(features) + 1, dtype=np.int64)]
    kwargs: dict[str, Any] = {}
    if d["driver"] == "GPKG":
        kwargs["layer_metadata"] = {"TILESEG_STATUS": "complete", "TILESEG_RUN_ID": status["run_id"],
                                    "TILESEG_COMPLETED_AT": status["completed_at"], "TILESEG_INFO": json.dumps(status)}
    else:
        kwargs["layer_options"] = {"FOREIGN_MEMBERS_COLLECTION": json.dumps({"tileseg": status})}
    pyogrio.raw.write(out, geoms, field_data, fields, layer=d["layer"], driver=d["driver"],
                      geometry_type="MultiPolygon" if multi else "Polygon", crs=d["crs"], **kwargs)
