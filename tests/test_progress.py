"""The run's progress display: figures, and how much it writes to a terminal and to a log."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest

from tileseg.progress import RunProgress

ROOT = Path(__file__).resolve().parents[1]


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _drive(p: RunProgress, n_items: int, chunks: int, fail: set[int] = frozenset()) -> None:
    for i in range(n_items):
        p.start_item(i, f"scene{i}")
        p.stage(i, "compute", chunks_total=chunks)
        for _ in range(chunks):
            p.chunk_done(i, pixels=1000)
        p.finish_item(i, "failed" if i in fail else "ok", "bad header" if i in fail else "")
    p.close()


def test_log_mode_writes_a_few_lines_per_item_not_redraws():
    out = io.StringIO()  # not a terminal
    p = RunProgress(5, stream=out, interval=3600)
    assert p.mode == "log"
    _drive(p, 5, chunks=200, fail={3})
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert len(lines) <= 2 * 5 + 2  # one per finished item, the first status line and the last
    assert lines[-1].startswith("tileseg: 4 done, 0 skipped, 1 failed of 5 items")
    assert any("scene3: failed (bad header)" in line for line in lines)
    assert p.snapshot()["chunks_done"] == 0 and p.snapshot()["items_failed"] == 1


def test_log_mode_status_lines_come_at_the_interval():
    out = io.StringIO()
    p = RunProgress(2, stream=out, interval=0.05)
    p.start_item(0, "a")
    p.stage(0, "compute", chunks_total=10)
    n0 = p.lines_written
    for _ in range(10):
        p.chunk_done(0)
    assert p.lines_written == n0  # chunk events within the interval write nothing
    time.sleep(0.06)
    p.chunk_done(0, n=0)
    assert p.lines_written == n0 + 1
    assert "1 running (10/10 chunks; a: compute)" in out.getvalue().splitlines()[-1]


def test_eta_counts_chunks_of_running_items():
    p = RunProgress(4, stream=io.StringIO(), mode="log", interval=3600)
    p.start_item(0, "a")
    p.stage(0, "compute", chunks_total=10)
    p.finish_item(0, "ok")
    p.start_item(1, "b")
    p.stage(1, "compute", chunks_total=10)
    for _ in range(5):
        p.chunk_done(1, pixels=10)
    s = p.snapshot()
    assert s["work_done"] == pytest.approx(1.5)
    assert s["eta_s"] == pytest.approx(s["elapsed_s"] * (4 - 1.5) / 1.5, rel=0.05, abs=0.05)
    assert s["items_running"] == 1 and (s["chunks_done"], s["chunks_total"]) == (5, 10)


def test_bar_on_a_terminal_and_off_when_quiet():
    tty = _Tty()
    p = RunProgress(3, stream=tty)
    assert p.mode == "bar"
    _drive(p, 3, chunks=4)
    text = tty.getvalue()
    assert "3.00/3 items" in text and "3 ok, 0 failed" in text
    quiet = io.StringIO()
    q = RunProgress(3, stream=quiet, mode="off")
    _drive(q, 3, chunks=4)
    assert quiet.getvalue() == "" and q.snapshot()["items_done"] == 3


def _run_cli(args, cwd):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([sys.executable, "-m", "tileseg.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)


def test_tileseg_run_in_a_log_writes_a_few_lines_per_item(tmp_path):
    """Output not a terminal: plain lines (no redraws), a few per item, and the figures in the report."""
    from tileseg.testing.synthetic import write_blobs_zarr

    for i in range(4):
        write_blobs_zarr(tmp_path / "in" / f"s{i}.zarr", (300, 300), (64, 64), seed=i)
    pipeline = ROOT / "pipelines" / "otsu_cleanup.yaml"
    sets = ["--set", f"input.path={tmp_path / 'in' / '*.zarr'}", "--set", f"output.path={tmp_path / 'out' / '{stem}.zarr'}",
            "--set", "tiling.chunks=[64, 64]"]
    proc = _run_cli(["run", str(pipeline), *sets, "--report-page"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = proc.stderr
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("tileseg: ")]
    assert 4 <= len(lines) <= 3 * 4 + 2, err
    assert "[4/4] s3.zarr: ok" in err or any(line.startswith("tileseg: [4/4]") for line in lines)
    assert lines[-1].startswith("tileseg: 4 done, 0 skipped, 0 failed of 4 items")
    report = json.loads((tmp_path / "out" / "tileseg-report.json").read_text())
    assert report["progress"]["items_done"] == 4 and report["progress"]["items_total"] == 4
    assert (tmp_path / "out" / "tileseg-report.html").is_file()
    # -q means one thing everywhere: no progress display, only warnings and errors, before or after `run`
    for args in (["-q", "run", str(pipeline), *sets, "--fresh"], ["run", "-q", str(pipeline), *sets, "--fresh"]):
        quiet = _run_cli(args, tmp_path)
        assert quiet.returncode == 0, quiet.stderr[-2000:]
        assert not any(line.startswith("tileseg: ") for line in quiet.stderr.splitlines()), quiet.stderr


def test_chunks_are_counted_from_the_records_while_an_item_computes(tmp_path):
    """The display's chunk counts come from the finished-chunk records the writers keep."""
    from tileseg.progress import watch_chunks
    from tileseg.writers.blocks import records_of

    class H:
        target = str(tmp_path / "partial")
        shape, chunks = (100, 100), (50, 30)  # 2 x 4 chunks

    p = RunProgress(1, stream=io.StringIO(), mode="log", interval=3600)
    p.start_item(0, "a")
    with watch_chunks(p, 0, [H()], pixels=10_000, every_s=0.01):
        for idx in [(0, 0), (0, 1), (1, 3)]:
            records_of(H.target).mark(idx)
        time.sleep(0.1)
        assert (p.snapshot()["chunks_done"], p.snapshot()["chunks_total"]) == (3, 8)
    assert p.pixels == int(10_000 * 3 / 8)
