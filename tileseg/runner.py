"""Run a pipeline over every input item: open, segment, post-process, write, evaluate.

One bad item fails with its error recorded (file and message) while the
others still finish; nothing already written is lost. Progress is kept in a
manifest, ``tileseg-run.json`` (:mod:`tileseg.manifest`), in the common
directory of the outputs (written atomically after every change). On the
next run an item is skipped when the manifest records every one of its
outputs complete *with the same configuration hash* and the writer confirms
each output is complete, never because a file exists.

An item may have several outputs (``outputs:``), for example the labels and
the model's probabilities: their write tasks are computed together, so the
model runs once, and each is finalized (made complete) only after all of
them were written.

Overwriting: an existing output is replaced only when its ``overwrite`` is
true or when this manifest recorded it (a partial or earlier result of a
tileseg run into the same outputs). Anything else already on disk is left
alone and the item fails with an :class:`~tileseg.errors.OutputError`.

The JSON run report (``tileseg-report.json`` next to the manifest) holds the
fully resolved pipeline, package versions, the scheduler and, per item:
status, input, outputs, shape, chunks, patches, timings per stage
(``open``, ``statistics``: whole-image passes made while the graph is built,
such as a histogram or connected components; ``graph``: the rest of building
and preparing the outputs, ``compute_write``, ``finalize``, ``evaluate``),
throughput (pixels/s), peak RSS, the error if any, and Dice if evaluated.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from .config import OutputConfig, PipelineConfig, load_pipeline
from .errors import PIPELINE_KEYS, ConfigError, InputError, ModelError, reword
from .execution import SchedulerInfo, compute, scheduler_context
from .image import Image
from .manifest import MANIFEST_NAME, Manifest, config_fingerprint, output_hash
from .report import FAILED, OK, SKIPPED, ItemResult, PeakRSS, RunReport, now_iso, package_versions
from .store import is_url

log = logging.getLogger(__name__)

REPORT_NAME = "tileseg-report.json"


# --------------------------------------------------------------------------- items


def expand_items(cfg: PipelineConfig) -> list[tuple[str, Exception | None]]:
    """The input items, each with the error that prevents opening it (or ``None``).

    Every ``input.path`` entry is expanded on its own, so one missing file in
    a list becomes one failed item instead of failing the whole run.

    Raises
    ------
    ConfigError
        If no entry yields any item at all.
    """
    from .readers import expand_inputs

    storage = cfg.input.options.get("storage_options")
    items: list[tuple[str, Exception | None]] = []
    seen: set[str] = set()
    for entry in cfg.input.path:
        try:
            found = expand_inputs(entry, storage_options=storage, options=dict(cfg.input.options))
        except Exception as exc:  # ImageNotFoundError, FormatError, OSError from fsspec
            if len(cfg.input.path) == 1:
                raise ConfigError(f"input.path: {exc}") from exc
            items.append((entry, exc))
            continue
        for item in found:
            if item not in seen:
                seen.add(item)
                items.append((item, None))
    if not items:
        raise ConfigError(f"input.path: no items found in {cfg.input.path!r}")
    return items


def render_output(template: str, item: str, index: int) -> str:
    """Fill ``{stem}``, ``{name}`` and ``{index}`` for one item.

    Examples
    --------
    >>> render_output("/out/{stem}_seg.zarr", "/data/a.ome.zarr", 0)
    '/out/a_seg.zarr'
    >>> render_output("/out/{index:03d}_{name}", "s3://b/x.zarr/", 7)
    '/out/007_x.zarr'
    """
    from .readers import item_stem

    name = str(item).rstrip("/").rsplit("/", 1)[-1]
    return template.format(stem=item_stem(item), name=name, index=index)


def _check_outputs(paths: list[list[str]], inputs: list[str]) -> None:
    first: dict[str, str] = {}
    for outs, item in zip(paths, inputs):
        for out in outs:
            if out in first:
                who = f"items {first[out]!r} and {item!r} both" if first[out] != item else f"item {item!r} twice"
                raise ConfigError(
                    f"output.path: {who} write to {out!r}; "
                    "use {stem}, {name} or {index} in the templates to make outputs unique"
                )
            first[out] = item


def output_dir(outputs: list[str]) -> str:
    """The directory that holds the manifest and report: common parent of the outputs."""
    parents = [o.rstrip("/").rsplit("/", 1)[0] if is_url(o) else os.path.dirname(os.path.abspath(o))
               for o in outputs]
    if all(not is_url(p) for p in parents):
        return os.path.commonpath(parents)
    return parents[0]


def _join(directory: str, name: str) -> str:
    return f"{directory.rstrip('/')}/{name}" if is_url(directory) else os.path.join(directory, name)


# --------------------------------------------------------------------------- stages


class _Timer:
    """Times the stages of one item and logs a line when each starts and ends (progress from the first stage)."""

    def __init__(self, label: str = "") -> None:
        self.timings: dict[str, float] = {}
        self.label = label
        self.t0 = time.perf_counter()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        log.info("%s: %s ... (%.1f s into the item)", self.label, name, t0 - self.t0)
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            self.timings[name] = round(self.timings.get(name, 0.0) + dt, 4)
            log.info("%s: %s done in %.1f s", self.label, name, dt)

    def split(self, stage: str, part: str, seconds: float) -> None:
        """Move ``seconds`` of ``stage`` into its own entry ``part`` (e.g. statistics computed while building)."""
        if seconds <= 0:
            return
        self.timings[part] = round(self.timings.get(part, 0.0) + seconds, 4)
        self.timings[stage] = round(max(0.0, self.timings.get(stage, 0.0) - seconds), 4)
        log.info("%s: of which %.1f s computing whole-image statistics (%s)", self.label, seconds, part)


class _EagerComputes:
    """Seconds spent in Dask computes while a graph is built (whole-image statistics, components).

    Counted with a local-scheduler callback; on a distributed client nothing is counted.
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self._t0: list[float] = []
        self._cb: Any = None

    def __enter__(self) -> _EagerComputes:
        from dask.callbacks import Callback

        outer = self

        class _CB(Callback):
            def _start(self, dsk: Any) -> None:
                outer._t0.append(time.perf_counter())

            def _finish(self, dsk: Any, state: Any, errored: bool) -> None:
                if outer._t0:
                    outer.seconds += time.perf_counter() - outer._t0.pop()

        self._cb = _CB()
        self._cb.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._cb.__exit__(*exc)


def open_item(cfg: PipelineConfig, item: str, index: int = 0) -> Image:
    """The input image of one item, with ``input.nodata`` and ``input.aoi`` applied when given."""
    from .readers import open_image

    i = cfg.input
    image = open_image(item, reader=i.reader, array=i.array, level=i.level, axes=i.axes, **dict(i.options))
    if i.nodata is not None:
        image = dataclasses.replace(image, nodata=i.nodata)
    if i.aoi is not None:
        from .aoi import apply_aoi

        image = apply_aoi(image, render_output(i.aoi, item, index))
    return image


def load_model(cfg: PipelineConfig):
    """The predictor of a model pipeline (loaded once per run)."""
    from .predictors import load_predictor

    assert cfg.model is not None
    device = None if cfg.model.device == "auto" else cfg.model.device
    return load_predictor(cfg.model.spec(), device=device, precision=cfg.model.precision)


def build_item(cfg: PipelineConfig, image: Image, predictor: Any,
               sched: SchedulerInfo | None = None) -> tuple[Image, Image, dict[str, int]]:
    """The lazy results of one item: ``(raw, result, stats)``.

    ``raw`` is the model's (or method's) output, ``result`` the same after
    the postprocess steps; both carry the input's geometry. ``stats`` holds
    ``n_patches`` and ``n_patches_skipped`` (all-nodata patches) for models.
    """
    from .postprocess import apply_postprocess

    stats: dict[str, int] = {}
    if cfg.model is not None:
        from .graph import segment_with_stats

        _check_classes(cfg, getattr(predictor, "out_channels", None))
        resources = sched.resources if sched is not None and sched.distributed and sched.resources else None
        tiling = cfg.tiling_options()
        inference = cfg.inference_options(resources=resources, lookahead=_lookahead(sched))
        raw, stats = segment_with_stats(image, predictor, tiling, inference)
    else:
        from .methods import apply_method

        name, params = cfg.method_step() or ("", {})
        data = image.data
        if cfg.tiling is not None and cfg.tiling.chunks is not None:
            if len(cfg.tiling.chunks) != image.spatial_ndim:
                raise ConfigError(f"tiling.chunks: {cfg.tiling.chunks!r} has {len(cfg.tiling.chunks)} entries but "
                                  f"the image has {image.spatial_ndim} spatial axes {image.axes!r}")
            lead = (data.chunks[0],) if image.has_channels else ()
            data = data.rechunk(lead + tuple(cfg.tiling.chunks))
        if cfg.preprocess:
            from .preprocess import apply_preprocess

            chw = data if image.has_channels else data[None]
            data = apply_preprocess(chw, cfg.preprocess)
            data = data if image.has_channels else data[0]
        # the validity of the pixels as read (nodata values change meaning once preprocessed)
        raw = apply_method(image.with_data(data, mask=image.valid(), nodata=None), name, params)
    return raw, apply_postprocess(raw, cfg.postprocess), stats


def _check_classes(cfg: PipelineConfig, k: int | None) -> None:
    """``model.classes`` must match the model's output channels (two names for one channel), before computing."""
    names = cfg.model.classes if cfg.model is not None else None
    if names is None or k is None:
        return
    if len(names) != k and not (k == 1 and len(names) == 2):
        files = ", ".join(cfg.model.files().values()) or cfg.model.kind
        raise ModelError(f"model.classes lists {len(names)} classes {names!r} but the model {files} outputs "
                         f"{k} channels")


def _lookahead(sched: SchedulerInfo | None) -> int:
    """How many blocks prediction may run ahead of finished output (see ``segment_image``).

    The run stores the whole result, so ordering edges cost nothing and keep
    the working set to about one slab of overlap margins. A cluster gets a
    window of two blocks per worker thread so no worker waits.
    """
    workers = 2
    if sched is not None and sched.client is not None:
        try:
            workers = sum(w.get("nthreads", 1) for w in sched.client.scheduler_info()["workers"].values())
        except Exception:  # pragma: no cover - a scheduler that went away
            pass
    elif sched is not None and sched.workers:
        workers = sched.workers
    return max(4, 2 * workers)


# --------------------------------------------------------------------------- writing


@dataclasses.dataclass
class _Output:
    """One output of one item: its settings, rendered path, hash and writer."""

    cfg: OutputConfig
    path: str
    config_hash: str
    writer: Any


def _writer(name: str):
    from .writers import get_writer

    return get_writer(name)


def write_outputs(outputs: list[_Output], images: list[Image], *, overwrite: list[bool], sched: SchedulerInfo | None,
                  progress: bool, timer: _Timer, info: dict[str, Any]) -> list[Any]:
    """Prepare every output, compute all write tasks together (streaming chunk by chunk), then finalize each.

    Returns the writers' handles. On failure every prepared output is aborted
    (a finished output of an earlier run stays in place until ``finalize``).
    """
    handles: list[Any] = []
    keyed: list[bool] = []
    try:
        with timer.stage("graph"):
            for out, image, ow in zip(outputs, images, overwrite):
                options = dict(out.cfg.options)
                keyed.append(_takes_partial_key(out.writer) and "partial_key" not in options)
                if keyed[-1]:  # a killed or failed run leaves this partial output for the next run to resume
                    options["partial_key"] = out.config_hash
                handles.append(out.writer.prepare(image, out.path, overwrite=ow, **options))
            tasks = [out.writer.write_task(h, image) for out, h, image in zip(outputs, handles, images)]
        with timer.stage("compute_write"):
            compute(sched, *tasks, progress=progress)
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


def _error_text(exc: BaseException, item: str) -> str:
    msg = reword(str(exc) or repr(exc), PIPELINE_KEYS)
    if item not in msg and os.path.basename(item.rstrip("/")) not in msg:
        msg = f"{item}: {msg}"
    return f"{type(exc).__name__}: {msg}"


def run_pipeline(pipeline: Any, *, scheduler: str | None = None, resume: bool = True,
                 progress: bool = False) -> RunReport:
    """Run a pipeline over all its input items.

    Parameters
    ----------
    pipeline : str, os.PathLike, dict or PipelineConfig
        A pipeline file or an already loaded pipeline.
    scheduler : str, optional
        Overrides ``execution.scheduler`` (``threads``, ``processes``,
        ``synchronous``, ``local`` or ``tcp://host:port``).
    resume : bool
        Skip items whose outputs are all recorded complete with the same
        configuration hash (and confirmed complete by the writer). ``False``
        recomputes everything.
    progress : bool
        Show a progress bar per item on the terminal.

    Returns
    -------
    RunReport
        Per-item results; also written as JSON next to the outputs
        (``report.report_path``). ``report.ok`` is false if any item failed.

    Raises
    ------
    ConfigError
        Invalid pipeline, no inputs, or output paths that collide.
    ModelError
        If the model cannot be loaded.
    """
    cfg = load_pipeline(pipeline)
    t_start = time.perf_counter()
    items = expand_items(cfg)
    out_cfgs = cfg.all_outputs()
    paths = [[render_output(o.path, item, i) for o in out_cfgs] for i, (item, _) in enumerate(items)]
    ok = [i for i, (_, err) in enumerate(items) if err is None]
    _check_outputs([paths[i] for i in ok], [items[i][0] for i in ok])
    directory = output_dir([p for ps in paths for p in ps])
    manifest = Manifest(_join(directory, MANIFEST_NAME))
    report = RunReport(pipeline=cfg.model_dump(mode="json"), versions={}, started=now_iso(),
                       manifest_path=manifest.path)
    report_path = _join(directory, REPORT_NAME)
    fingerprint = config_fingerprint(cfg)
    writers = [_writer(o.writer) for o in out_cfgs]

    with scheduler_context(cfg.execution, override=scheduler) as sched:
        report.scheduler = sched.describe()
        predictor = None  # loaded once, when the first item needs it (a resumed run may need none)
        for index, (item, err) in enumerate(items):
            outputs = [_Output(o, p, output_hash(fingerprint, item, o, p), w)
                       for o, p, w in zip(out_cfgs, paths[index], writers)]
            result = ItemResult(index=index, input=item, output=outputs[0].path,
                                outputs=[o.path for o in outputs], config_hash=outputs[0].config_hash)
            report.items.append(result)
            if err is not None:
                result.error = _error_text(err, item)
                log.error("item %d failed: %s", index, result.error)
                continue
            if resume and all(_recorded_complete(manifest, o) for o in outputs):
                result.status = SKIPPED
                log.info("item %d: %s already complete, skipped", index, ", ".join(o.path for o in outputs))
                if cfg.evaluate is not None:
                    try:
                        result.dice = evaluate_item(cfg, item, index, _scored(outputs).path, sched)
                    except Exception as exc:
                        result.status, result.error = FAILED, _error_text(exc, item)
                report.write(report_path)
                continue
            if cfg.model is not None and predictor is None:
                predictor = load_model(cfg)
            _run_item(cfg, item, index, outputs, result, predictor=predictor, sched=sched, manifest=manifest,
                      progress=progress)
            report.versions = package_versions()
            report.write(report_path)

        if cfg.model is not None:
            report.model_loads = _model_loads(sched)
    report.versions = package_versions()
    report.finished = now_iso()
    report.duration_s = round(time.perf_counter() - t_start, 3)
    report.write(report_path)
    return report


def _model_loads(sched: SchedulerInfo) -> dict[str, int]:
    """Model loads per process (this one, and each worker of a distributed cluster)."""
    from . import counters

    per = counters.collect(sched.client)
    return {proc: sum(c.get("model_loads", {}).values()) for proc, c in per.items()}


def _bad_output_px(sched: SchedulerInfo, source: str) -> int:
    from . import counters

    return counters.total(counters.collect(sched.client), "bad_output_px", source)


def _recorded_complete(manifest: Manifest, out: _Output) -> bool:
    rec = manifest.get(out.path)
    if not (rec and rec.get("status") == "complete" and rec.get("config_hash") == out.config_hash):
        return False
    try:
        return bool(out.writer.is_complete(out.path))
    except Exception as exc:  # an unreadable output is not complete
        log.debug("is_complete(%r) failed: %s", out.path, exc)
        return False


def _scored(outputs: list[_Output]) -> _Output:
    """The output that evaluation scores: the first with ``content: result``."""
    return next((o for o in outputs if o.cfg.content == "result"), outputs[0])


def _run_item(cfg: PipelineConfig, item: str, index: int, outputs: list[_Output], result: ItemResult, *,
              predictor: Any, sched: SchedulerInfo, manifest: Manifest, progress: bool) -> None:
    timer = _Timer(f"item {index} ({os.path.basename(item.rstrip('/')) or item})")
    started = False
    try:
        with PeakRSS() as mem:
            try:
                with timer.stage("open"):
                    image = open_item(cfg, item, index)
                result.shape = [int(s) for s in image.spatial_shape]
                with timer.stage("graph"), _EagerComputes() as eager:
                    raw, final, stats = build_item(cfg, image, predictor, sched)
                timer.split("graph", "statistics", eager.seconds)
                result.n_patches = stats.get("n_patches")
                result.n_patches_skipped = stats.get("n_patches_skipped")
                images = [final if o.cfg.content == "result" else raw for o in outputs]
                result.chunks = [int(max(c)) for c in final.data.chunks[-len(result.shape):]]
                overwrite = [o.cfg.overwrite or manifest.get(o.path) is not None for o in outputs]
                for o in outputs:
                    manifest.set(o.path, item=item, config_hash=o.config_hash, status="running")
                started = True
                count_bad = cfg.model is not None and cfg.model.bad_output == "nodata"
                bad_before = _bad_output_px(sched, image.source or "image") if count_bad else 0
                write_outputs(outputs, images, overwrite=overwrite, sched=sched, progress=progress, timer=timer,
                              info={"input": item})
                for o in outputs:
                    manifest.set(o.path, item=item, config_hash=o.config_hash, status="complete")
                if count_bad:
                    result.bad_output_px = _bad_output_px(sched, image.source or "image") - bad_before
                if cfg.evaluate is not None:
                    with timer.stage("evaluate"):
                        result.dice = evaluate_item(cfg, item, index, _scored(outputs).path, sched)
                result.status = OK
                log.info("item %d ok: %s -> %s", index, item, ", ".join(o.path for o in outputs))
            finally:
                result.peak_rss_bytes = int(mem.peak) or None
    except Exception as exc:
        result.status = FAILED
        result.error = _error_text(exc, item)
        log.error("item %d failed: %s", index, result.error)
        if started:
            for o in outputs:
                if (manifest.get(o.path) or {}).get("status") != "complete":
                    manifest.set(o.path, item=item, config_hash=o.config_hash, status="failed", error=result.error)
    finally:
        result.timings = timer.timings
        px = int(np.prod(result.shape)) if result.shape else 0
        t = timer.timings.get("compute_write")
        result.pixels_per_s = round(px / t, 1) if t and result.status == OK else None


# --------------------------------------------------------------------------- plan


def plan_pipeline(pipeline: Any) -> list[dict[str, Any]]:
    """Per item: shape, chunks, patches and estimated peak memory per task, computing nothing heavy.

    Items that cannot be opened get an ``error`` entry instead.
    """
    cfg = load_pipeline(pipeline)
    items = expand_items(cfg)
    k = None
    if cfg.model is not None:
        if cfg.model.classes:
            k = len(cfg.model.classes)
        else:
            try:
                k = load_model(cfg).out_channels
            except Exception as exc:  # plan must not need the model to run
                log.debug("could not load the model for plan: %s", exc)
    rows = []
    for index, (item, err) in enumerate(items):
        outs = [render_output(o.path, item, index) for o in cfg.all_outputs()]
        row: dict[str, Any] = {"index": index, "input": item, "output": outs[0], "outputs": outs}
        rows.append(row)
        if err is not None:
            row["error"] = _error_text(err, item)
            continue
        try:
            image = open_item(cfg, item, index)
            if cfg.model is not None:
                from .graph import plan

                p = plan(image, cfg.tiling_options(), out_channels=k or 1, batch_size=cfg.model.batch_size,
                         output=cfg.model.output)
                row.update({key: (list(v) if isinstance(v, tuple) else v) for key, v in p.items()})
                row["out_channels"] = k
            else:
                chunks = (list(cfg.tiling.chunks) if cfg.tiling is not None and cfg.tiling.chunks is not None
                          else [int(max(c)) for c in image.data.chunks[-image.spatial_ndim:]])
                row.update(shape=list(image.spatial_shape), channels=image.data.shape[0] if image.has_channels else 1,
                           chunks=chunks, n_patches=None, est_peak_task_bytes=None)
            row["dtype"] = str(image.dtype)
            row["est_tasks"] = estimate_tasks(row, len(cfg.postprocess or ()) + len(cfg.preprocess or ()),
                                              spatial_ndim=image.spatial_ndim)
            if row["est_tasks"] > MAX_TASKS_PER_ITEM:
                row.setdefault("warnings", []).append(
                    f"about {row['est_tasks']:.3g} tasks in its graph (more than {MAX_TASKS_PER_ITEM:.0e}): "
                    "graph building and the scheduler will be slow; use larger tiling.chunks")
        except Exception as exc:
            row["error"] = _error_text(exc, item)
    return rows


#: ``tileseg plan`` warns about items whose graph would have more tasks than this.
MAX_TASKS_PER_ITEM = 100_000


def estimate_tasks(row: dict[str, Any], n_steps: int, *, spatial_ndim: int) -> int:
    """Rough task count of one item's graph from its plan row (``n_blocks`` or ``shape``/``chunks``).

    A model's block has an owner, up to ``2**ndim`` pieces, a final task, an
    ordering token and a store task; a classical block one task per step plus
    its read and store.
    """
    if row.get("n_owner_tasks") is not None:
        return int(row["n_owner_tasks"]) * (1 + 2 ** spatial_ndim) + 3 * int(row["n_blocks"]) + \
            n_steps * int(row["n_blocks"])
    blocks = int(np.prod([-(-int(s) // int(c)) for s, c in zip(row["shape"], row["chunks"])], dtype=np.int64))
    return blocks * (3 + n_steps)


__all__ = ["run_pipeline", "plan_pipeline", "expand_items", "render_output", "open_item", "build_item"]
