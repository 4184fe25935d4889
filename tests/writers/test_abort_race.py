"""A failed write leaves nothing behind, even when block writes are still running as the writer aborts.

The interleaving is forced (see :mod:`tileseg.testing.abort_race`): one block write is held until the
writer's ``abort`` has started and removed the partial folder (or waited for that write), and the failing
block raises only once that write is held. Before the fix the held write recreated the removed partial
folder (Zarr's ``LocalStore`` creates missing parents; the chunk record ``makedirs`` its folder).
"""

from __future__ import annotations

import hashlib
import os
import threading
from functools import partial

import dask
import dask.array as da
import numpy as np
import pytest

from tileseg.image import Image
from tileseg.testing import abort_race
from tileseg.writers import get_writer, is_complete
from tileseg.writers.partial_lock import exclusive, remove_partial, writing_into

WRITERS = ("zarr", "nifti", "dicom_seg", "cog", "vector")
NEEDS = {"nifti": ("nibabel",), "dicom_seg": ("highdicom",), "cog": ("rasterio", "rio_cogeo"),
         "vector": ("pyogrio", "rasterio")}
NAMES = ("background", "soft tissue", "bone")
CRS = "EPSG:32621"
TRANSFORM = (30.0, 0.0, 500010.0, 0.0, -30.0, 4000020.0)


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    pytest.importorskip("pydicom")
    from tileseg.testing.dicom_series import write_ct_series

    return write_ct_series(str(tmp_path_factory.mktemp("ct") / "series"), shape=(6, 16, 20), seed=3)


def case(name, series_factory):
    """``(image, file name, writer options)``: every block non-empty (Zarr skips writing fill-value chunks)."""
    for module in NEEDS.get(name, ()):
        pytest.importorskip(module, reason=f"the {name} writer needs its extra")
    zyx = (1 + np.arange(6 * 16 * 20).reshape(6, 16, 20) % 2).astype(np.uint8)
    yx = np.ones((128, 192), np.uint8)
    yx[::3, ::5] = 2
    if name == "zarr":
        return Image(da.from_array(zyx, chunks=(2, -1, -1)), axes=("z", "y", "x")), "x.zarr", {}
    if name == "nifti":
        return Image(da.from_array(zyx, chunks=(2, -1, -1)), axes=("z", "y", "x")), "x.nii.gz", {}
    if name == "dicom_seg":
        from tileseg.testing.dicom_series import series_image

        image = series_image(series_factory())
        return image.with_data(da.from_array(zyx, chunks=(2, -1, -1)), class_names=NAMES), "x.dcm", {"slab": 2}
    image = Image(da.from_array(yx, chunks=64), axes=("y", "x"), crs=CRS, transform=TRANSFORM, class_names=NAMES)
    if name == "cog":
        return image, "x.tif", {"blocksize": 64}
    return image, "x.gpkg", {}


def digest(path):
    """Hash of a file, or of every file (names and bytes) under a folder."""
    h = hashlib.sha256()
    if os.path.isfile(path):
        with open(path, "rb") as fh:
            h.update(fh.read())
        return h.hexdigest()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for f in sorted(files):
            h.update(os.path.relpath(os.path.join(root, f), path).encode())
            with open(os.path.join(root, f), "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


def earlier_output(writer, image, out, fname, options):
    """A finished output of another item in the same folder: a failed write must not touch it."""
    done = str(out / f"done-{fname}")
    writer.write(image, done, options=options)
    return done, digest(done)


def check_clean(out, done, before, name):
    assert sorted(os.listdir(out)) == [os.path.basename(done)]  # no partial folder, no stray file
    assert digest(done) == before and is_complete(done, writer=name)


def failing(image, signals=None):
    return image.with_data(image.data.map_blocks(partial(abort_race.fail_block, signals=signals),
                                                 dtype=image.dtype))


def held_write_case(name, series, tmp_path):
    """The writer ``name`` with an earlier item's finished output in place and its abort announced in ``signals``."""
    image, fname, options = case(name, lambda: series)
    out = tmp_path / "out"
    writer = get_writer(name)
    done, before = earlier_output(writer, image, out, fname, options)
    signals = tmp_path / "signals"
    signals.mkdir()
    writer.abort = abort_race.announcing_abort(writer.abort, str(signals))
    return image, fname, options, out, writer, done, before, signals


@pytest.mark.parametrize("where", ["store", "record"])
@pytest.mark.parametrize("name", WRITERS)
def test_threads_abort_waits_for_the_block_write_in_flight(name, where, series, tmp_path):
    if name == "vector" and where == "store":
        pytest.skip("the vector writer's blocks are piece files, not Zarr chunks")
    image, fname, options, out, writer, done, before, signals = held_write_case(name, series, tmp_path)
    abort_race.install(str(signals), where)
    try:
        with dask.config.set(scheduler="threads", num_workers=4), pytest.raises(RuntimeError, match="boom"):
            writer.write(failing(image, str(signals)), str(out / fname), options=options)
        assert (signals / "aborted").exists()
        abort_race.wait_for_release(str(signals))  # the held write has ended (before abort removed the folder)
    finally:
        abort_race.uninstall()
    check_clean(out, done, before, name)


@pytest.mark.parametrize("name", WRITERS)
def test_synchronous_failure_leaves_nothing(name, series, tmp_path):
    image, fname, options = case(name, lambda: series)
    out = tmp_path / "out"
    writer = get_writer(name)
    done, before = earlier_output(writer, image, out, fname, options)
    with dask.config.set(scheduler="synchronous"), pytest.raises(RuntimeError, match="boom"):
        writer.write(failing(image), str(out / fname), options=options)
    check_clean(out, done, before, name)


@pytest.fixture(scope="module")
def cluster():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=40) as cluster:
        yield cluster


@pytest.mark.parametrize("name", WRITERS)
def test_distributed_worker_processes_abort_waits_for_the_block_write_in_flight(name, series, tmp_path, cluster):
    """Two worker processes: the held write runs in one, the failing block in the other, abort in the client."""
    import distributed

    where = "record" if name == "vector" else "store"
    image, fname, options, out, writer, done, before, signals = held_write_case(name, series, tmp_path)
    with distributed.Client(cluster) as client:
        client.run(abort_race.install, str(signals), where)
        try:
            with pytest.raises(RuntimeError, match="boom"):
                writer.write(failing(image, str(signals)), str(out / fname), options=options)  # on the client
            abort_race.wait_for_release(str(signals))
            pids = {(signals / f).read_text() for f in ("held", "failed")}
            assert len(pids) == 2 and str(os.getpid()) not in pids  # held and failing blocks: two workers
        finally:
            client.run(abort_race.uninstall)
    check_clean(out, done, before, name)


def test_removal_waits_for_a_write_and_later_writes_find_nothing(tmp_path):
    folder = tmp_path / ".x.partial-abc"
    folder.mkdir()
    entered, release = threading.Event(), threading.Event()
    wrote = []

    def write():
        with writing_into(str(folder)) as ok:
            entered.set()
            release.wait(30)
            if ok:
                (folder / "chunk").write_bytes(b"data")  # a write that creates a file in the folder
                wrote.append(True)

    writer = threading.Thread(target=write)
    writer.start()
    assert entered.wait(30)
    remover = threading.Thread(target=remove_partial, args=(str(folder),))
    remover.start()
    remover.join(0.3)
    assert remover.is_alive() and folder.exists()  # the removal waits for the write in flight
    release.set()
    writer.join(30)
    remover.join(30)
    assert wrote == [True] and not folder.exists()
    with writing_into(str(folder)) as ok:
        assert not ok  # a write that starts after the removal writes nothing
    folder.mkdir()  # a new partial folder at the same path (a new run) is not the one a write held
    with exclusive(str(folder)) as there:
        assert there
