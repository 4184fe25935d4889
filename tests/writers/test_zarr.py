"""Zarr writer: round trips, OME label output, recorded completion, chunk alignment, idempotence."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections import Counter

import dask
import dask.array as da
import numpy as np
import pytest
import zarr

from tileseg.errors import ConfigError, OutputError
from tileseg.image import Image
from tileseg.readers import open_image
from tileseg.writers import get_writer, is_complete
from tileseg.writers.zarr import ZarrWriter, read_status

RNG = np.random.default_rng(1)


def _img(data, axes=None, **kw):
    """An Image around ``data`` (default axes: y, x; c, y, x for 3-D arrays)."""
    from tileseg.image import default_axes

    return Image(data=data, axes=axes or default_axes(data.ndim, 2), **kw)


def _tree_digest(root):
    """Hash of every file (relative path and bytes) under ``root``."""
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(root)):
        for f in sorted(files):
            full = os.path.join(dirpath, f)
            h.update(os.path.relpath(full, root).encode())
            with open(full, "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_round_trip_data_axes_spacing_geometry(tmp_path, zarr_format):
    ref = RNG.integers(0, 7, size=(3, 45, 38), dtype=np.uint16)
    data = da.from_array(ref, chunks=(1, 16, 16))
    image = _img(
        data,
        ("c", "y", "x"),
        spacing=(0.5, 0.25),
        origin=(10.0, -3.0),
        units=("micrometer", "micrometer"),
        direction=((0.0, 1.0), (1.0, 0.0)),
        crs="EPSG:32633",
        transform=(0.25, 0.0, -3.125, 0.0, -0.5, 10.25),
        nodata=65535,
        attrs={"site": "A7", "multiscales": "dropped"},
        reader_info={"zarr_format": 99, "chunks": (7, 7)},
        source="in.zarr",
    )
    out = str(tmp_path / "out.zarr")
    job = get_writer("zarr").write(image, out, options={"zarr_format": zarr_format, "attrs": {"classes": ["a", "b"]}})
    assert job.done and is_complete(out)
    img = open_image(out)
    np.testing.assert_array_equal(img.data.compute(), ref)
    assert img.axes == ("c", "y", "x")
    assert img.spacing == (0.5, 0.25) and img.origin == (10.0, -3.0)
    assert img.units == ("micrometer", "micrometer")
    assert img.direction == ((0.0, 1.0), (1.0, 0.0))
    assert img.crs == "EPSG:32633" and img.transform == (0.25, 0.0, -3.125, 0.0, -0.5, 10.25)
    assert img.nodata == 65535
    assert img.reader_info["zarr_format"] == zarr_format  # the reader's own facts, not the input's
    assert img.reader_info["ome"]["version"] == ("0.4" if zarr_format == 2 else "0.5")
    assert img.attrs == {"site": "A7", "classes": ["a", "b"]}  # reserved keys and tileseg's own are not attrs
    status = img.reader_info["tileseg"]
    assert status["source"] == "in.zarr" and status["geometry"]["axes"] == ["c", "y", "x"]
    raw = dict(zarr.open_group(out, mode="r").attrs)
    assert "image-label" not in raw and "image-label" not in raw.get("ome", {})
    # only the final path is left: no partial sibling
    assert sorted(os.listdir(tmp_path)) == ["out.zarr"]


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ome_input_gives_ome_image_label_of_same_version(tmp_path, version):
    spatial = (12, 20, 16)
    src = da.zeros((2,) + spatial, chunks=(1, 6, 10, 8), dtype=np.float32)
    ome_meta = {"version": version, "multiscales": {}, "level": 0}
    like = _img(src, ("c", "z", "y", "x"), spacing=(2.0, 0.5, 0.5), reader_info={"ome": ome_meta})
    labels = (
        (da.arange(np.prod(spatial), chunks=100).reshape(spatial) % 3).astype(np.uint8).rechunk((6, 10, 8))
    )
    out = str(tmp_path / "lab.zarr")
    get_writer("zarr").write(like.with_data(labels, reader_info=like.reader_info), out)
    g = zarr.open_group(out, mode="r")
    if version == "0.4":
        assert g.metadata.zarr_format == 2
        assert g.attrs["image-label"]["version"] == "0.4"
        ms = g.attrs["multiscales"][0]
        assert ms["version"] == "0.4"
    else:
        assert g.metadata.zarr_format == 3
        assert g.attrs["ome"]["version"] == "0.5" and "image-label" in g.attrs["ome"]
        ms = g.attrs["ome"]["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["z", "y", "x"]
    assert ms["datasets"] == [
        {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [2.0, 0.5, 0.5]}]}
    ]
    back = open_image(out)
    assert back.axes == ("z", "y", "x") and back.spacing == (2.0, 0.5, 0.5)
    np.testing.assert_array_equal(back.data.compute(), labels.compute())
    # probabilities (float, channel axis) are not a label image
    probs = da.zeros((2,) + spatial, chunks=(2, 6, 10, 8), dtype=np.float32)
    out2 = str(tmp_path / "prob.zarr")
    get_writer("zarr").write(like.with_data(probs, reader_info=like.reader_info), out2)
    attrs2 = dict(zarr.open_group(out2, mode="r").attrs)
    assert "image-label" not in attrs2 and "image-label" not in attrs2.get("ome", {})


def test_completion_is_recorded_not_inferred(tmp_path):
    w = ZarrWriter()
    out = str(tmp_path / "seg.zarr")
    data = da.from_array(RNG.integers(0, 3, size=(30, 30), dtype=np.uint8), chunks=10)
    handle = w.prepare(_img(data), out)
    assert not is_complete(out) and not os.path.exists(out)
    assert read_status(handle.target)["status"] == "incomplete"
    task = w.write_task(handle, _img(data))
    dask.compute(task)
    assert not is_complete(out)  # written but not finalized
    w.finalize(handle, {"run_id": "r1", "seconds": 1.5})
    assert is_complete(out)
    status = read_status(out)
    assert status["status"] == "complete" and status["info"] == {"run_id": "r1", "seconds": 1.5}
    assert status["completed_at"] and status["run_id"] == handle.run_id
    assert not os.path.exists(handle.target)
    with pytest.raises(OutputError, match=r"seg\.zarr.*already exists.*overwrite=True"):
        w.prepare(_img(data), out)
    new = data + 1
    w.write(_img(new), out, overwrite=True)
    np.testing.assert_array_equal(open_image(out).data.compute(), new.compute())
    assert sorted(os.listdir(tmp_path)) == ["seg.zarr"]


def test_failed_write_leaves_nothing_at_final_path(tmp_path):
    out = str(tmp_path / "fail.zarr")

    def boom(block, block_info=None):
        if block_info[None]["chunk-location"] == (1, 1):
            raise RuntimeError("model crashed")
        return block

    data = da.zeros((20, 20), chunks=10, dtype=np.uint8).map_blocks(boom, dtype=np.uint8)
    with pytest.raises(RuntimeError, match="model crashed"):
        get_writer("zarr").write(_img(data), out)
    assert os.listdir(tmp_path) == []
    assert not is_complete(out)


def test_refuses_to_replace_non_zarr_paths_and_bad_options(tmp_path):
    data = da.zeros((8, 8), chunks=4, dtype=np.uint8)
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"x")
    with pytest.raises(OutputError, match=r"photos.*not a Zarr store"):
        get_writer("zarr").write(_img(data), str(folder), overwrite=True)
    assert (folder / "a.jpg").exists()
    foreign = tmp_path / "foreign.zarr"
    zarr.create_array(str(foreign), shape=(2,), chunks=(2,), dtype="u1")
    with pytest.raises(OutputError, match="already exists"):
        get_writer("zarr").write(_img(data), str(foreign))
    with pytest.raises(ConfigError, match="unknown parameter 'compresion' for writer 'zarr'; did you mean 'compressors'"):
        get_writer("zarr").write(_img(data), str(tmp_path / "x.zarr"), options={"compresion": "zstd"})


def test_remote_url_status_in_place():
    url = f"memory://tileseg-w-{uuid.uuid4().hex}/seg.zarr"
    w = get_writer("zarr")
    data = da.from_array(np.arange(64, dtype=np.int32).reshape(8, 8), chunks=4)
    handle = w.prepare(_img(data), url)
    assert handle.target == url
    assert read_status(url)["status"] == "incomplete" and not is_complete(url)
    dask.compute(w.write_task(handle, _img(data)))
    assert not is_complete(url)
    w.finalize(handle)
    assert is_complete(url)
    np.testing.assert_array_equal(open_image(url).data.compute(), data.compute())
    with pytest.raises(OutputError, match="already exists"):
        w.prepare(_img(data), url)
    # an incomplete leftover (crashed run) is replaced without overwrite
    url2 = url.replace("seg.zarr", "crashed.zarr")
    w.prepare(_img(data), url2)
    h2 = w.prepare(_img(data * 2), url2)
    dask.compute(w.write_task(h2, _img(data * 2)))
    w.finalize(h2)
    np.testing.assert_array_equal(open_image(url2).data.compute(), 2 * data.compute())


def test_store_chunks_equal_dask_chunks(tmp_path):
    w = get_writer("zarr")
    data = da.ones((50, 70), chunks=(16, 32), dtype=np.uint8)
    w.write(_img(data), str(tmp_path / "a.zarr"))
    assert zarr.open_array(str(tmp_path / "a.zarr"), path="0", mode="r").chunks == (16, 32)
    irregular = da.ones((50, 70), chunks=((10, 30, 10), (35, 35)), dtype=np.uint8)
    w.write(_img(irregular), str(tmp_path / "b.zarr"))
    assert zarr.open_array(str(tmp_path / "b.zarr"), path="0", mode="r").chunks == (30, 35)
    np.testing.assert_array_equal(open_image(str(tmp_path / "b.zarr")).data.compute(), np.ones((50, 70)))
    w.write(_img(data), str(tmp_path / "c.zarr"), options={"chunks": (25, -1)})
    assert zarr.open_array(str(tmp_path / "c.zarr"), path="0", mode="r").chunks == (25, 70)


def test_each_chunk_written_whole_once_without_reading(tmp_path, monkeypatch):
    from zarr.storage import LocalStore

    sets: Counter[str] = Counter()
    gets: list[str] = []
    orig_set, orig_get = LocalStore.set, LocalStore.get

    async def counting_set(self, key, value):
        sets[key] += 1
        return await orig_set(self, key, value)

    async def counting_get(self, key, *args, **kwargs):
        gets.append(key)
        return await orig_get(self, key, *args, **kwargs)

    data = da.from_array(RNG.integers(1, 9, size=(45, 38), dtype=np.uint8), chunks=(16, 16))
    w = get_writer("zarr")
    handle = w.prepare(_img(data), str(tmp_path / "o.zarr"))
    task = w.write_task(handle, _img(data))
    monkeypatch.setattr(LocalStore, "set", counting_set)
    monkeypatch.setattr(LocalStore, "get", counting_get)
    dask.compute(task, scheduler="threads")
    monkeypatch.undo()
    chunk_keys = {k for k in sets if k.startswith("0/c/")}
    assert len(chunk_keys) == 3 * 3  # ceil(45/16) x ceil(38/16), edge chunks included
    assert all(sets[k] == 1 for k in chunk_keys)
    assert not [k for k in gets if k.startswith("0/c/")]  # no read-modify-write


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_write_task_is_idempotent(tmp_path, zarr_format):
    data = da.from_array(RNG.random((40, 33)).astype(np.float32), chunks=(12, 10))
    w = get_writer("zarr")
    handle = w.prepare(_img(data), str(tmp_path / "i.zarr"), zarr_format=zarr_format)
    task = w.write_task(handle, _img(data))
    dask.compute(task)
    first = _tree_digest(handle.target)
    dask.compute(task)  # e.g. a retried task
    assert _tree_digest(handle.target) == first
    w.finalize(handle)
    np.testing.assert_array_equal(open_image(str(tmp_path / "i.zarr")).data.compute(), data.compute())
    # the group metadata on disk is valid JSON and records this write as complete
    meta_name = "zarr.json" if zarr_format == 3 else ".zattrs"
    meta = json.loads((tmp_path / "i.zarr" / meta_name).read_text())
    attrs = meta["attributes"] if zarr_format == 3 else meta
    assert attrs["tileseg"]["status"] == "complete" and attrs["tileseg"]["run_id"] == handle.run_id


def test_write_task_rejects_mismatched_data(tmp_path):
    w = get_writer("zarr")
    data = da.zeros((8, 8), chunks=4, dtype=np.uint8)
    handle = w.prepare(_img(data), str(tmp_path / "m.zarr"))
    with pytest.raises(OutputError, match="shape"):
        w.write_task(handle, _img(da.zeros((8, 9), chunks=4, dtype=np.uint8)))
    with pytest.raises(OutputError, match="dtype"):
        w.write_task(handle, _img(data.astype(np.float32)))
    w.abort(handle)
    assert os.listdir(tmp_path) == []
