"""Input fingerprints: a content change in place is seen; reading is not a change."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import zarr

from tileseg.fingerprint import input_fingerprint


def _store(path, value=1.0):
    a = zarr.create_array(str(path), shape=(8, 8), chunks=(4, 4), dtype="float32", overwrite=True)
    a[:] = value
    return a


def test_folder_changes_in_place_are_seen(tmp_path):
    a = _store(tmp_path / "s.zarr")
    first = input_fingerprint(str(tmp_path / "s.zarr"))
    assert first.startswith("tree:") and first == input_fingerprint(str(tmp_path / "s.zarr") + "/")
    _ = a[:]  # reading changes nothing
    assert input_fingerprint(str(tmp_path / "s.zarr")) == first
    chunk = next(p for p in (tmp_path / "s.zarr").rglob("*") if p.is_file() and p.name != "zarr.json")
    st = chunk.stat()
    a[0:4, 0:4] = 2.0  # one chunk rewritten in place
    os.utime(chunk, ns=(st.st_atime_ns, st.st_mtime_ns + 1000))
    assert input_fingerprint(str(tmp_path / "s.zarr")) != first


def test_checksum_follows_bytes_not_times(tmp_path):
    p = tmp_path / "x.bin"
    p.write_bytes(b"abc" * 1000)
    fp = input_fingerprint(str(p), checksum=True)
    assert fp == "sha256:" + hashlib.sha256(b"abc" * 1000).hexdigest()
    os.utime(p, (1, 1))
    assert input_fingerprint(str(p), checksum=True) == fp
    assert input_fingerprint(str(p)) == f"stat:3000:{1_000_000_000}"
    _store(tmp_path / "d.zarr")
    before = input_fingerprint(str(tmp_path / "d.zarr"), checksum=True)
    for f in (tmp_path / "d.zarr").rglob("*"):
        os.utime(f, (5, 5))
    assert input_fingerprint(str(tmp_path / "d.zarr"), checksum=True) == before
    _store(tmp_path / "d.zarr", 3.0)
    assert input_fingerprint(str(tmp_path / "d.zarr"), checksum=True) != before


def test_series_items_use_their_container_and_missing_inputs_never_match(tmp_path):
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "1.dcm").write_bytes(b"x")
    assert input_fingerprint(f"{tmp_path}/study#1.2.3") == input_fingerprint(str(tmp_path / "study"))
    assert input_fingerprint(str(tmp_path / "gone")).startswith("unknown:")


def test_remote_objects_by_what_the_store_reports():
    import fsspec

    fs = fsspec.filesystem("memory")
    arr = zarr.create_array("memory://fp/s.zarr", shape=(8,), chunks=(4,), dtype="uint8")
    arr[:] = 1
    first = input_fingerprint("memory://fp/s.zarr")
    summed = input_fingerprint("memory://fp/s.zarr", checksum=True)
    assert first.startswith("remote:3:") and first == input_fingerprint("memory://fp/s.zarr")
    arr[0:4] = np.arange(4, dtype="uint8") + 7  # same sizes: the store's per-object times and the bytes tell
    assert input_fingerprint("memory://fp/s.zarr") != first
    assert input_fingerprint("memory://fp/s.zarr", checksum=True) != summed
    fs.rm("/fp", recursive=True)
