"""Shared pytest setup for the whole suite (kept minimal)."""

from __future__ import annotations


def pytest_configure(config):
    # Tests mirror the package (tests/readers/test_zarr.py and tests/writers/test_zarr.py), without
    # __init__.py files: same-named modules need importlib import mode. Prefer setting
    # ``--import-mode=importlib`` in pyproject's addopts; this covers runs without it.
    if config.getoption("importmode") == "prepend":
        config.option.importmode = "importlib"
