"""Output paths checked before work: sanitised templates, never over or around an input, writable, room."""

from __future__ import annotations

import os
from collections import namedtuple

import pytest

from tileseg import outputs
from tileseg.errors import ConfigError, InputError, OutputError
from tileseg.outputs import check_free_space, check_not_inputs, check_writable, render_output


def test_fields_cannot_leave_the_template_folder():
    assert render_output("/o/{stem}/{name}-{index:02d}", "/d/scan.ome.zarr", 3) == "/o/scan/scan.ome.zarr-03"
    assert render_output("/o/{name}", "s3://b/a\\b.zarr", 0) == "/o/a_b.zarr"
    assert render_output("/o/{stem}.zarr", "/d/x\nlog.tif", 0) == "/o/x_log.zarr"
    for item in ("file:///d/sub/..", "s3://b/x/.", "memory://b/x/.../"):
        with pytest.raises(InputError, match="cannot name an output"):
            render_output("/o/{stem}/seg.zarr", item, 0)
    assert render_output("/o/{index}/seg.zarr", "file:///d/sub/..", 4) == "/o/4/seg.zarr"  # index is always safe


def test_outputs_over_inside_or_around_inputs_are_refused(tmp_path):
    data = tmp_path / "data"
    (data / "a.zarr").mkdir(parents=True)
    guard = [(str(data / "a.zarr"), "input"), (str(tmp_path / "m.pt"), "model.torchscript.path")]
    check_not_inputs([str(tmp_path / "out" / "a.zarr")], guard)  # fine
    with pytest.raises(ConfigError, match=r"is the input .*overwrite: true included"):
        check_not_inputs([str(data / "a.zarr") + "/"], guard)
    with pytest.raises(ConfigError, match="lies inside the input"):
        check_not_inputs([str(data / "a.zarr" / "labels")], guard)
    with pytest.raises(ConfigError, match="contains the input"):
        check_not_inputs([str(data)], guard)
    with pytest.raises(ConfigError, match="model.torchscript.path"):
        check_not_inputs([str(tmp_path / "m.pt")], guard)
    os.symlink(data / "a.zarr", tmp_path / "link.zarr")  # another name for the same folder
    with pytest.raises(ConfigError, match="is the input"):
        check_not_inputs([str(tmp_path / "link.zarr")], guard)
    with pytest.raises(ConfigError, match="is the input"):
        check_not_inputs([f"file://{data}/a.zarr"], guard)
    with pytest.raises(ConfigError, match="lies inside"):
        check_not_inputs(["s3://b/in/x.zarr/seg"], [("s3://b/in/x.zarr/", "input")])
    check_not_inputs(["s3://b/in/x.zarr_seg"], [("s3://b/in/x.zarr", "input")])  # a shared prefix is not a folder


def test_unwritable_output_folder_is_named(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="not writable") as err:
        check_writable([str(tmp_path / "file" / "sub" / "a.zarr")])
    assert str(tmp_path / "file" / "sub") in str(err.value)
    check_writable([str(tmp_path / "new" / "a.zarr")])
    assert (tmp_path / "new").is_dir() and os.listdir(tmp_path / "new") == []  # the probe is removed


def test_free_space_against_the_planned_size(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda p: usage(10 * 2**20, 0, 3 * 2**20))
    check_free_space([(str(tmp_path / "a.zarr"), 2 * 2**20)])
    with pytest.raises(OutputError, match=r"3.0 MiB free .* needs up to 4.0 MiB uncompressed"):
        check_free_space([(str(tmp_path / "a.zarr"), 2 * 2**20), (str(tmp_path / "b.zarr"), 2 * 2**20)])
    check_free_space([("s3://b/a.zarr", 10**15)])  # remote: not checked


@pytest.mark.parametrize("items, rendered, hint", [
    (["/d/a.zarr", "/d/b.zarr"], ["/o/seg.zarr", "/o/seg.zarr"], "use {stem}, {name} or {index}"),
    (["/d/a.zarr", "/e/a.zarr"], ["/o/a_seg.zarr", "/o/a_seg.zarr"], "both are named 'a.zarr': use {index}"),
    (["/d/a.zarr", "/d/a.tif"], ["/o/a_seg.zarr", "/o/a_seg.zarr"], "both have the stem 'a': use {name} or {index}"),
])
def test_collisions_suggest_a_field_that_tells_the_items_apart(items, rendered, hint):
    from tileseg.errors import ConfigError
    from tileseg.outputs import check_outputs, render_output

    with pytest.raises(ConfigError, match="both write to") as info:
        check_outputs([[p] for p in rendered], items)
    assert hint in str(info.value)
    field = hint.split("use ")[1].split(" ")[0].strip(",")  # the first field suggested really separates them
    paths = {render_output("/o/" + field + "_seg", item, i) for i, item in enumerate(items)}
    assert len(paths) == 2
    with pytest.raises(ConfigError, match="two outputs of item"):
        check_outputs([["/o/x.zarr", "/o/x.zarr"]], ["/d/a.zarr"])
