"""Run a pipeline over every input item: open, segment, post-process, write, evaluate.

One bad item fails with its error recorded (file and message) while the
others still finish; nothing already written is lost. Progress is kept in a
manifest, ``tileseg-run.json``, in the common directory of the outputs
(written atomically after every item). On the next run an item is skipped
when the manifest records it complete *with the same configuration hash* and
the writer confirms the output is complete, never because a file exists.

Overwriting: an existing output is replaced only when ``output.overwrite`` is
true or when this manifest recorded it (a partial or earlier result of a
tileseg run into the same outputs). Anything else already on disk is left
alone and the item fails with an :class:`~tileseg.errors.OutputError`.

The JSON run report (``tileseg-report.json`` next to the manifest) holds the
fully resolved pipeline, package versions, the scheduler and, per item:
status, input, output, shape, chunks, patches, timings per stage
(``open``, ``graph``, ``compute_write``, ``finalize``, ``evaluate``),
throughput (pixels/s), peak RSS, the error if any, and Dice if evaluated.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from .config import PipelineConfig, load_pipeline
from .config.loader import is_url
from .errors import ConfigError, InputError, ModelError
from .execution import SchedulerInfo, compute, scheduler_context
from .report import (
    FAILED,
    OK,
    SKIPPED,
    ItemResult,
    PeakRSS,
    RunReport,
    now_iso,
    package_versions,
    read_json,
    write_text_atomic,
)

log = logging.getLogger(__name__)

MANIFEST_NAME = "tileseg-run.json"
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
            found = expand_inputs(entry, storage_options=storage)
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


def _check_outputs(cfg: PipelineConfig, outputs: list[str], inputs: list[str]) -> None:
    first: dict[str, str] = {}
    for out, item in zip(outputs, inputs):
        if out in first:
            raise ConfigError(
                f"output.path: items {first[out]!r} and {item!r} both write to {out!r}; "
                "use {stem}, {name} or {index} in the template to make outputs unique"
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


# --------------------------------------------------------------------------- hashing


def _file_digest(path: str) -> str:
    if is_url(path) or not os.path.isfile(path):
        return path
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def config_fingerprint(cfg: PipelineConfig) -> str:
    """Hash of everything that changes an output, except the input path (see :func:`item_hash`).

    Execution settings, evaluation and the description do not count; the
    model weights count by content.
    """
    data = cfg.model_dump(mode="json", exclude={"execution", "evaluate", "description"})
    data["input"].pop("path", None)
    data["output"].pop("overwrite", None)
    if cfg.model is not None:
        data["weights_sha256"] = _file_digest(cfg.model.weights)
    text = json.dumps(data, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def item_hash(fingerprint: str, item: str, output: str) -> str:
    """The configuration hash recorded for one item."""
    return hashlib.sha256(f"{fingerprint}\0{item}\0{output}".encode()).hexdigest()[:32]


# --------------------------------------------------------------------------- manifest


class Manifest:
    """Per-output status of runs into one output directory, saved atomically.

    The file maps each output path to ``{"input", "config_hash", "status",
    "updated", "error"}`` with status ``running``, ``complete`` or ``failed``.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            data = read_json(path)
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable manifest %s: %s", path, exc)
            data = None
        self.entries: dict[str, dict[str, Any]] = {}
        if isinstance(data, dict) and isinstance(data.get("items"), dict):
            self.entries = {str(k): v for k, v in data["items"].items() if isinstance(v, dict)}

    def get(self, output: str) -> dict[str, Any] | None:
        """The record of ``output``, if any."""
        return self.entries.get(output)

    def set(self, output: str, *, item: str, config_hash: str, status: str, error: str | None = None) -> None:
        """Record the status of ``output`` and save the manifest."""
        self.entries[output] = {"input": item, "config_hash": config_hash, "status": status,
                                "updated": now_iso(), "error": error}
        self.save()

    def save(self) -> None:
        """Write the manifest atomically."""
        write_text_atomic(self.path, json.dumps({"version": 1, "items": self.entries}, indent=2) + "\n")


# --------------------------------------------------------------------------- stages


class _Timer:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - t0, 4)


def _open(cfg: PipelineConfig, item: str, *, array: str | None = None, level: int | None = None,
          reader: str | None = None):
    from .readers import open_image

    options = dict(cfg.input.options)
    return open_image(item, reader=reader or cfg.input.reader, array=array if array is not None else cfg.input.array,
                      level=level if level is not None else cfg.input.level, **options)


def load_model(cfg: PipelineConfig):
    """The predictor of a model pipeline (loaded once per run)."""
    from .predictors import load_predictor

    assert cfg.model is not None
    device = None if cfg.model.device == "auto" else cfg.model.device
    return load_predictor(cfg.model.predictor_spec(), device=device, precision=cfg.model.precision)


def _segment_kwargs(cfg: PipelineConfig) -> dict[str, Any]:
    t = cfg.tiling
    assert t is not None
    return dict(patch_size=tuple(t.patch_size), overlap=t.overlap,
                overlap_px=None if t.overlap_px is None else tuple(t.overlap_px),
                chunks=None if t.chunks is None else tuple(t.chunks))


def build_graph(cfg: PipelineConfig, image: Any, predictor: Any, sched: SchedulerInfo | None = None):
    """The lazy result of one item: ``(data, axes, n_patches)``.

    ``data`` is labels ``(*spatial)`` or probabilities ``(K, *spatial)``.
    """
    from . import registry

    spatial_axes = tuple(a for a in image.axes if a != "c")
    n_patches = None
    if cfg.model is not None:
        from .graph import plan, segment

        t = cfg.tiling
        assert t is not None
        output, thr, rest = cfg.model_output()
        _check_classes(cfg, getattr(predictor, "out_channels", None))
        kw = _segment_kwargs(cfg)
        resources = sched.resources if sched is not None and sched.distributed and sched.resources else None
        data = segment(image, predictor, blend=t.blend, batch_size=cfg.model.batch_size, output=output,
                       pad_mode=t.pad_mode, device=None if cfg.model.device == "auto" else cfg.model.device,
                       precision=cfg.model.precision, preprocess=cfg.preprocess or None,
                       resources=resources, lookahead=_lookahead(sched), **kw)
        if thr is not None:
            if data.shape[0] > 2:
                raise ModelError(
                    f"postprocess[0]: threshold needs a one- or two-class model output, but the model gives "
                    f"{data.shape[0]} channels; use argmax")
            data = (data[-1] > thr).astype(np.uint8)  # the foreground probability
        n_patches = int(plan(image, batch_size=cfg.model.batch_size, **kw)["n_patches"])
    else:
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
            if not image.has_channels:
                data = data[0]
        data = registry.get("methods", name)(data, spacing=tuple(image.spacing), **params)
        rest = cfg.postprocess_steps()
    for name, params in rest:
        data = registry.get("postprocess", name)(data, spacing=tuple(image.spacing), **params)
    axes = spatial_axes if data.ndim == len(spatial_axes) else ("c",) + spatial_axes
    return data, axes, n_patches


def _lookahead(sched: SchedulerInfo | None) -> int:
    """How many blocks prediction may run ahead of finished output (see ``segment``).

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


def _check_classes(cfg: PipelineConfig, k: int | None) -> None:
    """Class names must match the model's output channels (two names for one channel)."""
    assert cfg.model is not None
    names = cfg.model.classes
    steps = cfg.postprocess_steps()
    if steps and steps[0][0] == "threshold" and k is not None and k > 2:
        raise ModelError(f"postprocess[0]: threshold needs a one- or two-class model output, but the model "
                         f"gives {k} channels; use argmax")
    if names is None or k is None:
        return
    if len(names) != k and not (k == 1 and len(names) == 2):
        raise ModelError(f"model.classes lists {len(names)} classes {names!r} but the model "
                         f"{cfg.model.weights!r} outputs {k} channels")


# --------------------------------------------------------------------------- writing


def _writer(cfg: PipelineConfig):
    from .writers import get_writer

    w = get_writer(cfg.output.writer)
    return w() if isinstance(w, type) else w


def write_output(cfg: PipelineConfig, writer: Any, out: str, image: Any, *, overwrite: bool,
                 sched: SchedulerInfo | None, progress: bool, timer: _Timer,
                 info: dict[str, Any] | None = None) -> Any:
    """Prepare the output, compute the write task (streaming chunk by chunk), finalize.

    Returns the writer's handle. On failure the prepared output is aborted
    (a finished output from an earlier run stays in place until ``finalize``).
    """
    options = dict(cfg.output.options)
    with timer.stage("graph"):
        handle = writer.prepare(image.data, out, like=image, axes=image.axes, overwrite=overwrite, **options)
    try:
        with timer.stage("graph"):
            task = writer.write_task(handle, image.data)
        with timer.stage("compute_write"):
            compute(sched, task, progress=progress)
        with timer.stage("finalize"):
            writer.finalize(handle, info)
    except BaseException:
        try:
            writer.abort(handle)
        except Exception as exc:  # pragma: no cover - best effort
            log.warning("could not clean up %s: %s", out, exc)
        raise
    return handle


# --------------------------------------------------------------------------- evaluation


#: Evaluation refuses more labels than this (instance labels are not classes).
MAX_EVAL_CLASSES = 1024


def evaluate_item(cfg: PipelineConfig, item: str, index: int, out: str,
                  sched: SchedulerInfo | None, *, array: str | None = None) -> dict[str, float | None]:
    """Dice per class of the written output against the configured reference."""
    from .readers import open_image

    assert cfg.evaluate is not None
    ref_cfg = cfg.evaluate.reference
    ref_path = render_output(ref_cfg.path, item, index) if ref_cfg.path else item
    ref = open_image(ref_path, reader=ref_cfg.reader, array=ref_cfg.array, level=ref_cfg.level)
    pred = open_image(out, array=array or None)
    pdata = pred.data[0] if pred.has_channels and pred.data.shape[0] == 1 else pred.data
    rdata = ref.data[0] if ref.has_channels and ref.data.shape[0] == 1 else ref.data
    if pdata.dtype.kind not in "biu":
        raise InputError(f"evaluate: output {out!r} holds {pdata.dtype} values, not labels; "
                         "add argmax (or threshold) to postprocess")
    if tuple(pdata.shape) != tuple(rdata.shape):
        raise InputError(f"evaluate: reference {ref_path!r} has shape {tuple(rdata.shape)!r} "
                         f"but the output has {tuple(pdata.shape)!r}")
    from .metrics import metrics

    names = cfg.model.classes if cfg.model is not None and cfg.model.classes else None
    if names:
        n = len(names)  # labels outside 0..n-1 are an error, reported by metrics()
    else:
        n = int(max(compute(sched, pdata.max(), rdata.max()))) + 1
    if n > MAX_EVAL_CLASSES:
        raise InputError(f"evaluate: labels go up to {n - 1}: too many classes for Dice "
                         f"(at most {MAX_EVAL_CLASSES}); evaluate before instance labelling")
    scores = metrics(pdata, rdata, n)
    return {(names[int(c)] if names and int(c) < len(names) else str(c)): v["dice"]
            for c, v in scores["classes"].items()}


# --------------------------------------------------------------------------- the run


def _error_text(exc: BaseException, item: str) -> str:
    msg = str(exc) or repr(exc)
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
        Skip items recorded complete with the same configuration hash (and
        confirmed complete by the writer). ``False`` recomputes everything.
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

    Examples
    --------
    >>> report = run_pipeline("pipelines/demo.yaml")  # doctest: +SKIP
    >>> [i.status for i in report.items]  # doctest: +SKIP
    ['ok']
    """
    cfg = load_pipeline(pipeline)
    t_start = time.perf_counter()
    items = expand_items(cfg)
    outputs = [render_output(cfg.output.path, item, i) for i, (item, _) in enumerate(items)]
    ok_items = [(o, item) for o, (item, err) in zip(outputs, items) if err is None]
    _check_outputs(cfg, [o for o, _ in ok_items], [i for _, i in ok_items])
    directory = output_dir(outputs)
    manifest = Manifest(_join(directory, MANIFEST_NAME))
    report = RunReport(pipeline=cfg.model_dump(mode="json"), versions={}, started=now_iso(),
                       manifest_path=manifest.path)
    report_path = _join(directory, REPORT_NAME)
    fingerprint = config_fingerprint(cfg)
    writer = _writer(cfg)

    with scheduler_context(cfg.execution, override=scheduler) as sched:
        report.scheduler = sched.describe()
        predictor = None  # loaded once, when the first item needs it (a resumed run may need none)
        for index, ((item, err), out) in enumerate(zip(items, outputs)):
            result = ItemResult(index=index, input=item, output=out)
            result.config_hash = item_hash(fingerprint, item, out)
            report.items.append(result)
            if err is not None:
                result.error = _error_text(err, item)
                log.error("item %d failed: %s", index, result.error)
                continue
            rec = manifest.get(out)
            if (resume and rec and rec.get("status") == "complete"
                    and rec.get("config_hash") == result.config_hash and _is_complete(writer, out)):
                result.status = SKIPPED
                log.info("item %d: %s already complete, skipped", index, out)
                if cfg.evaluate is not None:
                    try:
                        result.dice = evaluate_item(cfg, item, index, out, sched)
                    except Exception as exc:
                        result.status, result.error = FAILED, _error_text(exc, item)
                report.write(report_path)
                continue
            if cfg.model is not None and predictor is None:
                predictor = load_model(cfg)
            _run_item(cfg, item, index, out, result, writer=writer, predictor=predictor, sched=sched,
                      manifest=manifest, overwrite=cfg.output.overwrite or rec is not None, progress=progress)
            report.versions = package_versions()
            report.write(report_path)

    report.versions = package_versions()
    report.finished = now_iso()
    report.duration_s = round(time.perf_counter() - t_start, 3)
    report.write(report_path)
    return report


def _is_complete(writer: Any, out: str) -> bool:
    try:
        return bool(writer.is_complete(out))
    except Exception as exc:  # an unreadable output is not complete
        log.debug("is_complete(%r) failed: %s", out, exc)
        return False


def _run_item(cfg: PipelineConfig, item: str, index: int, out: str, result: ItemResult, *, writer: Any,
              predictor: Any, sched: SchedulerInfo, manifest: Manifest, overwrite: bool, progress: bool) -> None:
    timer = _Timer()
    wrote = False
    try:
        with PeakRSS() as mem:
            try:
                with timer.stage("open"):
                    image = _open(cfg, item)
                result.shape = [int(s) for s in image.spatial_shape]
                with timer.stage("graph"):
                    data, axes, result.n_patches = build_graph(cfg, image, predictor, sched)
                    out_image = image.with_data(data, axes=axes)
                result.chunks = [int(max(c)) for c in data.chunks[-len(result.shape):]]
                manifest.set(out, item=item, config_hash=str(result.config_hash), status="running")
                wrote = True
                handle = write_output(cfg, writer, out, out_image, overwrite=overwrite, sched=sched,
                                      progress=progress, timer=timer,
                                      info={"input": item, "config_hash": result.config_hash})
                manifest.set(out, item=item, config_hash=str(result.config_hash), status="complete")
                if cfg.evaluate is not None:
                    with timer.stage("evaluate"):
                        array = (getattr(handle, "details", None) or {}).get("array_path")
                        result.dice = evaluate_item(cfg, item, index, out, sched, array=array)
                result.status = OK
                log.info("item %d ok: %s -> %s", index, item, out)
            finally:
                result.peak_rss_bytes = int(mem.peak) or None
    except Exception as exc:
        result.status = FAILED
        result.error = _error_text(exc, item)
        log.error("item %d failed: %s", index, result.error)
        if wrote and (manifest.get(out) or {}).get("status") != "complete":
            manifest.set(out, item=item, config_hash=str(result.config_hash), status="failed",
                         error=result.error)
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
        row: dict[str, Any] = {"index": index, "input": item,
                               "output": render_output(cfg.output.path, item, index)}
        rows.append(row)
        if err is not None:
            row["error"] = _error_text(err, item)
            continue
        try:
            image = _open(cfg, item)
            if cfg.model is not None:
                from .graph import plan

                output, _, _ = cfg.model_output()
                p = plan(image, out_channels=k or 1, batch_size=cfg.model.batch_size, output=output,
                         **_segment_kwargs(cfg))
                row.update({key: (list(v) if isinstance(v, tuple) else v) for key, v in p.items()})
                row["out_channels"] = k
            else:
                chunks = (list(cfg.tiling.chunks) if cfg.tiling is not None and cfg.tiling.chunks is not None
                          else [int(max(c)) for c in image.data.chunks[-image.spatial_ndim:]])
                row.update(shape=list(image.spatial_shape), channels=image.data.shape[0] if image.has_channels else 1,
                           chunks=chunks, n_patches=None, est_peak_task_bytes=None)
            row["dtype"] = str(image.dtype)
        except Exception as exc:
            row["error"] = _error_text(exc, item)
    return rows


__all__ = ["run_pipeline", "plan_pipeline", "expand_items", "render_output", "Manifest"]
