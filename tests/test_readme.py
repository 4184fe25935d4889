"""README's Python example runs as written on the demo data and gives the pipeline's Dice."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### From Python"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_example_gives_the_pipelines_dice(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    import tileseg

    # the repository layout the example expects, with a smaller demo volume
    subprocess.run([sys.executable, str(ROOT / "examples" / "make_demo_data.py"), "--out", str(tmp_path / "data" / "demo"),
                    "--only", "3d", "--size3d", "96", "112", "80", "--chunks3d", "48", "48", "48"],
                   check=True, capture_output=True)
    shutil.copytree(ROOT / "examples" / "models", tmp_path / "examples" / "models")
    shutil.copytree(ROOT / "pipelines", tmp_path / "pipelines")
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(_python_example(), "README.md", "exec"), {})  # noqa: S102 - our own README
    printed = float(re.search(r"Dice blob: ([0-9.]+)", out.getvalue()).group(1))
    report = tileseg.run(tmp_path / "pipelines" / "demo3d.yaml", scheduler="threads")
    assert report.ok, report.items[0].error
    assert printed == round(report.items[0].dice["blob"], 3)
    assert printed > 0.85  # the bundled model does segment the blobs
    written = tileseg.open(os.path.join("out", "volume3d_seg.zarr"))
    assert written.class_names == ("background", "blob") and written.spacing == report_spacing(tmp_path)


def report_spacing(root: Path) -> tuple[float, ...]:
    import tileseg

    return tileseg.open(root / "data" / "demo" / "volume3d.zarr", array="image").spacing
