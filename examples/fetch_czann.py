"""Fetch the napari-czann-segment 0.1.2 nucleus model and its image into the tileseg data cache.

``pip download --no-deps napari-czann-segment==0.1.2`` (checked against its
SHA-256), then the ONNX network, its XML and ``PGC_20X.czi`` are extracted to
``$TILESEG_DATA_CACHE/czann`` (default ``~/.cache/tileseg/realdata/czann``).
Nothing is committed to the repository.

Run::

    python examples/fetch_czann.py
"""

from __future__ import annotations

from tileseg.testing.czann import fetch_czann

if __name__ == "__main__":
    m = fetch_czann()
    print(f"model: {m.onnx}\nxml:   {m.xml}\nimage: {m.czi}")
    print(f"tile {m.tile}, border {m.border} px per side, classes {m.classes}, "
          f"scale by bit depth: {m.scale_by_bitdepth}")
