"""The engine's ordering edges (``lookahead``): on by default, bounding how far prediction runs ahead of
finished output when the whole result is computed, and never making a partial compute do more work."""

from __future__ import annotations

import threading

import dask
import numpy as np
import pytest
from dask.callbacks import Callback

import tileseg
from tileseg.errors import ConfigError
from tileseg.graph import ORDER_TOKEN, resolve_lookahead


class TwoClass:
    """A model whose logits follow the input (labels: input > 0.5); counts the patches it sees."""

    def __init__(self) -> None:
        self.patches = 0
        self.lock = threading.Lock()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with self.lock:
            self.patches += batch.shape[0]
        return np.concatenate([1 - batch, batch], axis=1)


def _image(shape=(256, 320)) -> np.ndarray:
    yy, xx = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    return (np.sin(yy / 9.0) * np.cos(xx / 13.0) * 0.5 + 0.5).astype(np.float32)


class _Order(Callback):
    """Records, for every model (owner) task, which output blocks were final when it started."""

    def __init__(self) -> None:
        super().__init__()
        self.final: set[tuple[int, ...]] = set()
        self.started: list[tuple[tuple[int, ...], frozenset]] = []
        self.lock = threading.Lock()

    def _pretask(self, key, dsk, state) -> None:
        if isinstance(key, tuple) and str(key[0]).startswith("tileseg-predict-"):
            with self.lock:
                # (a model task fused with its only piece keeps the owner's index first)
                self.started.append((tuple(key[1:3]), frozenset(self.final)))

    def _posttask(self, key, result, dsk, state, worker_id) -> None:
        if isinstance(key, tuple) and str(key[0]).startswith("tileseg-final-"):
            with self.lock:
                self.final.add(tuple(key[1:]))


def test_by_default_prediction_waits_for_output_lookahead_blocks_back():
    x = _image()
    with dask.config.set(num_workers=2):
        assert resolve_lookahead(None) == 4
        y = tileseg.segment(x, TwoClass(), patch_size=32, overlap=0.25, chunks=32, output="labels").data
    grid = y.numblocks
    rec = _Order()
    with rec:
        got = y.compute(scheduler="threads", num_workers=2)
    np.testing.assert_array_equal(got, (x > 0.5).astype(got.dtype))
    assert len(rec.started) > 40
    for block, final in rec.started:
        rank = int(np.ravel_multi_index(block, grid))
        if rank >= 4:
            before = tuple(int(v) for v in np.unravel_index(rank - 4, grid))
            assert before in final, (block, before)


def test_lookahead_zero_has_no_ordering_edges_and_the_same_result():
    x = _image((96, 130))
    a = tileseg.segment(x, TwoClass(), patch_size=24, chunks=32, output="logits").data
    b = tileseg.segment(x, TwoClass(), patch_size=24, chunks=32, output="logits", lookahead=0).data
    tokens = [k for k in dict(b.__dask_graph__()) if isinstance(k, tuple) and str(k[0]).startswith(ORDER_TOKEN)]
    assert tokens == []
    assert any(isinstance(k, tuple) and str(k[0]).startswith(ORDER_TOKEN) for k in dict(a.__dask_graph__()))
    np.testing.assert_array_equal(a.compute(), b.compute())


@pytest.mark.parametrize("corner", [(slice(200, None), slice(250, None)), (slice(0, 40), slice(280, None))])
def test_a_partial_compute_predicts_only_what_it_needs(corner):
    """Ordering edges to blocks a slice does not need are dropped when the graph is culled."""
    x = _image()
    counts = {}
    for la in (None, 0):
        model = TwoClass()
        y = tileseg.segment(x, model, patch_size=32, overlap=0.25, chunks=32, output="logits", lookahead=la).data
        part = y[(slice(None),) + corner].compute(scheduler="threads")
        np.testing.assert_allclose(part[1], x[corner], atol=1e-5)
        counts[la] = model.patches
        model.patches = 0
        y.compute(scheduler="threads")
        full = model.patches
    assert counts[None] == counts[0] < full / 4


def test_resolve_lookahead():
    assert resolve_lookahead(7) == 7 and resolve_lookahead(0) == 0
    with dask.config.set(num_workers=1):
        assert resolve_lookahead(None) == 4
    with dask.config.set(num_workers=6):
        assert resolve_lookahead(None) == 12

    class Client:
        def scheduler_info(self):
            return {"workers": {"a": {"nthreads": 4}, "b": {"nthreads": 3}}}

    assert resolve_lookahead(None, client=Client()) == 14
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="lookahead"):
            resolve_lookahead(bad)
