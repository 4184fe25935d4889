"""A model that records which worker ran each forward, to test placement on a real cluster.

:class:`RecordingPredictor` appends the address of the Dask worker that runs
each forward (``"local"`` outside a worker) to a file in ``log_dir``;
:func:`forward_workers` reads them back. :class:`RecordingModel` is the same
as a model kind, for pipelines (register it with
``tileseg.registry.register("models", "recording", RecordingModel)`` in the
process that loads the pipeline; workers only unpickle the predictor).

The output depends on the patch, not only on the pixel (``x - mean(patch)``
and its negative), so a stitching difference between two runs shows.
"""

from __future__ import annotations

import os
import uuid
from typing import Any, ClassVar

import numpy as np

from ..predictors.base import Predictor
from ..predictors.kinds import ModelKind


def _worker_address() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError):  # not inside a distributed worker
        return "local"


class RecordingPredictor(Predictor):
    """Two-class model ``(x - mean(patch), mean(patch) - x)`` that logs the worker of every forward.

    Parameters
    ----------
    log_dir : str
        Folder that receives one line per forward (``address batch_size``).
    """

    in_channels = 1
    out_channels = 2

    def __init__(self, log_dir: str | os.PathLike[str]) -> None:
        self.log_dir = os.fspath(log_dir)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        x = np.asarray(batch, dtype=np.float32)
        centred = x - x.mean(axis=tuple(range(2, x.ndim)), keepdims=True)
        path = os.path.join(self.log_dir, f"{os.getpid()}-{uuid.uuid4().hex}.txt")
        with open(path, "w") as f:
            f.write(f"{_worker_address()} {len(x)}\n")
        return np.concatenate([centred, -centred], axis=1)


def forward_workers(log_dir: str | os.PathLike[str]) -> list[str]:
    """The worker address of every recorded forward."""
    out = []
    for name in sorted(os.listdir(log_dir)):
        with open(os.path.join(log_dir, name)) as f:
            out += [line.split()[0] for line in f if line.strip()]
    return out


class RecordingModel(ModelKind):
    """Model kind ``recording: {log_dir: ...}`` that makes a :class:`RecordingPredictor`."""

    name: ClassVar[str] = "recording"

    def __init__(self, log_dir: str) -> None:
        self.log_dir = log_dir

    def load(self, *, device: str | None = None, precision: str = "fp32") -> Any:
        return RecordingPredictor(self.log_dir)
