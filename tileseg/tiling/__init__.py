"""Patch geometry: where the patches of an image lie and which chunk owns each."""

from .grid import AxisGrid, PatchGrid, make_grid

__all__ = ["AxisGrid", "PatchGrid", "make_grid"]
