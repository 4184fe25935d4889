"""Task bodies of the engine: safe to rerun, weights recomputed from geometry."""

from __future__ import annotations

import numpy as np

from tileseg.stitching.overlap_add import finalize_block, weight_sum
from tileseg.stitching.weights import blend_window
from tileseg.tiling.grid import make_grid


def test_finalize_does_not_modify_its_inputs_so_a_rerun_gives_the_same_chunk():
    grid = make_grid((40, 40), (16, 16), overlap=0.5, chunks=40)
    window = blend_window((16, 16), "gaussian")
    block = grid.block_box((0, 0))
    piece = (block, np.random.default_rng(0).random((2, 40, 40), dtype=np.float32))
    before = piece[1].copy()
    starts = grid.patches_overlapping((0, 0))
    first = finalize_block(block, 2, "logits", "float32", starts, window, piece)
    second = finalize_block(block, 2, "logits", "float32", starts, window, piece)
    np.testing.assert_array_equal(piece[1], before)
    np.testing.assert_array_equal(first, second)
    # and the chunk is right: the weighted sum divided by the windows summed by hand
    total = np.zeros((40, 40), np.float32)
    for s in starts:
        total[s[0] : s[0] + 16, s[1] : s[1] + 16] += window
    np.testing.assert_allclose(first, before / total, rtol=1e-6)


def test_weight_sum_equals_the_sum_of_windows_over_the_whole_image():
    grid = make_grid((50, 37), (16, 12), overlap=0.3, chunks=(20, 15))
    window = blend_window((16, 12), "hann")
    full = np.zeros((50, 37), np.float32)
    for o in grid.owners():
        for s in grid.patches_of(o):
            full[s[0] : s[0] + 16, s[1] : s[1] + 12] += window
    for by in range(grid.n_blocks[0]):
        for bx in range(grid.n_blocks[1]):
            box = grid.block_box((by, bx))
            got = weight_sum(box, grid.patches_overlapping((by, bx)), window)
            np.testing.assert_allclose(got, full[box[0][0] : box[0][1], box[1][0] : box[1][1]], rtol=1e-6)


# --------------------------------------------------------------------------- what owner results keep alive


def _accumulators():
    """Host accumulators of both kinds (NumPy, torch on the CPU), filled with the same random scores."""
    from tileseg.stitching.accumulate import NumpyAccumulator, TorchAccumulator

    out = [NumpyAccumulator(3, (40, 46), None)]
    try:
        out.append(TorchAccumulator(3, (40, 46), None, "cpu"))
    except ImportError:  # torch is optional
        pass
    vals = np.random.default_rng(1).standard_normal((3, 40, 46)).astype(np.float32)
    for acc in out:
        acc.result()[...] = vals
    return out, vals


def test_own_strips_are_copies_so_the_accumulator_dies_with_the_owner_task():
    """Strips that are a small part of the accumulator are copied out: what the owner hands over is a
    fraction of the ``K x region`` buffer, which the owner task's end frees (a view would pin all of it)."""
    from dask.sizeof import sizeof

    from tileseg.stitching.handover import Handover, held_bytes
    from tileseg.stitching.overlap_add import hand_over

    region = ((0, 40), (0, 46))
    block, inner = ((0, 32), (0, 38)), ((6, 32), (6, 38))  # strips of 6 px along the leading faces
    handover = Handover(block, inner, (((0, 32), (38, 70)),), "labels", "uint8")
    accs, vals = _accumulators()
    for acc in accs:
        res = hand_over(acc, region, handover, np.zeros((1, 2), int), None)
        for box, arr in res.own.parts:
            assert not np.shares_memory(arr, acc.result())
            np.testing.assert_array_equal(arr, vals[(slice(None),) + tuple(slice(a, b) for a, b in box)])
        assert sizeof(res) < acc.result().nbytes / 2
        np.testing.assert_array_equal(res.own.reduced, np.argmax(vals[:, 6:32, 6:38], axis=0))
        arrays = [a for _, a in res.own.parts] + [res.own.reduced]
        assert held_bytes(arrays) < acc.result().nbytes / 2


def test_strips_that_are_most_of_the_accumulator_are_handed_over_as_views():
    """A block hardly larger than its strips: copying would double the memory, a view keeps one buffer."""
    from tileseg.stitching.handover import Handover
    from tileseg.stitching.overlap_add import hand_over

    region = ((0, 40), (0, 46))
    handover = Handover(((0, 32), (0, 38)), ((24, 32), (30, 38)), (), "labels", "uint8")
    accs, _ = _accumulators()
    for acc in accs:
        res = hand_over(acc, region, handover, np.zeros((1, 2), int), None)
        assert all(np.shares_memory(arr, acc.result()) for _, arr in res.own.parts)


def test_host_labels_equal_the_device_reduction():
    """A host accumulator reduces labels slab by slab (no whole-box torch temporaries), exactly as the
    device path's ``torch.max``: first class on ties, NaN pixels the dtype's largest value, one channel > 0."""
    torch = __import__("pytest").importorskip("torch")
    from tileseg.stitching import accumulate

    rng = np.random.default_rng(2)
    for k, dtype in ((4, "uint8"), (1, "uint8"), (3, "uint16")):
        vals = rng.integers(-2, 3, (k, 37, 29)).astype(np.float32)  # many ties
        vals[:, 5, 7] = np.nan
        vals[k - 1, 9, 3] = np.nan
        box = (slice(3, 35), slice(2, 29))
        host = accumulate.TorchAccumulator(k, (37, 29), None, "cpu")
        host.result()[...] = vals
        device = accumulate.TorchAccumulator(k, (37, 29), None, "cpu")
        device.host = None  # the device path (as on a GPU), on the CPU
        device.acc = torch.from_numpy(vals.copy())
        got, want = host.labels(box, dtype), device.labels(box, dtype)
        assert got.dtype == want.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(got, want)
        assert got[2, 5] == np.iinfo(dtype).max


class _Held:
    """Dask callback: after every task, how much more than itself the owner strips Dask holds keep alive."""

    def __init__(self) -> None:
        from dask.callbacks import Callback

        from tileseg.stitching.handover import OwnerResult, OwnPiece, held_bytes

        self.worst, self.parts = 0.0, 0
        outer = self

        class _CB(Callback):
            def _posttask(self, key, result, dsk, state, worker_id):
                for v in list(state["cache"].values()):
                    own = v.own if isinstance(v, OwnerResult) else v if isinstance(v, OwnPiece) else None
                    for _, arr in own.parts if own is not None else ():
                        outer.parts += 1  # a view counts the buffer it was cut from
                        outer.worst = max(outer.worst, held_bytes([arr]) / arr.nbytes)

        self.callback = _CB()


def test_no_held_owner_result_pins_its_accumulator(tmp_path):
    """End to end (input read by the owners from Zarr, threads, ordering edges, stored block by block): the
    own strips Dask holds between tasks are copies, never views pinning an owner's whole accumulator; the
    labels equal a one-block run's."""
    import dask
    import dask.array as da
    import zarr

    import tileseg

    yy, xx = np.meshgrid(np.arange(256, dtype=np.float32), np.arange(384, dtype=np.float32), indexing="ij")
    img = (np.sin(yy / 11.0) * np.cos(xx / 17.0) * 0.5 + 0.5).astype(np.float32)
    z = zarr.open_array(str(tmp_path / "in.zarr"), mode="w", shape=img.shape, chunks=(64, 64), dtype="float32")
    z[...] = img

    def model(batch):
        return np.concatenate([1 - batch, batch, 0.25 + 0 * batch], axis=1)

    kw = dict(patch_size=32, overlap=0.25, output="labels", batch_size=4)
    out = tileseg.segment(tileseg.open(str(tmp_path / "in.zarr")), model, chunks=64, **kw).data
    held = _Held()
    got = np.zeros(out.shape, out.dtype)
    with held.callback, dask.config.set(scheduler="threads", num_workers=2):
        da.store(out, got, lock=False)
    assert held.parts > 0
    assert held.worst == 1, f"an own strip kept {held.worst:.1f}x its size alive (the owner's accumulator)"
    ref = tileseg.segment(img, model, chunks=(256, 384), **kw).data.compute()
    np.testing.assert_array_equal(got, ref)
