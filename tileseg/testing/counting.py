"""A model kind that records every call, and ``tileseg run`` with it registered (kill-and-resume tests, benchmarks).

``python -m tileseg.testing.counting run PIPELINE.yaml [tileseg run options]`` is the
``tileseg`` command with the model kind ``counting`` registered. The model appends one line per
batch (the number of patches) to the file named by ``TILESEG_TEST_CALLS`` and sleeps
``TILESEG_TEST_DELAY`` seconds per call; both come from the environment, so they do not change the
pipeline's fingerprint (and a rerun resumes the same partial output).

Its logits depend on each pixel's 5 x 5 neighbourhood (zero outside the patch), so a patch placed
or blended wrongly changes the result.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np


class CountingModel:
    """Model kind ``counting``: a fixed 5 x 5 box filter as a two-class model, logging its calls."""

    name = "counting"
    file_params: tuple[str, ...] = ()

    def load(self, *, device=None, precision="fp32"):
        from tileseg.predictors.base import CallablePredictor

        return CallablePredictor(_forward, in_channels=1, out_channels=2)


def _forward(batch: np.ndarray) -> np.ndarray:
    from scipy.ndimage import uniform_filter

    calls = os.environ.get("TILESEG_TEST_CALLS")
    if calls:
        with open(calls, "a") as fh:
            fh.write(f"{batch.shape[0]}\n")
    time.sleep(float(os.environ.get("TILESEG_TEST_DELAY", "0")))
    x = batch[:, 0].astype(np.float32)
    size = (1,) + (5,) * (x.ndim - 1)
    fg = 8 * (uniform_filter(x, size=size, mode="constant") - 0.45)
    return np.stack([-fg, fg], axis=1).astype(np.float32)


def register() -> None:
    """Register the ``counting`` model kind in this process."""
    from tileseg import registry

    registry.register("models", "counting", CountingModel)


def calls(path) -> list[int]:
    """Patches per call recorded in ``path`` (empty when absent)."""
    try:
        with open(path) as fh:
            return [int(line) for line in fh if line.strip()]
    except FileNotFoundError:
        return []


if __name__ == "__main__":
    register()
    from tileseg.cli import main

    sys.argv[0] = "tileseg"
    main()
