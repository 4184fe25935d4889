"""Zarr reader: layouts, OME-Zarr levels, URLs, safety checks, input expansion."""

from __future__ import annotations

import json
import os
import uuid

import dask.array as da
import numpy as np
import pytest
import zarr

from tileseg.errors import (
    FormatError,
    ImageNotFoundError,
    ImageTooLargeError,
    InputError,
    PluginError,
)
from tileseg.inspect import describe, format_description
from tileseg.readers import expand_inputs, get_reader, item_stem, open_image
from tileseg.readers.zarr import ZarrReader

RNG = np.random.default_rng(0)


def make_ome04(path, *, translation=True, global_scale=False):
    """OME-NGFF 0.4 (Zarr v2) image: c=2, y=40, x=30 at level 0; level 1 halves y and x."""
    full = RNG.integers(0, 1000, size=(2, 40, 30), dtype=np.uint16)
    levels = [full, full[:, ::2, ::2]]
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    datasets = []
    for i, arr in enumerate(levels):
        z = group.create_array(str(i), shape=arr.shape, chunks=(1, 16, 16), dtype=arr.dtype)
        z[:] = arr
        cts = [{"type": "scale", "scale": [1.0, 0.5 * 2**i, 0.25 * 2**i]}]
        if translation:
            cts.append({"type": "translation", "translation": [0.0, 5.0, 7.0]})
        datasets.append({"path": str(i), "coordinateTransformations": cts})
    ms = {
        "version": "0.4",
        "name": "img",
        "axes": [
            {"name": "c", "type": "channel"},
            {"name": "y", "type": "space", "unit": "micrometer"},
            {"name": "x", "type": "space", "unit": "micrometer"},
        ],
        "datasets": datasets,
    }
    if global_scale:
        ms["coordinateTransformations"] = [{"type": "scale", "scale": [1.0, 2.0, 2.0]}]
    group.attrs.update({"multiscales": [ms], "omero": {"channels": []}, "custom": 1})
    return levels


def make_ome05(path, *, t=1):
    """OME-NGFF 0.5 (Zarr v3) image with axes t, z, y, x (t of length ``t``)."""
    arr = RNG.random((t, 6, 20, 24)).astype(np.float32)
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    z = group.create_array("s0", shape=arr.shape, chunks=(1, 3, 10, 12), dtype=arr.dtype)
    z[:] = arr
    axes = [{"name": "t", "type": "time"}] + [
        {"name": n, "type": "space", "unit": "millimeter"} for n in "zyx"
    ]
    ms = {
        "axes": axes,
        "datasets": [
            {"path": "s0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 2.0, 0.5, 0.5]}]}
        ],
    }
    group.attrs.update({"ome": {"version": "0.5", "multiscales": [ms]}})
    return arr


# --- plain arrays -----------------------------------------------------------------


def test_plain_v3_array_is_lazy_with_store_chunks(tmp_path):
    p = tmp_path / "a.zarr"
    ref = RNG.integers(0, 255, size=(50, 70), dtype=np.uint8)
    zarr.create_array(str(p), shape=ref.shape, chunks=(16, 32), dtype=ref.dtype)[:] = ref
    img = open_image(str(p))
    assert isinstance(img.data, da.Array)
    assert img.axes == ("y", "x") and img.format == "zarr" and img.source == str(p)
    assert img.data.chunks == ((16, 16, 16, 2), (32, 32, 6))
    np.testing.assert_array_equal(img.data.compute(), ref)
    assert img.reader_info["zarr_format"] == 3 and img.reader_info["chunks"] == (16, 32)
    assert img.reader_info["dtype"] == "uint8"


def test_open_reads_no_chunk_data(tmp_path, monkeypatch):
    from zarr.storage import LocalStore

    p = tmp_path / "lazy.zarr"
    ref = (np.arange(64 * 64) % 251).astype("u1").reshape(64, 64)
    zarr.create_array(str(p), shape=(64, 64), chunks=(8, 8), dtype="u1")[:] = ref
    keys: list[str] = []
    orig = LocalStore.get

    async def recording_get(self, key, *args, **kwargs):
        keys.append(key)
        return await orig(self, key, *args, **kwargs)

    monkeypatch.setattr(LocalStore, "get", recording_get)
    img = open_image(p)
    assert not [k for k in keys if k.startswith("c/")]
    np.testing.assert_array_equal(img.data[:8, :8].compute(), ref[:8, :8])
    assert [k for k in keys if k.startswith("c/")] == ["c/0/0"]  # one chunk for one block


def test_sharded_array_reads_one_shard_per_block(tmp_path):
    p = tmp_path / "sh.zarr"
    ref = RNG.integers(0, 50, size=(64, 48), dtype=np.uint8)
    zarr.create_array(str(p), shape=ref.shape, chunks=(8, 8), shards=(32, 16), dtype=ref.dtype)[:] = ref
    img = open_image(p)
    assert img.data.chunksize == (32, 16)
    assert img.reader_info["chunks"] == (8, 8) and img.reader_info["shards"] == (32, 16)
    np.testing.assert_array_equal(img.data.compute(), ref)


def test_v2_channel_last_is_moved_first(tmp_path):
    p = tmp_path / "yxc.zarr"
    ref = RNG.integers(0, 9, size=(20, 30, 3), dtype=np.int16)
    z = zarr.create_array(str(p), shape=ref.shape, chunks=(8, 8, 3), dtype=ref.dtype, zarr_format=2)
    z[:] = ref
    z.attrs["_ARRAY_DIMENSIONS"] = ["y", "x", "c"]
    img = open_image(p)
    assert img.axes == ("c", "y", "x")
    np.testing.assert_array_equal(img.data.compute(), ref.transpose(2, 0, 1))
    assert img.reader_info["store_axes"] == ("y", "x", "c")
    assert img.reader_info["zarr_format"] == 2


def test_v3_dimension_names_and_default_axes(tmp_path):
    p = tmp_path / "zyx.zarr"
    zarr.create_array(str(p), shape=(4, 5, 6), chunks=(2, 5, 6), dtype="f4", dimension_names=["z", "y", "x"])
    assert open_image(p).axes == ("z", "y", "x")
    q = tmp_path / "c4.zarr"
    zarr.create_array(str(q), shape=(2, 4, 5, 6), chunks=(1, 4, 5, 6), dtype="f4")
    assert open_image(q).axes == ("c", "z", "y", "x")


def test_missing_chunks_read_as_fill_value_and_corrupt_chunk_names_store(tmp_path):
    p = tmp_path / "holes.zarr"
    z = zarr.create_array(str(p), shape=(8, 8), chunks=(4, 4), dtype="u1", fill_value=9)
    z[:4, :4] = 1
    np.testing.assert_array_equal(open_image(p).data[4:, 4:].compute(), np.full((4, 4), 9, np.uint8))
    chunk = p / "c" / "0" / "0"
    assert chunk.is_file()
    chunk.write_bytes(b"not zstd at all")
    with pytest.raises(InputError, match="holes.zarr"):
        open_image(p).data.compute()


# --- OME-Zarr ---------------------------------------------------------------------


def test_ome04_level_selection_shape_spacing_units(tmp_path):
    p = tmp_path / "img.ome.zarr"
    levels = make_ome04(p)
    img0 = open_image(p)
    assert img0.axes == ("c", "y", "x")
    assert img0.data.shape == (2, 40, 30)
    assert img0.spacing == (0.5, 0.25)
    assert img0.origin == (5.0, 7.0)
    assert img0.units == ("micrometer", "micrometer")
    np.testing.assert_array_equal(img0.data.compute(), levels[0])
    img1 = open_image(p, level=1)
    assert img1.data.shape == (2, 20, 15)
    assert img1.spacing == (1.0, 0.5)
    np.testing.assert_array_equal(img1.data.compute(), levels[1])
    assert open_image(p, level=-1).data.shape == (2, 20, 15)
    ome = img1.reader_info["ome"]
    assert ome["version"] == "0.4" and ome["level"] == 1 and ome["n_levels"] == 2
    assert ome["multiscales"]["name"] == "img"
    assert img1.attrs["custom"] == 1
    with pytest.raises(InputError, match=r"level=2 out of range.*2 level"):
        open_image(p, level=2)


def test_ome04_global_transform_composes(tmp_path):
    p = tmp_path / "g.zarr"
    make_ome04(p, global_scale=True)
    img = open_image(p, level=1)
    assert img.spacing == (2.0, 1.0)
    assert img.origin == (10.0, 14.0)


def test_ome05_singleton_time_dropped(tmp_path):
    p = tmp_path / "v.zarr"
    arr = make_ome05(p, t=1)
    img = open_image(p)
    assert img.axes == ("z", "y", "x")
    assert img.spacing == (2.0, 0.5, 0.5)
    assert img.units == ("millimeter",) * 3
    assert img.reader_info["ome"]["version"] == "0.5"
    np.testing.assert_array_equal(img.data.compute(), arr[0])


def test_ome05_several_time_points_refused(tmp_path):
    p = tmp_path / "t2.zarr"
    make_ome05(p, t=2)
    with pytest.raises(InputError, match="2 time points"):
        open_image(p)


def test_level_on_plain_array_refused(tmp_path):
    p = tmp_path / "a.zarr"
    zarr.create_array(str(p), shape=(4, 4), chunks=(4, 4), dtype="u1")
    with pytest.raises(InputError, match="not an OME-Zarr"):
        open_image(p, level=1)


def test_unsafe_dataset_path_refused(tmp_path):
    p = tmp_path / "evil.zarr"
    make_ome04(p)
    attrs = json.loads((p / ".zattrs").read_text())
    attrs["multiscales"][0]["datasets"][0]["path"] = "../../etc"
    (p / ".zattrs").write_text(json.dumps(attrs))
    with pytest.raises(InputError, match="unsafe OME dataset path '../../etc'"):
        open_image(p)


# --- arrays inside groups, URLs -----------------------------------------------------


def test_array_inside_group_by_path(tmp_path):
    p = tmp_path / "grp.zarr"
    g = zarr.open_group(str(p), mode="w")
    raw = g.create_array("raw", shape=(10, 12), chunks=(5, 6), dtype="u2")
    raw[:] = 1
    lab = g.create_group("labels").create_array("0", shape=(10, 12), chunks=(5, 6), dtype="u1")
    lab[:] = np.arange(120, dtype=np.uint8).reshape(10, 12)
    img = open_image(p, array="labels/0")
    np.testing.assert_array_equal(img.data.compute(), lab[:])
    assert img.reader_info["array_path"] == "labels/0"
    # a path to the node inside the store works too
    np.testing.assert_array_equal(open_image(p / "labels" / "0").data.compute(), lab[:])
    with pytest.raises(FormatError, match=r"\('raw', 'labels/'\); choose one with array="):
        open_image(p)
    with pytest.raises(InputError, match="unsafe array path"):
        open_image(p, array="../grp.zarr")
    with pytest.raises(FormatError, match="no zarr metadata"):
        open_image(p, array="nothere")


def test_group_with_single_array_opens_it(tmp_path):
    p = tmp_path / "one.zarr"
    g = zarr.open_group(str(p), mode="w", zarr_format=2)
    ref = np.arange(36, dtype="i4").reshape(6, 6)
    g.create_array("data", shape=(6, 6), chunks=(3, 3), dtype="i4")[:] = ref
    img = open_image(p)
    np.testing.assert_array_equal(img.data.compute(), ref)
    assert img.reader_info["array_path"] == "data"


def test_memory_and_file_urls(tmp_path):
    url = f"memory://tileseg-test-{uuid.uuid4().hex}/m.zarr"
    store = zarr.storage.FsspecStore.from_url(url)
    ref = RNG.random((12, 10)).astype(np.float32)
    zarr.create_array(store, shape=ref.shape, chunks=(5, 5), dtype=ref.dtype)[:] = ref
    img = open_image(url, storage_options={})
    np.testing.assert_array_equal(img.data.compute(), ref)
    assert ZarrReader.can_open(url)
    p = tmp_path / "f.zarr"
    zarr.create_array(str(p), shape=ref.shape, chunks=(5, 5), dtype=ref.dtype)[:] = ref
    np.testing.assert_array_equal(open_image(f"file://{p}").data.compute(), ref)


# --- safety -----------------------------------------------------------------------


def test_declared_size_over_budget_names_file_and_shape(tmp_path):
    p = tmp_path / "huge.zarr"
    zarr.create_array(str(p), shape=(200_000, 300_000), chunks=(1024, 1024), dtype="u2")  # metadata only
    with pytest.raises(ImageTooLargeError, match=r"huge\.zarr.*\(200000, 300000\).*max_pixels=1000000"):
        open_image(p, max_pixels=10**6)
    with pytest.raises(ImageTooLargeError, match=r"120000000000 bytes.*max_bytes=1000"):
        open_image(p, max_bytes=1000)
    assert open_image(p, max_pixels=None).data.shape == (200_000, 300_000)


def _write_v2_meta(path, **fields):
    path.mkdir()
    meta = {
        "zarr_format": 2,
        "shape": [4],
        "chunks": [2],
        "dtype": "<i4",
        "compressor": None,
        "fill_value": 0,
        "filters": None,
        "order": "C",
    }
    meta.update(fields)
    (path / ".zarray").write_text(json.dumps(meta))


def test_pickle_codecs_and_object_dtype_refused(tmp_path):
    _write_v2_meta(tmp_path / "p1.zarr", dtype="|O", filters=[{"id": "pickle", "protocol": 5}])
    _write_v2_meta(tmp_path / "p2.zarr", compressor={"id": "pickle"})
    _write_v2_meta(tmp_path / "o.zarr", dtype="|O", filters=[{"id": "vlen-utf8"}])
    for name in ("p1.zarr", "p2.zarr"):
        with pytest.raises(FormatError, match=rf"{name}/\.zarray.*pickle"):
            open_image(tmp_path / name)
    with pytest.raises(FormatError, match=r"o\.zarr/\.zarray.*unsupported dtype '\|O'"):
        open_image(tmp_path / "o.zarr")
    # a v3 array with a pickle codec nested in its chain
    p3 = tmp_path / "p3.zarr"
    zarr.create_array(str(p3), shape=(4,), chunks=(2,), dtype="i4")
    meta = json.loads((p3 / "zarr.json").read_text())
    meta["codecs"].insert(0, {"name": "numcodecs.pickle", "configuration": {}})
    (p3 / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(FormatError, match="pickle"):
        open_image(p3)


def test_missing_path_non_image_and_corrupt_metadata(tmp_path):
    with pytest.raises(ImageNotFoundError, match="nothere.zarr"):
        open_image(tmp_path / "nothere.zarr")
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    with pytest.raises(FormatError, match=r"notes\.txt.*not an image"):
        open_image(txt)
    bad = tmp_path / "bad.zarr"
    bad.mkdir()
    (bad / "zarr.json").write_text("{not json")
    with pytest.raises(FormatError, match=r"bad\.zarr/zarr\.json.*not valid JSON"):
        open_image(bad)
    empty = tmp_path / "empty.zarr"
    empty.mkdir()
    with pytest.raises(FormatError, match=r"empty\.zarr.*no zarr metadata"):
        open_image(empty)


def test_reader_by_name_and_unknown_reader(tmp_path):
    p = tmp_path / "noext"
    zarr.create_array(str(p), shape=(4, 4), chunks=(4, 4), dtype="u1")
    assert open_image(p, reader="zarr").data.shape == (4, 4)
    assert open_image(p).format == "zarr"  # detected from metadata without a .zarr suffix
    assert get_reader("zarr") is ZarrReader
    with pytest.raises(PluginError, match="did you mean 'zarr'"):
        open_image(p, reader="zar")


# --- input expansion ------------------------------------------------------------------


def test_expand_inputs_directory_glob_list(tmp_path):
    d = tmp_path / "scenes"
    d.mkdir()
    for name in ("b.zarr", "a.zarr"):
        zarr.create_array(str(d / name), shape=(4, 4), chunks=(4, 4), dtype="u1")
    (d / "README.txt").write_text("not an image")
    (d / ".a.zarr.partial-123").mkdir()
    a, b = str(d / "a.zarr"), str(d / "b.zarr")
    assert expand_inputs(str(d)) == [a, b]
    assert expand_inputs(a) == [a]  # a store is one item, not its chunk folders
    assert expand_inputs(str(d / "*.zarr")) == [a, b]
    assert expand_inputs([b, a, b]) == [b, a]
    with pytest.raises(ImageNotFoundError, match=r"nomatch-\*\.zarr.*matches nothing"):
        expand_inputs(str(d / "nomatch-*.zarr"))
    with pytest.raises(ImageNotFoundError, match="missing.zarr"):
        expand_inputs([a, str(d / "missing.zarr")])
    with pytest.raises(FormatError, match=r"README\.txt"):
        expand_inputs(str(d / "README.txt"))
    with pytest.raises(FormatError, match=r"\*\.txt.*none is an image"):
        expand_inputs(str(d / "*.txt"))
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(ImageNotFoundError, match="emptydir.*no image"):
        expand_inputs(str(tmp_path / "emptydir"))


def test_expand_inputs_memory_url():
    root = f"memory://tileseg-exp-{uuid.uuid4().hex}"
    for name in ("x.zarr", "y.zarr"):
        store = zarr.storage.FsspecStore.from_url(f"{root}/{name}")
        zarr.create_array(store, shape=(2, 2), chunks=(2, 2), dtype="u1")
    items = expand_inputs(root)
    assert [item_stem(i) for i in items] == ["x", "y"]
    assert expand_inputs(f"{root}/*.zarr") == items
    assert open_image(items[0]).data.shape == (2, 2)


def test_item_stem():
    assert item_stem("data/scene_01.ome.zarr/") == "scene_01"
    assert item_stem("s3://bucket/a/b.zarr") == "b"
    assert item_stem("ct.nii.gz") == "ct"
    assert item_stem("noext") == "noext"


# --- describe (tileseg info) -------------------------------------------------------


def test_describe_ome_levels(tmp_path):
    p = tmp_path / "img.zarr"
    make_ome04(p)
    info = describe(str(p))
    assert info["shape"] == [2, 40, 30] and info["axes"] == ["c", "y", "x"]
    assert info["chunks"] == [1, 16, 16] and info["n_chunks"] == 2 * 3 * 2
    assert info["size_bytes"] == 2 * 40 * 30 * 2
    assert info["zarr_format"] == 2 and info["spacing"] == [0.5, 0.25]
    assert info["ome"]["version"] == "0.4"
    assert [lvl["shape"] for lvl in info["ome"]["levels"]] == [[2, 40, 30], [2, 20, 15]]
    assert info["ome"]["levels"][1]["spacing"] == [1.0, 0.5]
    json.dumps(info)  # serialisable for `tileseg info --json`
    assert "level 1 (1): shape [2, 20, 15]" in format_description(info)
    assert os.path.isdir(p)


def test_url_whose_filesystem_package_is_missing_names_url_and_package(monkeypatch):
    """A URL whose fsspec implementation is not installed: a MissingDependencyError naming it, not a bare ImportError."""
    import fsspec

    from tileseg import store
    from tileseg.errors import MissingDependencyError

    fsspec.register_implementation("tsmissing", "tileseg_no_such_module.FileSystem", clobber=True,
                                   errtxt="needs tileseg-no-such-package")
    monkeypatch.setitem(store._PROTOCOL_PACKAGES, "tsmissing", "tileseg-no-such-package")
    url = "tsmissing://bucket/scene.zarr"
    with pytest.raises(MissingDependencyError) as info:
        open_image(url)
    assert url in str(info.value) and "pip install tileseg-no-such-package" in str(info.value)
    with pytest.raises(MissingDependencyError, match="tsmissing://bucket/x.zarr"):
        store.open_store("tsmissing://bucket/x.zarr")
    from tileseg.report import write_text_atomic

    with pytest.raises(MissingDependencyError, match=r"tsmissing://bucket/run\.json"):  # run reports too
        write_text_atomic("tsmissing://bucket/run.json", "{}")
