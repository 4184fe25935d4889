"""Apache Airflow operator: run a tileseg pipeline as one task of a DAG.

Install with ``pip install "tileseg[airflow]"``. The operator loads the
pipeline file, applies the (templated) input/output overrides, runs it with
:func:`tileseg.run` and pushes a run summary (counts, outputs, failures) to
XCom. A retried task resumes: items the run manifest records as done (same
input and pipeline) are skipped, and items that failed are run again
(``retry_failed``), so a retry only does the work that is left.

Examples
--------
>>> from tileseg.airflow import TilesegOperator  # doctest: +SKIP
>>> TilesegOperator(  # doctest: +SKIP
...     task_id="segment",
...     pipeline="/opt/pipelines/water_cog.yaml",
...     input_path="/data/incoming/{{ ds }}/*.tif",
...     output_path="/data/water/{{ ds }}/{stem}_water.tif",
... )
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

try:  # Airflow 3: the task SDK
    from airflow.sdk import BaseOperator
except ImportError:  # pragma: no cover - only without Airflow 3
    try:
        from airflow.models import BaseOperator  # type: ignore[no-redef]
    except ImportError as exc:
        raise ImportError(
            "tileseg.airflow needs Apache Airflow: pip install 'tileseg[airflow]'"
        ) from exc

from .errors import TilesegError

__all__ = ["TilesegOperator", "TilesegRunFailed", "run_summary"]


class TilesegRunFailed(TilesegError):
    """Raised by :class:`TilesegOperator` when at least one item of the run failed."""


def run_summary(report: Any) -> dict[str, Any]:
    """The JSON-ready summary of a run that the operator pushes to XCom.

    Parameters
    ----------
    report : tileseg.report.RunReport
        What :func:`tileseg.run` returned.

    Returns
    -------
    dict
        ``ok``, ``counts`` (items per status), ``outputs`` (paths of every
        item that has them), ``failures`` (input and error of each failed
        item), ``report_path``, ``manifest_path`` and ``duration_s``.
    """
    outputs: list[str] = []
    failures: list[dict[str, str]] = []
    for item in report.items:
        if item.error:
            failures.append({"input": str(item.input), "error": str(item.error)})
        elif item.outputs:
            outputs.extend(str(p) for p in item.outputs)
        elif item.output:
            outputs.append(str(item.output))
    return {
        "ok": bool(report.ok),
        "counts": dict(report.counts()),
        "outputs": outputs,
        "failures": failures,
        "report_path": report.report_path,
        "manifest_path": report.manifest_path,
        "duration_s": report.duration_s,
    }


class TilesegOperator(BaseOperator):
    """Run a tileseg pipeline over its inputs; push the run summary to XCom.

    Parameters
    ----------
    pipeline : str
        Path of the pipeline YAML file (templated).
    input_path : str or list of str, optional
        Replaces ``input.path`` (templated): a file, folder, glob or URL.
        Relative paths resolve against the pipeline file's folder.
    output_path : str, optional
        Replaces the path of the pipeline's output (templated; for a pipeline
        with several ``outputs:``, use ``overrides={"outputs.1.path": ...}``).
    overrides : dict, optional
        Further values by dotted key, e.g. ``{"execution.workers": 4}``
        (templated).
    scheduler : str, optional
        ``tcp://host:port`` of an existing Dask scheduler, or ``threads``,
        ``processes``, ``local`` (templated). Default: the pipeline's.
    fail_on_item_error : bool
        Fail the task when any item failed (after pushing the summary), with
        each failed item's error in the log and the exception. Default True.
    allow_no_inputs : bool
        When the input is a glob (``*.tif``) that matches nothing (a day
        without new files), succeed with an empty summary instead of failing.
        Default True; a missing plain path is always an error.
    **kwargs
        Passed to Airflow's ``BaseOperator`` (``task_id``, ``retries`` ...).

    Notes
    -----
    The return value (the summary of :func:`run_summary`) is pushed to XCom
    as ``return_value``; on failure the summary is pushed under the key
    ``tileseg_summary`` before the task fails.
    """

    template_fields: Sequence[str] = ("pipeline", "input_path", "output_path", "overrides", "scheduler")
    template_ext: Sequence[str] = ()
    ui_color = "#cfe8d5"

    def __init__(
        self,
        *,
        pipeline: str | os.PathLike[str],
        input_path: str | list[str] | None = None,
        output_path: str | None = None,
        overrides: Mapping[str, Any] | None = None,
        scheduler: str | None = None,
        fail_on_item_error: bool = True,
        allow_no_inputs: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.pipeline = os.fspath(pipeline)
        self.input_path = input_path
        self.output_path = output_path
        self.overrides = dict(overrides or {})
        self.scheduler = scheduler
        self.fail_on_item_error = fail_on_item_error
        self.allow_no_inputs = allow_no_inputs

    def pipeline_overrides(self) -> dict[str, Any]:
        """The dotted-key overrides this task applies to the pipeline file."""
        out: dict[str, Any] = {}
        if self.input_path:
            out["input.path"] = self.input_path
        if self.output_path:
            out["output.path"] = self.output_path
        out.update(self.overrides)
        return out

    def execute(self, context: Any) -> dict[str, Any]:
        """Run the pipeline; return (push to XCom) the run summary."""
        from .api import run
        from .config import load_pipeline

        cfg = load_pipeline(self.pipeline, overrides=self.pipeline_overrides())
        self.log.info("tileseg: running %s over %s", self.pipeline, ", ".join(cfg.input.path))
        try:
            report = run(cfg, scheduler=self.scheduler, retry_failed=True)
        except TilesegError as exc:  # ImageNotFoundError, reported as a ConfigError naming input.path
            if not (self.allow_no_inputs and str(exc).endswith("matches nothing")):
                raise
            self.log.info("tileseg: nothing to do: %s", exc)
            return {"ok": True, "counts": {"ok": 0, "skipped": 0, "failed": 0}, "outputs": [], "failures": [],
                    "report_path": None, "manifest_path": None, "duration_s": 0.0}  # an attempt retries what failed before
        summary = run_summary(report)
        self.log.info("tileseg: %s", ", ".join(f"{n} {s}" for s, n in summary["counts"].items()))
        self.log.info("tileseg: report %s", summary["report_path"])
        for failure in summary["failures"]:
            self.log.error("tileseg: item %s failed: %s", failure["input"], failure["error"])
        if summary["failures"] and self.fail_on_item_error:
            ti = context.get("ti") if isinstance(context, Mapping) else None
            if ti is not None:
                ti.xcom_push(key="tileseg_summary", value=summary)
            lines = "; ".join(f"{f['input']}: {f['error']}" for f in summary["failures"])
            raise TilesegRunFailed(f"{len(summary['failures'])} item(s) failed: {lines}")
        return summary
