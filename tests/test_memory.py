"""The CLI's allocator setting: applied on glibc, skippable, never overriding the user's."""

from __future__ import annotations

import sys

import pytest

from tileseg.memory import tune_allocator


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc setting")
def test_tune_allocator_respects_opt_out_and_user_setting(monkeypatch):
    monkeypatch.setenv("TILESEG_MALLOC_TUNING", "0")
    assert tune_allocator() is False
    monkeypatch.delenv("TILESEG_MALLOC_TUNING")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert tune_allocator() is False
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    import platform

    if platform.libc_ver()[0] == "glibc":
        assert tune_allocator() is True
