"""Stitching: blending weights and overlap-add of patch predictions into chunks."""
