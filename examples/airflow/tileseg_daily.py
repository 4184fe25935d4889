"""Example Airflow DAG: each day, segment the scenes that arrived that day.

Files land in ``$TILESEG_DATA/incoming/<YYYY-MM-DD>/*.zarr`` (Zarr stores
with an ``image`` array, as ``examples/make_demo_data.py`` writes them). The
daily run thresholds them with ``pipelines/otsu_cleanup.yaml`` (Otsu, opening,
small-object removal, labelling; no model needed) and writes the labels to
``$TILESEG_DATA/labels/<YYYY-MM-DD>/<stem>_labels.zarr``.

A retried task resumes: the manifest in the output folder records finished
items, so a retry skips them. A day's failed items fail the task, with each
item's error in the task log; the run summary (counts, outputs, failures) is
in XCom (``return_value``, or ``tileseg_summary`` when the task failed).

Put this file in Airflow's ``dags/`` folder (with ``pip install
"tileseg[airflow,classical]"`` on the workers), or try it once without a
scheduler (Airflow 3 runs ``dag.test()`` from its database and DAGs folder)::

    export AIRFLOW_HOME=/tmp/airflow AIRFLOW__CORE__DAGS_FOLDER=$PWD/examples/airflow
    export AIRFLOW__CORE__LOAD_EXAMPLES=False TILESEG_DATA=/tmp/tileseg-airflow
    airflow db migrate
    python examples/make_demo_data.py --out $TILESEG_DATA/incoming/2026-11-30 --only 2d --size2d 2048 2048
    python examples/airflow/tileseg_daily.py 2026-11-30

A day without new files is an empty, successful run.

To run on an existing Dask cluster instead of the pipeline's own scheduler,
set ``TILESEG_SCHEDULER=tcp://scheduler:8786``.
"""

from __future__ import annotations

import os
import sys
from datetime import datetime, timezone
from pathlib import Path

from airflow.sdk import DAG

from tileseg.airflow import TilesegOperator

ROOT = Path(__file__).resolve().parents[2]
DATA = os.environ.get("TILESEG_DATA", "/data/tileseg")
PIPELINE = os.environ.get("TILESEG_PIPELINE", str(ROOT / "pipelines" / "otsu_cleanup.yaml"))

with DAG(
    dag_id="tileseg_daily",
    schedule="@daily",
    start_date=datetime(2026, 1, 1, tzinfo=timezone.utc),
    catchup=False,
    tags=["tileseg"],
) as dag:
    segment = TilesegOperator(
        task_id="segment_new_scenes",
        pipeline=PIPELINE,
        # Jinja fills {{ ds }} (the run's date); tileseg fills {stem} per item.
        input_path=DATA + "/incoming/{{ ds }}/*.zarr",
        output_path=DATA + "/labels/{{ ds }}/{stem}_labels.zarr",
        scheduler=os.environ.get("TILESEG_SCHEDULER") or None,
        retries=2,
    )


if __name__ == "__main__":  # one run without a scheduler: python examples/airflow/tileseg_daily.py YYYY-MM-DD
    day = sys.argv[1] if len(sys.argv) > 1 else datetime.now(timezone.utc).strftime("%Y-%m-%d")
    dag.test(logical_date=datetime.fromisoformat(day).replace(tzinfo=timezone.utc))
