"""Helpers shipped for tests and plugin authors: synthetic images with ground truth.

Only numpy is imported here; :func:`write_blobs_zarr` imports zarr when called.
"""

from __future__ import annotations

from .synthetic import BlobScene, blobs_2d, blobs_3d, dice, make_scene, render, write_blobs_zarr

__all__ = ["BlobScene", "blobs_2d", "blobs_3d", "dice", "make_scene", "render", "write_blobs_zarr"]
