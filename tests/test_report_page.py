"""Run reports accumulate, and the HTML report page shows every item with its quicklooks.

The page is checked as a file (self-contained: only ``data:`` images, no
links or external styles) and, where Chromium is installed (``.ci/run``
installs Debian's package), loaded in headless Chromium: every quicklook
decodes and a screenshot has real content.
"""

from __future__ import annotations

import base64
import glob
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tileseg.cli import main
from tileseg.config import load_pipeline
from tileseg.report_page import latest_items, load_runs
from tileseg.runner import run_pipeline
from tileseg.testing.synthetic import write_blobs_zarr

PIPELINE = Path(__file__).resolve().parents[1] / "pipelines" / "otsu_cleanup.yaml"
PIL = pytest.importorskip("PIL.Image")


@pytest.fixture
def run_dir(tmp_path):
    """Two runs into one folder: 3 items (one corrupt), then a rerun after fixing it."""
    for i in range(3):
        write_blobs_zarr(tmp_path / "in" / f"scene{i}.zarr", (300, 420), (128, 128), seed=20 + i)
    corrupt = tmp_path / "in" / "scene2.zarr" / "image" / "zarr.json"
    good = corrupt.read_bytes()
    corrupt.write_text("{ truncated")
    over = {"input.path": str(tmp_path / "in" / "*.zarr"), "output.path": str(tmp_path / "out" / "{stem}.zarr"),
            "execution.scheduler": "threads"}
    first = run_pipeline(load_pipeline(PIPELINE, overrides=over))
    assert [i.status for i in first.items] == ["ok", "ok", "failed"]
    corrupt.write_bytes(good)
    second = run_pipeline(load_pipeline(PIPELINE, overrides=over))
    assert [i.status for i in second.items] == ["skipped", "skipped", "ok"]
    return tmp_path / "out", first, second


def test_a_rerun_keeps_the_first_runs_figures(run_dir):
    out, first, second = run_dir
    runs = load_runs(str(out))
    assert len(runs) == 2 == len(glob.glob(str(out / "tileseg-runs" / "*.json")))
    assert [r["summary"] for r in runs] == [{"ok": 2, "skipped": 0, "failed": 1}, {"ok": 1, "skipped": 2, "failed": 0}]
    # the first run's timings survive the second run (which replaced tileseg-report.json)
    assert runs[0]["items"][0]["timings"] == json.loads(json.dumps(first.items[0].timings))
    assert json.loads((out / "tileseg-report.json").read_text())["started"] == second.started
    rows = latest_items(runs)
    assert [r["status"] for r in rows] == ["ok", "ok", "ok"]
    assert rows[0]["run"] == 1 and rows[0]["skipped_in"] == 2 and rows[0]["timings"]  # figures of run 1
    assert rows[2]["run"] == 2


def _images(page: str) -> list[np.ndarray]:
    out = []
    for _mime, b64 in re.findall(r'<img class="ql"[^>]* src="data:(image/[a-z]+);base64,([A-Za-z0-9+/=]+)"', page):
        out.append(np.asarray(PIL.open(io.BytesIO(base64.b64decode(b64)))))
    return out


def test_report_page_is_self_contained_with_every_item(run_dir):
    out, _, _ = run_dir
    res = CliRunner().invoke(main, ["report", str(out)])
    assert res.exit_code == 0, res.output
    page = (out / "tileseg-report.html").read_text()
    assert page.count("<tr class='item'") == 3
    for i in range(3):
        assert f"scene{i}.zarr" in page
    # self-contained: every src is a data: URI, no stylesheet or script from elsewhere
    assert all(v.startswith("data:") for v in re.findall(r'src="([^"]*)"', page))
    assert "<link" not in page and "@import" not in page and "url(" not in page
    imgs = _images(page)
    assert len(imgs) == 6  # input + output for each of the 3 items
    for im in imgs:
        assert max(im.shape[:2]) <= 160 and im.std() > 5  # real content, not a blank tile
    # the output quicklook shows the segmentation: coloured objects where the input is bright
    labels_rgb = imgs[1]
    assert (labels_rgb.reshape(-1, 3).max(axis=1) > 0).mean() > 0.01


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--host-resolver-rules=MAP * ~NOTFOUND"]


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (.ci/run installs Debian's chromium)")
def test_report_page_renders_in_headless_chromium(run_dir, tmp_path):
    out, _, _ = run_dir
    CliRunner().invoke(main, ["report", str(out)])
    page = (out / "tileseg-report.html").resolve()
    profile = tmp_path / "chromium-profile"
    common = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--window-size=1400,1000"]
    dom = subprocess.run([*common, "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=180)
    assert 'data-images-loaded="6"' in dom.stdout, (dom.stdout[-2000:], dom.stderr[-2000:])
    assert dom.stdout.count('class="item"') == 3
    shot = tmp_path / "page.png"
    subprocess.run([*common, f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=180, check=True)
    pixels = np.asarray(PIL.open(shot).convert("RGB")).astype(int)
    assert pixels.std() > 20  # not a blank page
    # the quicklooks' label colours (tileseg.quicklook.PALETTE) are on screen
    from tileseg.quicklook import PALETTE

    hits = sum(int(np.all(np.abs(pixels - c) < 12, axis=-1).sum()) for c in PALETTE[:1])
    assert hits > 100, hits
    assert os.path.getsize(shot) > 10_000


def test_report_on_a_folder_without_runs_is_a_usage_error_like_a_missing_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    res = CliRunner().invoke(main, ["report", str(empty)])
    assert res.exit_code == 2 and "no tileseg run report" in res.output
    assert not (empty / "tileseg-report.html").exists()
    missing = CliRunner().invoke(main, ["report", str(tmp_path / "missing")])
    assert missing.exit_code == 2
