"""Run a pipeline over every input item: open, segment, post-process, write, evaluate.

Items run concurrently, up to ``execution.max_items_in_flight`` at a time
(:mod:`tileseg.item_pool`), on one scheduler: the caller's ``distributed``
client when there is one, else the one ``execution.scheduler`` names
(:mod:`tileseg.execution`). One bad item fails with its error recorded (file
and message) while the others still finish; nothing already written is lost.

State is kept per item in the run manifest, ``tileseg-run.sqlite``
(:mod:`tileseg.manifest`), next to the outputs. Before processing an item a
run *claims* it in one transaction, so two runs into one folder never both
process it. An item is skipped when the manifest records it done with the
same pipeline fingerprint and input fingerprint (:mod:`tileseg.fingerprint`)
*and* every writer confirms its output complete, never because a file
exists. An item that failed with unchanged input is reported failed again
without running unless ``retry_failed``; ``fresh`` ignores the earlier state.

Before any work the run refuses outputs that collide, that would replace or
contain an input (:mod:`tileseg.outputs`), and output folders it cannot
write; an item whose planned output exceeds the free space fails before
computing.

An item may have several outputs (``outputs:``), for example the labels and
the model's probabilities: their write tasks are computed together, so the
model runs once, and each is finalized (made complete) only after all of
them were written.

Overwriting: an existing output is replaced only when its ``overwrite`` is
true or when the manifest recorded the item (a partial or earlier result of
a tileseg run into the same outputs). Anything else already on disk is left
alone and the item fails with an :class:`~tileseg.errors.OutputError`.

The JSON run report (``tileseg-report.json`` next to the outputs) holds the
fully resolved pipeline, package versions, the scheduler and, per item:
status, input, outputs, shape, chunks, patches, timings per stage
(``open``; ``statistics``: whole-image reductions made while the graph is
built, such as a histogram or z-score means; ``graph``: the rest of building
and preparing the outputs; ``components``: the first pass of a
connected-components step, which computes the upstream steps once while the
graph is built (:mod:`tileseg.passes`); ``compute_write``; ``finalize``;
``evaluate``). Set-up is ``graph`` + ``statistics``; computing the result is
``components`` + ``compute_write``, and the throughput (pixels/s) is over
those two. Then peak RSS, the error if any, and Dice if evaluated. Both
whole-image passes show their progress (tasks done) in the run's display and,
with ``-v``, in the log.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np

from .config import OutputConfig, PipelineConfig, load_pipeline
from .errors import InputError, RunInterrupted
from .execution import SchedulerInfo, compute, scheduler_context
from .fingerprint import config_fingerprint, input_fingerprint, output_hash, settings_fingerprint
from .image import Image
from .item_pool import run_items
from .items import build_item, error_text, expand_items, load_model, open_item, render_all
from .manifest import DONE, MANIFEST_NAME, PENDING, Decision, Heartbeat, Manifest, item_key
from .manifest import FAILED as M_FAILED
from .outputs import (
    check_free_space,
    check_not_inputs,
    check_outputs,
    check_writable,
    output_dir,
    protected_paths,
    render_output,
)
from .outputs import join as _join
from .progress import RunProgress, watch_chunks, written_share
from .readers._slab_cache import SLAB_CACHE
from .report import (
    FAILED,
    INTERRUPTED,
    OK,
    PENDING_STATUS,
    SKIPPED,
    ItemResult,
    PeakRSS,
    RunReport,
    now_iso,
    package_versions,
)
from .store import local_path
from .writers.base import remove_stale

log = logging.getLogger(__name__)

REPORT_NAME = "tileseg-report.json"
#: Seconds between report rewrites while items finish (the final report is always written).
REPORT_EVERY_S = 2.0


# --------------------------------------------------------------------------- stages


class _Timer:
    """Times the stages of one item and logs a line when each starts and ends (progress from the first stage)."""

    def __init__(self, label: str = "", on_stage: Callable[[str], None] | None = None) -> None:
        self.timings: dict[str, float] = {}
        self.label = label
        self.t0 = time.perf_counter()
        self.on_stage = on_stage

    @contextmanager
    def stage(self, name: str, what: str | None = None) -> Iterator[None]:
        """Time a stage counted as ``name``; ``what`` (default ``name``) is what the log and progress show."""
        t0 = time.perf_counter()
        what = what or name
        if self.on_stage is not None:
            self.on_stage(what)
        log.info("%s: %s ... (%.1f s into the item)", self.label, what, t0 - self.t0)
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            self.timings[name] = round(self.timings.get(name, 0.0) + dt, 4)
            log.info("%s: %s done in %.1f s", self.label, what, dt)

    def split(self, stage: str, part: str, seconds: float) -> None:
        """Move ``seconds`` of ``stage`` into its own entry ``part`` (e.g. statistics computed while building)."""
        if seconds <= 0:
            return
        self.timings[part] = round(self.timings.get(part, 0.0) + seconds, 4)
        self.timings[stage] = round(max(0.0, self.timings.get(stage, 0.0) - seconds), 4)
        log.info("%s: of which %.1f s in whole-image passes (%s)", self.label, seconds, part)


class _EagerComputes:
    """Seconds spent in Dask computes while a graph is built, per kind of pass, with their progress.

    The kind comes from :func:`tileseg.passes.current_pass` in the thread
    that builds the graph (``statistics`` when not marked). Counted with a
    local-scheduler callback that ignores computes started by other threads
    (other items); on a distributed client nothing is counted.

    Parameters
    ----------
    label : str
        The item, for log lines.
    on_progress : callable, optional
        ``on_progress(kind, tasks_done, tasks_total)`` while a pass runs (at
        most every ``every_s`` seconds, and at its end).
    every_s : float
        Seconds between progress calls.
    log_every_s : float
        Seconds between progress log lines (``-v``).
    """

    def __init__(self, label: str = "", on_progress: Callable[[str, int, int], None] | None = None,
                 every_s: float = 0.5, log_every_s: float = 10.0) -> None:
        self.seconds: dict[str, float] = {}
        self.label = label
        self.on_progress = on_progress
        self.every_s = every_s
        self.log_every_s = log_every_s
        self._thread = threading.get_ident()
        self._stack: list[dict[str, Any]] = []
        self._cb: Any = None

    def _begin(self, n_tasks: int) -> None:
        from .passes import current_pass

        kind, what = current_pass() or ("statistics", "")
        now = time.perf_counter()
        self._stack.append({"kind": kind, "what": what, "t0": now, "done": 0, "total": n_tasks, "shown": 0.0,
                            "logged": now})

    def _tasks(self, n_tasks: int) -> None:
        """The number of tasks to run, known once the scheduler has its state (literals are not run)."""
        if self._stack:
            p = self._stack[-1]
            p["total"] = n_tasks
            log.info("%s: %s pass%s ... (%d tasks)", self.label, p["kind"], f" ({p['what']})" if p["what"] else "",
                     n_tasks)
            self._report(p, force=True)

    def _task_done(self) -> None:
        if self._stack:
            p = self._stack[-1]
            p["done"] += 1
            self._report(p)

    def _end(self) -> None:
        if not self._stack:
            return
        p = self._stack.pop()
        dt = time.perf_counter() - p["t0"]
        self.seconds[p["kind"]] = self.seconds.get(p["kind"], 0.0) + dt
        self._report(p, force=True)
        log.info("%s: %s pass done in %.1f s", self.label, p["kind"], dt)

    def _report(self, p: dict[str, Any], force: bool = False) -> None:
        now = time.perf_counter()
        if self.on_progress is not None and (force or now - p["shown"] >= self.every_s):
            p["shown"] = now
            self.on_progress(p["kind"], p["done"], p["total"])
        if now - p["logged"] >= self.log_every_s:
            p["logged"] = now
            log.info("%s: %s pass: %d/%d tasks (%.0f%%)", self.label, p["kind"], p["done"], p["total"],
                     100.0 * p["done"] / max(1, p["total"]))

    def __enter__(self) -> _EagerComputes:
        from dask.callbacks import Callback

        outer = self

        class _CB(Callback):
            def _start(self, dsk: Any) -> None:
                if threading.get_ident() == outer._thread:
                    outer._begin(len(dsk))

            def _start_state(self, dsk: Any, state: Any) -> None:
                if threading.get_ident() == outer._thread:
                    outer._tasks(max(0, len(dsk) - len(state.get("cache", ()))))

            def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
                if threading.get_ident() == outer._thread:
                    outer._task_done()

            def _finish(self, dsk: Any, state: Any, errored: bool) -> None:
                if threading.get_ident() == outer._thread:
                    outer._end()

        self._cb = _CB()
        self._cb.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._cb.__exit__(*exc)




# --------------------------------------------------------------------------- writing


@dataclasses.dataclass
class _Output:
    """One output of one item: its settings, rendered path, hash and writer."""

    cfg: OutputConfig
    path: str
    config_hash: str
    writer: Any
    #: Names the partial output a killed run leaves for the next one: the output's hash and the
    #: input's fingerprint (an input changed in place must not resume chunks of the old one).
    partial_key: str | None = None


def _writer(name: str):
    from .writers import get_writer

    return get_writer(name)


def write_outputs(outputs: list[_Output], images: list[Image], *, overwrite: list[bool], sched: SchedulerInfo | None,
                  progress: bool, timer: _Timer, info: dict[str, Any],
                  on_chunks: Callable[[list[Any]], Any] | None = None) -> list[Any]:
    """Prepare every output, compute all write tasks together (streaming chunk by chunk), then finalize each.

    Returns the writers' handles. On failure every prepared output is aborted
    (a finished output of an earlier run stays in place until ``finalize``).
    """
    handles: list[Any] = []
    keyed: list[bool] = []
    try:
        with timer.stage("graph", "write graph"):  # counted with the graph stage, logged apart
            for out, image, ow in zip(outputs, images, overwrite):
                options = dict(out.cfg.options)
                keyed.append(_takes_partial_key(out.writer) and "partial_key" not in options)
                if keyed[-1]:  # a killed or failed run leaves this partial output for the next run to resume
                    options["partial_key"] = out.partial_key or out.config_hash
                handles.append(out.writer.prepare(image, out.path, overwrite=ow, **options))
            tasks = [out.writer.write_task(h, image) for out, h, image in zip(outputs, handles, images)]
        with timer.stage("compute_write"), (on_chunks(handles) if on_chunks else nullcontext()):
            compute(sched, *tasks, progress=progress)
        SLAB_CACHE.clear()  # decoded DICOM planes of this item (threads scheduler): not needed by finalize
        with timer.stage("finalize"):
            for out, h in zip(outputs, handles):
                out.writer.finalize(h, {**info, "config_hash": out.config_hash})
    except BaseException:
        for out, h, keep in zip(outputs, handles, keyed):
            if keep:  # hidden partial output with its chunk records: the next run resumes it
                log.info("%s: partial output %s kept for resuming", out.path, h.target)
                continue
            try:
                out.writer.abort(h)  # local: removes the partial copy; a finalized output is already in place
            except Exception as exc:  # pragma: no cover - best effort
                log.warning("could not clean up %s: %s", out.path, exc)
        raise
    return handles


def _takes_partial_key(writer: Any) -> bool:
    """Whether ``writer.prepare`` resumes partial outputs by key (see :mod:`tileseg.writers.blocks`)."""
    import inspect

    try:
        return "partial_key" in inspect.signature(writer.prepare).parameters
    except (TypeError, ValueError):
        return False


# --------------------------------------------------------------------------- evaluation


#: Evaluation refuses more labels than this (instance labels are not classes).
MAX_EVAL_CLASSES = 1024


def evaluate_item(cfg: PipelineConfig, item: str, index: int, out: str,
                  sched: SchedulerInfo | None) -> dict[str, float | None]:
    """Dice per class of the written output ``out`` against the configured reference."""
    from .readers import open_image

    assert cfg.evaluate is not None
    ref_cfg = cfg.evaluate.reference
    ref_path = render_output(ref_cfg.path, item, index) if ref_cfg.path else item
    ref = open_image(ref_path, reader=ref_cfg.reader, array=ref_cfg.array, level=ref_cfg.level)
    pred = open_image(out)
    pdata = pred.data[0] if pred.has_channels and pred.data.shape[0] == 1 else pred.data
    rdata = ref.data[0] if ref.has_channels and ref.data.shape[0] == 1 else ref.data
    if pdata.dtype.kind not in "biu":
        raise InputError(f"evaluate: output {out!r} holds {pdata.dtype} values, not labels; "
                         "use model.output: labels, or add argmax (or threshold) to postprocess")
    if tuple(pdata.shape) != tuple(rdata.shape):
        raise InputError(f"evaluate: reference {ref_path!r} has shape {tuple(rdata.shape)!r} "
                         f"but the output has {tuple(pdata.shape)!r}")
    from .metrics import metrics

    # nodata in the reference, and pixels the output marks nodata, are not scored
    ignore = None if ref.nodata is None else int(ref.nodata)
    if pred.nodata is not None and not (isinstance(pred.nodata, float) and np.isnan(pred.nodata)):
        import dask.array as da

        ignore = -1 if ignore is None else ignore
        rdata = da.where(pdata == pred.nodata, ignore, rdata.astype(np.int64))
    names = list(pred.class_names) if pred.class_names else None
    if names is None and cfg.model is not None and cfg.model.classes:
        names = list(cfg.model.classes)
    if names:
        n = len(names)  # labels outside 0..n-1 are an error, reported by metrics()
    else:
        n = int(max(compute(sched, pdata.max(), rdata.max()))) + 1
    if n > MAX_EVAL_CLASSES:
        raise InputError(f"evaluate: labels go up to {n - 1}: too many classes for Dice "
                         f"(at most {MAX_EVAL_CLASSES}); evaluate before instance labelling")
    scores = metrics(pdata, rdata, n, ignore_index=ignore)
    return {(names[int(c)] if names and int(c) < len(names) else str(c)): v["dice"]
            for c, v in scores["classes"].items()}


# --------------------------------------------------------------------------- the run


def manifest_path(cfg: PipelineConfig, directory: str) -> str:
    """Where the run manifest lives: ``execution.manifest``, else next to the outputs.

    Remote output folders keep it in the user's cache folder (SQLite needs a
    local disk), one file per output folder.
    """
    if cfg.execution.manifest:
        return cfg.execution.manifest
    local = local_path(directory)
    if local is not None:
        return os.path.join(local, MANIFEST_NAME)
    import hashlib

    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    name = hashlib.sha256(directory.rstrip("/").encode()).hexdigest()[:16]
    log.warning("outputs in %s: the run manifest is kept on this machine under %s (set execution.manifest to "
                "share it)", directory, cache)
    return os.path.join(cache, "tileseg", "manifests", f"{name}-{MANIFEST_NAME}")


def run_pipeline(pipeline: Any, *, scheduler: str | None = None, client: Any = None, resume: bool = True,
                 fresh: bool = False, retry_failed: bool = False, progress: bool = False,
                 notify: Callable[[str], None] | None = None) -> RunReport:
    """Run a pipeline over all its input items, up to ``execution.max_items_in_flight`` at a time.

    Parameters
    ----------
    pipeline : str, os.PathLike, dict or PipelineConfig
        A pipeline file or an already loaded pipeline.
    scheduler : str, optional
        Overrides ``execution.scheduler`` (``threads``, ``processes``,
        ``synchronous``, ``local`` or ``tcp://host:port``).
    client : distributed.Client, optional
        Compute on this client (left open). Without ``scheduler`` or an
        ``execution.scheduler`` in the pipeline, the caller's active client
        is used the same way.
    resume : bool
        ``False`` is ``fresh=True`` (kept for older callers).
    fresh : bool
        Ignore earlier state: recompute items recorded done or failed.
    retry_failed : bool
        Run again the items an earlier run recorded failed (items whose input
        changed run again anyway).
    progress : bool
        Show one progress display for the run (:mod:`tileseg.progress`): a bar
        on a terminal, a few log lines per item otherwise. Its figures also go
        into the report (``report.progress``).
    notify : callable, optional
        Receives one-line messages for the user: the dashboard link, and one
        line per finished item when several are in flight.

    Returns
    -------
    RunReport
        Per-item results; also written as JSON next to the outputs
        (``report.report_path``). ``report.ok`` is false if any item failed
        (``report.error`` says why when the model could not be loaded).

    Raises
    ------
    ConfigError
        Invalid pipeline, no inputs, output paths that collide or that would
        replace an input.
    OutputError
        An output folder that cannot be created or written.
    RunInterrupted, KeyboardInterrupt
        The run was stopped; claims went back to ``pending`` in the manifest
        and no final-named partial output was left.
    """
    cfg = load_pipeline(pipeline)
    fresh = fresh or not resume
    t_start = time.perf_counter()
    items = expand_items(cfg)
    paths = render_all(cfg, items)
    ok = [i for i, (_, err) in enumerate(items) if err is None]
    check_outputs([paths[i] for i in ok], [items[i][0] for i in ok])
    every_output = [p for ps in paths for p in ps]
    protected = list(protected_paths(cfg, [item for item, _ in items]))
    check_not_inputs(every_output, protected)
    directory = output_dir(every_output or [cfg.all_outputs()[0].path])
    check_writable([p for i in ok for p in paths[i]] or [_join(directory, REPORT_NAME)])
    mpath = manifest_path(cfg, directory)
    check_not_inputs([mpath], protected, key="execution.manifest", what="run manifest")
    manifest = Manifest(mpath, lease_s=cfg.execution.lease_s)
    report = RunReport(pipeline=cfg.model_dump(mode="json"), versions={}, started=now_iso(),
                       manifest_path=manifest.path, run_id=manifest.run_id)
    display = RunProgress(len(items), mode="auto" if progress else "off")
    state = _RunState(cfg=cfg, items=items, paths=paths, manifest=manifest, report=report, display=display,
                      report_path=_join(directory, REPORT_NAME), fingerprint=config_fingerprint(cfg),
                      settings=settings_fingerprint(cfg),
                      writers=[_writer(o.writer) for o in cfg.all_outputs()], fresh=fresh,
                      retry_failed=retry_failed, progress=progress, notify=notify)
    report.items = [ItemResult(index=i, input=item, output=(paths[i] or [None])[0], outputs=paths[i] or None,
                               status=PENDING_STATUS) for i, (item, _) in enumerate(items)]
    try:
        with scheduler_context(cfg.execution, override=scheduler, client=client) as sched, Heartbeat(manifest):
            state.sched = sched
            report.scheduler = sched.describe()
            if notify is not None and report.scheduler.get("dashboard"):
                notify(f"dashboard: {report.scheduler['dashboard']}")
            try:
                first = _warm_up(state, sched) if cfg.execution.max_items_in_flight > 1 else 0
                run_items(range(first, len(items)), state.process,
                          max_in_flight=cfg.execution.max_items_in_flight, on_interrupt=sched.cancel)
                if cfg.model is not None:
                    report.model_loads = _model_loads(sched)
                    report.batch_sizes = _batch_sizes(sched, state)
            except KeyboardInterrupt as exc:
                report.interrupted = True
                report.error = f"interrupted ({type(exc).__name__}: {exc or 'Ctrl-C'}); rerun to continue"
                manifest.release_all(report.error)
                for r in report.items:
                    if r.status == PENDING_STATUS:
                        r.status, r.error = INTERRUPTED, report.error
                raise
    finally:
        report.versions = package_versions()
        report.finished = now_iso()
        report.duration_s = round(time.perf_counter() - t_start, 3)
        display.close()
        state.write_report()
        manifest.close()
    return report


def _warm_up(state: _RunState, sched: SchedulerInfo) -> int:
    """Run items one at a time until one is computed; return the index the concurrent part starts at.

    The first computed item imports what the pipeline needs (scikit-image's lazily
    loaded submodules, torch, codecs) on one thread: several item drivers
    importing the same lazily loaded package at once can see it half
    initialised (seen with ``skimage.morphology``).
    """
    for index in range(len(state.items)):
        run_items([index], state.process, max_in_flight=1, on_interrupt=sched.cancel)
        if state.report.items[index].status == OK:
            return index + 1
    return len(state.items)


@dataclasses.dataclass
class _RunState:
    """What the item drivers of one run share (the manifest, the report, the model)."""

    cfg: PipelineConfig
    items: list[tuple[str, Exception | None]]
    paths: list[list[str]]
    manifest: Manifest
    report: RunReport
    report_path: str
    fingerprint: str
    settings: str
    writers: list[Any]
    fresh: bool
    retry_failed: bool
    progress: bool
    notify: Callable[[str], None] | None
    sched: SchedulerInfo | None = None
    display: RunProgress | None = None
    _lock: Any = dataclasses.field(default_factory=threading.Lock)
    _model_lock: Any = dataclasses.field(default_factory=threading.Lock)
    _predictor: Any = None
    _model_error: BaseException | None = None
    _finished: int = 0
    _written: float = -1e9

    def write_report(self, force: bool = True) -> None:
        """Write the JSON report; unforced writes (after each item) at most once per :data:`REPORT_EVERY_S`."""
        with self._lock:
            now = time.monotonic()
            if force or now - self._written >= REPORT_EVERY_S:
                if self.display is not None:
                    self.report.progress = self.display.snapshot()
                self.report.write(self.report_path)
                self._written = now

    def predictor(self) -> Any:
        """The model, loaded once by the first item that needs it (a failure is kept and re-raised)."""
        with self._model_lock:
            if self._predictor is None and self._model_error is None:
                try:
                    self._predictor = load_model(self.cfg)
                except Exception as exc:
                    self._model_error = exc
                    self.report.error = f"the model failed to load: {type(exc).__name__}: {exc}"
                    log.error("%s", self.report.error)
            if self._model_error is not None:
                raise _ModelLoadFailed(self.report.error) from self._model_error
            return self._predictor

    def done(self, result: ItemResult) -> None:
        with self._lock:
            self._finished += 1
        if self.display is not None:
            self.display.finish_item(result.index, result.status, result.error or result.skipped_reason or "",
                                     name=_item_name(result.input))
        self.write_report(force=False)

    def process(self, index: int, stop: threading.Event) -> None:
        """Claim, run and record one item (never raises for the item's own failure)."""
        if stop.is_set():
            return
        item, err = self.items[index]
        result = self.report.items[index]
        if err is not None:
            result.status, result.error = FAILED, error_text(err, item)
            log.error("item %d failed: %s", index, result.error)
            self.done(result)
            return
        cfg = self.cfg
        outputs = [_Output(o, p, output_hash(self.fingerprint, item, o, p), w)
                   for o, p, w in zip(cfg.all_outputs(), self.paths[index], self.writers)]
        result.config_hash = outputs[0].config_hash
        key = item_key([o.path for o in outputs])
        try:
            fp = input_fingerprint(item, storage_options=cfg.input.options.get("storage_options"),
                                   checksum=cfg.execution.input_checksum)
            for o in outputs:
                fresh_nonce = (self.report.run_id or "") if self.fresh else ""  # --fresh: no chunk of an earlier run
                o.partial_key = hashlib.sha256(
                    f"{o.config_hash}\0{json.dumps(fp, sort_keys=True, default=str)}\0{fresh_nonce}".encode()
                ).hexdigest()[:32]
            decision = self.manifest.claim(
                key, input=item, outputs=[o.path for o in outputs], output_hashes=[o.config_hash for o in outputs],
                input_fingerprint=fp, pipeline_fingerprint=self.fingerprint, settings_fingerprint=self.settings,
                outputs_complete=all(_is_complete(o) for o in outputs), fresh=self.fresh,
                retry_failed=self.retry_failed)
        except Exception as exc:  # an unreadable manifest or input listing
            result.status, result.error = FAILED, error_text(exc, item)
            self.done(result)
            return
        if decision.action == "busy":
            result.status = SKIPPED
            result.skipped_reason = f"being processed by another run ({decision.previous['owner']})"
        elif decision.action == "done":
            result.status, result.skipped_reason = SKIPPED, "complete (same input and pipeline)"
            log.info("item %d: %s already complete, skipped", index, ", ".join(o.path for o in outputs))
            if cfg.evaluate is not None:
                try:
                    result.dice = evaluate_item(cfg, item, index, _scored(outputs).path, self.sched)
                except Exception as exc:
                    result.status, result.error = FAILED, error_text(exc, item)
        elif decision.action == "failed":
            result.status = FAILED
            result.error = (f"{decision.previous['error']} (recorded by an earlier run; input and pipeline "
                            "unchanged: rerun with --retry-failed to try again)")
        else:
            self._run_claimed(index, item, outputs, result, key, decision, stop)
        self.done(result)

    def _run_claimed(self, index: int, item: str, outputs: list[_Output], result: ItemResult, key: str,
                     decision: Decision, stop: threading.Event) -> None:
        try:
            if stop.is_set():
                raise RunInterrupted("the run was interrupted before the item started")
            predictor = self.predictor() if self.cfg.model is not None else None
            for o in outputs:
                remove_stale(o.path)
            # replace results this manifest recorded, or anything when --fresh asks to recompute; an output
            # it did not record (another tool's, or another tileseg run's) is protected unless output.overwrite
            overwrite = [o.cfg.overwrite or decision.previous is not None or self.fresh for o in outputs]
            if self.display is not None:
                self.display.start_item(index, _item_name(item))
            _run_item(self.cfg, item, index, outputs, result, predictor=predictor, sched=self.sched,
                      overwrite=overwrite, display=self.display)
        except _ModelLoadFailed as exc:
            result.status, result.error = FAILED, f"not run: {exc}"
            self.manifest.finish(key, PENDING, error=result.error)
            return
        except BaseException as exc:  # interrupted: the claim goes back to pending, then the run stops
            result.status = INTERRUPTED
            result.error = f"interrupted: {exc or type(exc).__name__}"
            self.manifest.finish(key, PENDING, error=result.error, timings=result.timings)
            if isinstance(exc, Exception):  # pragma: no cover - a bug in the driver itself
                raise
            return
        self.manifest.finish(key, DONE if result.status == OK else M_FAILED, error=result.error,
                             timings=result.timings)


def _model_loads(sched: SchedulerInfo) -> dict[str, int]:
    """Model loads per process (this one, and each worker of a distributed cluster)."""
    from . import counters

    per = counters.collect(sched.client)
    return {proc: sum(c.get("model_loads", {}).values()) for proc, c in per.items()}


def _batch_sizes(sched: SchedulerInfo, state: _RunState) -> list[dict[str, Any]]:
    """Batch sizes the run's model fell back to after device out-of-memory, per worker process."""
    from .predictors.oom import gather

    key = getattr(state._predictor, "_key", None)
    return gather(sched.client, key=key) if key is not None else []


def _bad_output_px(sched: SchedulerInfo | None, source: str) -> int:
    from . import counters

    return counters.total(counters.collect(sched.client if sched is not None else None), "bad_output_px", source)


class _ModelLoadFailed(Exception):
    """The run's model could not be loaded (the item is not at fault)."""


def _is_complete(out: _Output) -> bool:
    try:
        return bool(out.writer.is_complete(out.path))
    except Exception as exc:  # an unreadable output is not complete
        log.debug("is_complete(%r) failed: %s", out.path, exc)
        return False


def _scored(outputs: list[_Output]) -> _Output:
    """The output that evaluation scores: the first with ``content: result``."""
    return next((o for o in outputs if o.cfg.content == "result"), outputs[0])


def _item_name(item: str) -> str:
    """Short display name of an input item (its last path part)."""
    return os.path.basename(str(item).rstrip("/")) or str(item)


def _run_item(cfg: PipelineConfig, item: str, index: int, outputs: list[_Output], result: ItemResult, *,
              predictor: Any, sched: SchedulerInfo | None, overwrite: list[bool],
              display: RunProgress | None = None) -> None:
    """Open, build, check space, write and evaluate one claimed item; an item's error is recorded in ``result``.

    Interruptions (``KeyboardInterrupt``, :class:`~tileseg.errors.RunInterrupted`) propagate; keyed partial
    outputs stay for the next run to resume (see :mod:`tileseg.writers.blocks`).
    """
    timer = _Timer(f"item {index} ({_item_name(item)})",
                   on_stage=(lambda name: display.stage(index, name)) if display is not None else None)
    try:
        with PeakRSS() as mem:
            try:
                with timer.stage("open"):
                    image = open_item(cfg, item, index)
                result.shape = [int(s) for s in image.spatial_shape]
                on_pass = (lambda kind, done, total: display.pass_progress(index, kind, done, total)) \
                    if display is not None else None
                with timer.stage("graph"), _EagerComputes(timer.label, on_pass) as eager:
                    raw, final, stats = build_item(cfg, image, predictor, sched)
                for kind, seconds in eager.seconds.items():
                    timer.split("graph", kind, seconds)
                result.n_patches = stats.get("n_patches")
                result.n_patches_skipped = stats.get("n_patches_skipped")
                images = [final if o.cfg.content == "result" else raw for o in outputs]
                result.chunks = [int(max(c)) for c in final.data.chunks[-len(result.shape):]]
                if cfg.execution.check_free_space:
                    check_free_space([(o.path, int(im.data.nbytes)) for o, im in zip(outputs, images)])
                count_bad = cfg.model is not None and cfg.model.bad_output == "nodata"
                bad_before = _bad_output_px(sched, image.source or "image") if count_bad else 0
                px = int(np.prod(result.shape))

                def on_chunks(handles: list[Any]) -> Any:  # at the start of the compute: what a resumed run has
                    result.resumed_share = written_share(handles)
                    return watch_chunks(display, index, handles, px) if display is not None else nullcontext()

                write_outputs(outputs, images, overwrite=overwrite, sched=sched, progress=False, timer=timer,
                              info={"input": item}, on_chunks=on_chunks)
                if count_bad:
                    result.bad_output_px = _bad_output_px(sched, image.source or "image") - bad_before
                if cfg.evaluate is not None:
                    with timer.stage("evaluate"):
                        result.dice = evaluate_item(cfg, item, index, _scored(outputs).path, sched)
                result.status, result.error = OK, None
                log.info("item %d ok: %s -> %s", index, item, ", ".join(o.path for o in outputs))
            finally:
                result.peak_rss_bytes = int(mem.peak) or None
    except Exception as exc:
        if sched is not None and sched.cancelled:
            raise RunInterrupted(sched.cancel_reason) from exc
        result.status = FAILED
        result.error = error_text(exc, item)
        log.error("item %d failed: %s", index, result.error)
    finally:
        result.timings = timer.timings
        px = int(np.prod(result.shape)) if result.shape else 0
        t = timer.timings.get("compute_write", 0.0) + timer.timings.get("components", 0.0)
        px = px * (1.0 - (result.resumed_share or 0.0))  # only what this run computed
        result.pixels_per_s = round(px / t, 1) if t and result.status == OK else None




__all__ = ["run_pipeline", "manifest_path"]
