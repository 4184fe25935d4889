"""The Airflow operator and the example DAG, run for real with ``dag.test()``.

Needs Apache Airflow (``tileseg[airflow]``); CI installs it in its own
environment (``.venv-airflow``, a separate step of ``.ci/run``). Airflow's
metadata database is a fresh SQLite file per test session.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

ROOT = Path(__file__).resolve().parents[1]
DAY = "2026-11-30"

pytest.importorskip("airflow", reason="Apache Airflow is not installed (pip install 'tileseg[airflow]')")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def airflow_home(tmp_path_factory):
    """A fresh Airflow home with a migrated SQLite database; DAGs from examples/airflow."""
    home = tmp_path_factory.mktemp("airflow-home")
    env = {"AIRFLOW_HOME": str(home), "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "examples" / "airflow"),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW__CORE__UNIT_TEST_MODE": "False"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True,
                   env={**os.environ, **env}, timeout=300)
    yield home
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _scenes(folder: Path, n: int) -> dict[str, np.ndarray]:
    from tileseg.testing.synthetic import write_blobs_zarr

    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for i in range(n):
        path = folder / f"scene{i}.zarr"
        write_blobs_zarr(path, (200, 260), (128, 128), seed=10 + i)
        out[path.stem] = zarr.open_group(str(path), mode="r")["image"][...]
    return out


def _run_dag_file(data: Path, airflow_home: Path) -> subprocess.CompletedProcess:
    """Run examples/airflow/tileseg_daily.py as a user would (its __main__ calls dag.test)."""
    env = {**os.environ, "TILESEG_DATA": str(data), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "examples" / "airflow" / "tileseg_daily.py"), DAY],
                          capture_output=True, text=True, env=env, timeout=600)


_XCOM_SCRIPT = """
import json, sys
from airflow.models.xcom import XComModel
from airflow.utils.session import create_session
dag_id, task_id, key = sys.argv[1:4]
with create_session() as session:
    rows = session.query(XComModel).filter(XComModel.dag_id == dag_id, XComModel.task_id == task_id,
                                           XComModel.key == key).order_by(XComModel.timestamp).all()
    print(json.dumps([r.value for r in rows]))
"""


def _xcom(dag_id: str, task_id: str, key: str = "return_value") -> list:
    """XCom values of a task, oldest first, read from Airflow's database in a fresh process."""
    proc = subprocess.run([sys.executable, "-c", _XCOM_SCRIPT, dag_id, task_id, key], capture_output=True,
                          text=True, env=os.environ, timeout=300, check=True)
    return [json.loads(v) if isinstance(v, str) else v for v in json.loads(proc.stdout.strip().splitlines()[-1])]


def test_example_dag_segments_the_days_files(airflow_home, tmp_path):
    skimage_filters = pytest.importorskip("skimage.filters")
    images = _scenes(tmp_path / "data" / "incoming" / DAY, 2)
    _scenes(tmp_path / "data" / "incoming" / "2026-11-29", 1)  # another day: not this run's
    proc = _run_dag_file(tmp_path / "data", airflow_home)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out_dir = tmp_path / "data" / "labels" / DAY
    assert sorted(p.name for p in out_dir.glob("*_labels.zarr")) == ["scene0_labels.zarr", "scene1_labels.zarr"]
    for stem, image in images.items():
        labels = zarr.open_group(str(out_dir / f"{stem}_labels.zarr"), mode="r")["0"][...]
        fg = image > skimage_filters.threshold_otsu(image, nbins=256)
        # the cleanup (opening, small objects) only removes foreground: labels lie inside Otsu's mask
        assert labels.max() > 5 and not np.any(labels[~fg])
    (summary,) = _xcom("tileseg_daily", "segment_new_scenes")[-1:]
    assert summary["ok"] and summary["counts"]["ok"] == 2 and summary["failures"] == []
    assert sorted(Path(p).name for p in summary["outputs"]) == ["scene0_labels.zarr", "scene1_labels.zarr"]


_RETRY_DAG = """
from datetime import datetime, timedelta, timezone
from pathlib import Path

from airflow.sdk import DAG

from tileseg.airflow import TilesegOperator

DATA = Path({data!r})


def fix_input(context):  # runs when attempt 1 failed: restore the corrupt file before the retry
    (DATA / "retried").write_text("yes")
    (DATA / "in" / "scene1.zarr" / "image" / "zarr.json").write_bytes((DATA / "good.json").read_bytes())


with DAG(dag_id="tileseg_retry", schedule=None, start_date=datetime(2026, 1, 1, tzinfo=timezone.utc),
         catchup=False) as dag:
    TilesegOperator(task_id="segment", pipeline={pipeline!r}, input_path=str(DATA / "in" / "*.zarr"),
                    output_path=str(DATA / "out" / "{{stem}}.zarr"), overrides={{"execution.scheduler": "threads"}},
                    retries=1, retry_delay=timedelta(seconds=0), on_retry_callback=fix_input)

if __name__ == "__main__":
    print("STATE", dag.test().state)
"""


def test_failed_item_fails_the_task_and_a_retry_resumes(airflow_home, tmp_path):
    """Attempt 1: one corrupt input fails the task (its error in the log); the retry recomputes only that item."""
    _scenes(tmp_path / "in", 3)
    corrupt = tmp_path / "in" / "scene1.zarr" / "image" / "zarr.json"
    (tmp_path / "good.json").write_bytes(corrupt.read_bytes())
    corrupt.write_text("{ not json")
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "retry_dag.py").write_text(_RETRY_DAG.format(data=str(tmp_path),
                                                         pipeline=str(ROOT / "pipelines" / "otsu_cleanup.yaml")))
    env = {**os.environ, "AIRFLOW__CORE__DAGS_FOLDER": str(dags), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(dags / "retry_dag.py")], capture_output=True, text=True, env=env,
                          timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "STATE success" in log, log[-4000:]
    assert (tmp_path / "retried").read_text() == "yes"
    # attempt 1's log names the failed item and why
    assert "scene1.zarr" in log and "TilesegRunFailed: 1 item(s) failed" in log, log[-4000:]
    assert "item(s) failed: " + str(tmp_path / "in" / "scene1.zarr") + ": " in log
    # (attempt 1's XCom, pushed as tileseg_summary, is cleared by Airflow when the retry starts)
    final = _xcom("tileseg_retry", "segment")[-1]
    assert final["counts"] == {"ok": 1, "skipped": 2, "failed": 0}, final  # the retry resumed
    assert all((tmp_path / "out" / f"scene{i}.zarr").exists() for i in range(3))


def test_a_day_without_new_files_succeeds_with_nothing_to_do(airflow_home, tmp_path):
    """A glob matching nothing (no new files today) is an empty run; a missing plain path stays an error."""
    from tileseg.airflow import TilesegOperator
    from tileseg.errors import TilesegError

    pipeline = str(ROOT / "pipelines" / "otsu_cleanup.yaml")
    op = TilesegOperator(task_id="empty", pipeline=pipeline, input_path=str(tmp_path / "none" / "*.zarr"),
                         output_path=str(tmp_path / "out" / "{stem}.zarr"))
    summary = op.execute({})
    assert summary["ok"] and summary["counts"] == {"ok": 0, "skipped": 0, "failed": 0}
    strict = TilesegOperator(task_id="strict", pipeline=pipeline, input_path=str(tmp_path / "none" / "*.zarr"),
                             output_path=str(tmp_path / "out" / "{stem}.zarr"), allow_no_inputs=False)
    with pytest.raises(TilesegError, match="matches nothing"):
        strict.execute({})
    missing = TilesegOperator(task_id="missing", pipeline=pipeline, input_path=str(tmp_path / "nope.zarr"),
                              output_path=str(tmp_path / "out" / "{stem}.zarr"))
    with pytest.raises(TilesegError):
        missing.execute({})
