"""Bridges to other array libraries (xarray), so tileseg fits code that already lives there."""
