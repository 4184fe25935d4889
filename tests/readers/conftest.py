"""Fixtures shared by the reader tests."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest


@pytest.fixture
def spy_dcmread(monkeypatch) -> Callable[[], list[str]]:
    """Call it to record, from then on, the paths ``pydicom.dcmread`` opens (in order; pydicom still reads them)."""
    import pydicom

    def start() -> list[str]:
        opened: list[str] = []
        real = pydicom.dcmread

        def spy(path, *args, **kwargs):
            opened.append(os.fspath(path))
            return real(path, *args, **kwargs)

        monkeypatch.setattr(pydicom, "dcmread", spy)
        return opened

    return start
