"""Chunk-level resume: ``tileseg run`` killed mid-item, rerun, only the missing chunks recomputed.

Real processes: the run is a subprocess (:mod:`tileseg.testing.counting`, the ``tileseg`` command with a
model that logs its calls), SIGKILLed once some chunks are recorded. The rerun must finish, call the
model only for the owners that the missing chunks need (counted from the log and compared with the
patch grid), and write an output bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

import tileseg
from tileseg.testing.counting import calls
from tileseg.tiling.grid import make_grid
from tileseg.writers import is_complete
from tileseg.writers.blocks import RECORDS

sys.path.insert(0, str(Path(__file__).parent))
from pipeline_helpers import write_scene  # noqa: E402

#: ``tileseg run`` checks the model with one forward of a single patch before the item (a dry forward).
DRY = 1
SHAPE, PATCH, OVERLAP, CHUNKS, BATCH = (320, 120), (24, 24), 0.25, (40, 40), 2
PIPELINE = f"""version: 1
input: {{path: a.zarr, array: image}}
tiling: {{patch_size: {list(PATCH)}, overlap: {OVERLAP}, chunks: {list(CHUNKS)}}}
model:
  counting: {{}}
  output: probabilities
  batch_size: {BATCH}
output: {{path: 'out/{{stem}}_prob.zarr'}}
execution: {{scheduler: threads, workers: 2}}
"""


def _env(calls_file: Path, delay: float) -> dict[str, str]:
    root = str(Path(tileseg.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
            "TILESEG_TEST_CALLS": str(calls_file), "TILESEG_TEST_DELAY": str(delay)}


def _run(folder: Path, calls_file: Path, delay: float = 0.0, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tileseg.testing.counting", "run", "p.yaml", "--quiet"], cwd=folder,
                            env=_env(calls_file, delay), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


def _records(out: Path) -> set[tuple[int, ...]]:
    found = set()
    for partial in out.parent.glob(f".{out.name}.partial-*"):
        for name in os.listdir(partial / RECORDS) if (partial / RECORDS).is_dir() else []:
            found.add(tuple(int(p) for p in name.split(".")))
    return found


@pytest.fixture
def project(tmp_path):
    for name in ("clean", "killed"):
        folder = tmp_path / name
        folder.mkdir()
        write_scene(folder / "a.zarr", shape=SHAPE, seed=3)
        (folder / "p.yaml").write_text(PIPELINE)
    return tmp_path


def test_killed_run_resumes_only_the_missing_chunks(project):
    grid = make_grid(SHAPE, PATCH, overlap=OVERLAP, chunks=CHUNKS, batch_size=BATCH)
    n_blocks = math.prod(grid.n_blocks)
    all_calls = sum(math.ceil(len(grid.patches_of(o)) / BATCH) for o in grid.owners())

    clean = _run(project / "clean", project / "clean_calls.txt")
    assert clean.wait(timeout=300) == 0, clean.stdout.read().decode()
    clean_out = project / "clean" / "out" / "a_prob.zarr"
    assert len(calls(project / "clean_calls.txt")) == all_calls + DRY
    want = zarr.open_group(str(clean_out), mode="r")["0"][...]

    folder = project / "killed"
    out = folder / "out" / "a_prob.zarr"
    stale = folder / "out" / ".a_prob.zarr.partial-0123abcd"  # a killed run of another pipeline
    (stale / "0").mkdir(parents=True)
    proc = _run(folder, project / "first_calls.txt", delay=0.05)
    try:
        deadline = time.monotonic() + 240
        while len(_records(out)) < n_blocks // 2:
            assert proc.poll() is None, "the run ended before it could be killed: " + proc.stdout.read().decode()
            assert not os.path.exists(out), "a final-named output exists before the item completed"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not os.path.exists(out) and not is_complete(str(out))
    assert not stale.exists()  # another fingerprint's partial output was cleaned
    recorded = _records(out)
    assert {r[0] for r in recorded} == {0}  # (class, y, x) chunks: all classes in one chunk
    done = {r[1:] for r in recorded}
    assert 0 < len(done) < n_blocks
    missing = set(np.ndindex(*grid.n_blocks)) - done
    # the owners whose patches reach a missing chunk, and their batches: all the rerun may compute
    owners = [o for o in grid.owners() if missing & set(grid.targets(o))]
    expected = sum(math.ceil(len(grid.patches_of(o)) / BATCH) for o in owners)
    assert expected < all_calls

    rerun = _run(folder, project / "second_calls.txt")
    assert rerun.wait(timeout=300) == 0, rerun.stdout.read().decode()
    assert is_complete(str(out))
    second = calls(project / "second_calls.txt")
    assert len(second) == expected + DRY
    assert sum(second) == sum(len(grid.patches_of(o)) for o in owners) + DRY
    got = zarr.open_group(str(out), mode="r")["0"][...]
    assert got.dtype == want.dtype == np.float32
    np.testing.assert_array_equal(got, want)  # bit-identical to the uninterrupted run
    assert not list(out.parent.glob(".a_prob.zarr.partial-*"))  # nothing left behind
    assert not (out / RECORDS).exists()
    # the reports say how much was resumed, and the throughput counts only what each run computed
    import json

    (first,) = json.loads((clean_out.parent / "tileseg-report.json").read_text())["items"]
    (again,) = json.loads((out.parent / "tileseg-report.json").read_text())["items"]
    assert first["resumed_share"] == 0 and again["resumed_share"] == pytest.approx(len(done) / n_blocks)
    t = again["timings"]["compute_write"] + again["timings"].get("components", 0.0)
    assert again["pixels_per_s"] == pytest.approx(math.prod(SHAPE) * (1 - len(done) / n_blocks) / t, rel=0.01)


def test_fresh_ignores_the_chunks_a_killed_run_left(tmp_path, monkeypatch):
    """``--fresh`` recomputes every chunk: each fresh run writes its own partial output, never an earlier one's."""
    import tileseg.runner as runner_mod
    from tileseg.config import load_pipeline
    from tileseg.runner import run_pipeline
    from tileseg.testing.synthetic import write_blobs_zarr

    write_blobs_zarr(tmp_path / "s.zarr", (128, 128), (32, 32), seed=1)
    cfg = {"version": 1, "input": {"path": str(tmp_path / "s.zarr"), "array": "image"}, "method": {"otsu": {}},
           "tiling": {"chunks": [32, 32]}, "output": {"path": str(tmp_path / "out" / "{stem}.zarr")}}
    assert run_pipeline(load_pipeline(cfg)).ok
    keys, write = [], runner_mod.write_outputs

    def recording(outputs, *args, **kwargs):
        keys.append([o.partial_key for o in outputs])
        return write(outputs, *args, **kwargs)

    monkeypatch.setattr(runner_mod, "write_outputs", recording)
    assert run_pipeline(load_pipeline(cfg)).items[0].status == "skipped"
    assert run_pipeline(load_pipeline(cfg), fresh=True).ok
    assert run_pipeline(load_pipeline(cfg), fresh=True).ok
    assert len(keys) == 2 and keys[0] != keys[1]
