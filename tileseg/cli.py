"""The ``tileseg`` command: a thin shell over :mod:`tileseg.runner` and :mod:`tileseg.config`.

Commands::

    tileseg run PIPELINE.yaml [--scheduler threads|processes|local|tcp://host:port] [--fresh]
                              [--retry-failed] [--quiet]
    tileseg validate PIPELINE.yaml
    tileseg plan PIPELINE.yaml [--json]
    tileseg info PATH [--array NAME] [--level N] [--axes cyx]
    tileseg evaluate PRED REF [--pred-array NAME] [--ref-array NAME] [--n-classes N] [--json]
    tileseg export PIPELINE.yaml [--pt2 OUT.pt2] [--onnx OUT.onnx] [--int8 OUT.int8.onnx] [--samples P.npy]

Exit codes: 0 success; 1 some items failed (the others finished) or a
runtime error; 2 usage or configuration errors (invalid pipeline, unknown
plugin, missing optional dependency, no inputs).

Only this module configures logging handlers (``-v`` / ``-q``); the library
just logs.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from typing import Any

import click

from . import __version__
from .errors import PIPELINE_KEYS, ConfigError, MissingDependencyError, PluginError, TilesegError, reword

log = logging.getLogger("tileseg")

#: Exit codes.
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _configure_logging(verbose: int, quiet: int) -> None:
    level = logging.WARNING - 10 * verbose + 10 * quiet
    level = min(max(level, logging.DEBUG), logging.CRITICAL)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("tileseg")
    for h in list(root.handlers):
        if getattr(h, "_tileseg_cli", False):
            root.removeHandler(h)
    handler._tileseg_cli = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)


def _fail(exc: BaseException, options: dict[str, str] | None = None) -> None:
    """Print an error (library keyword hints named as this command's ``options``) and exit with the matching code."""
    code = EXIT_USAGE if isinstance(exc, (ConfigError, PluginError, MissingDependencyError)) else EXIT_FAILED
    text = reword(str(exc) or type(exc).__name__, options or PIPELINE_KEYS)
    click.echo(f"error: {text}", err=True)
    if log.isEnabledFor(logging.DEBUG):
        import traceback

        click.echo("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)), err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", "quiet_log", count=True,
              help="Quiet: no progress display, only warnings and errors (-qq: errors only).")
@click.version_option(__version__, prog_name="tileseg")
@click.pass_context
def main(ctx: click.Context, verbose: int, quiet_log: int) -> None:
    """tileseg: memory-bounded tiled segmentation on Dask."""
    ctx.ensure_object(dict)
    ctx.obj["quiet"] = quiet_log
    ctx.obj["verbose"] = verbose
    _configure_logging(verbose, quiet_log)


@main.command()
@click.argument("pipeline", type=click.Path(dir_okay=False))
@click.option("--scheduler", default=None, metavar="NAME|ADDR",
              help="threads, processes, synchronous, local or tcp://host:port (overrides execution.scheduler).")
@click.option("--fresh", is_flag=True, help="Ignore earlier runs: recompute items already done or failed.")
@click.option("--no-resume", "fresh", is_flag=True, hidden=True)
@click.option("--retry-failed", is_flag=True, help="Run again the items an earlier run recorded as failed.")
@click.option("-q", "--quiet", is_flag=True, help="Same as tileseg -q: no progress display, only warnings and errors.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Replace a pipeline value by dotted key, e.g. --set input.path=/data/day1 (YAML value).")
@click.option("--report-page", is_flag=True, help="Also write the HTML report page (tileseg report) at the end.")
@click.pass_context
def run(ctx: click.Context, pipeline: str, scheduler: str | None, fresh: bool, retry_failed: bool, quiet: bool,
        overrides: tuple[str, ...], report_page: bool) -> None:
    """Run PIPELINE over all its inputs; print a summary table and the report path.

    Exit codes: 0 every item done (now or earlier); 1 an item failed or the
    model failed to load (the report says why); 2 configuration errors;
    128 + signal number when interrupted (Ctrl-C: 130, SIGTERM: 143), with
    the state recorded so a rerun continues.
    """
    from .config import load_pipeline
    from .runner import run_pipeline

    obj = ctx.obj or {}
    if quiet and not obj.get("quiet"):  # `tileseg run -q` means what `tileseg -q run` means
        _configure_logging(obj.get("verbose", 0), 1)
    quiet = quiet or bool(obj.get("quiet"))
    previous = _stop_on_sigterm()
    try:
        source = load_pipeline(pipeline, overrides=_parse_sets(overrides)) if overrides else pipeline
        report = run_pipeline(source, scheduler=scheduler, fresh=fresh, retry_failed=retry_failed,
                              progress=not quiet, notify=lambda text: click.echo(text, err=True))
    except (TilesegError, OSError) as exc:
        _fail(exc)
        return
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        click.echo(f"interrupted ({signal.Signals(signum).name}): unfinished items are recorded as pending; "
                   "run the same command again to continue", err=True)
        sys.exit(128 + int(signum))
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    click.echo(report.summary_table())
    for item in report.items:
        if item.dice:
            scores = ", ".join(f"{k}={'-' if v is None else f'{v:.4f}'}" for k, v in item.dice.items())
            click.echo(f"dice [{item.index}] {item.input}: {scores}")
    for item in report.items:
        if item.error:
            click.echo(f"failed [{item.index}] {item.error}", err=True)
    if report.error:
        click.echo(f"error: {report.error}", err=True)
    counts = report.counts()
    busy = sum(1 for i in report.items if i.skipped_reason and "another run" in i.skipped_reason)
    extra = "".join(f", {counts[k]} {k}" for k in ("interrupted", "pending") if k in counts)
    click.echo(f"{counts['ok']} ok, {counts['skipped']} skipped (already complete"
               + (f"; {busy} being processed by another run" if busy else "") + f"), {counts['failed']} failed"
               + f"{extra} in {report.duration_s:.1f} s")
    click.echo(f"report: {report.report_path}")
    if report_page and report.report_path:
        from .report_page import write_report_page

        try:
            click.echo(f"report page: {write_report_page(os.path.dirname(report.report_path))}")
        except Exception as exc:  # the run's result stands; the page is an extra
            click.echo(f"warning: report page not written: {exc}", err=True)
    sys.exit(EXIT_OK if report.ok else EXIT_FAILED)


def _stop_on_sigterm() -> Any:
    """Make SIGTERM stop a run like Ctrl-C (clean-up, state recorded); returns the previous handler."""
    import threading

    from .errors import RunInterrupted

    if threading.current_thread() is not threading.main_thread():  # pragma: no cover - embedded use
        return None

    def handler(signum: int, frame: Any) -> None:
        exc = RunInterrupted(f"stopped by {signal.Signals(signum).name}")
        exc.signum = signum  # type: ignore[attr-defined]
        raise exc

    return signal.signal(signal.SIGTERM, handler)


def _parse_sets(pairs: tuple[str, ...]) -> dict[str, Any]:
    """``--set KEY=VALUE`` options as dotted-key overrides; values are parsed as YAML (``safe_load``)."""
    import yaml

    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set input.path=/data/day1")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {pair!r}: the value is not valid YAML ({exc})") from None
    return out


def _summary(cfg: Any) -> list[str]:
    lines = [f"input: {', '.join(cfg.input.path)} (reader {cfg.input.reader})"]
    if cfg.model is not None:
        t = cfg.tiling
        overlap = f"overlap_px {t.overlap_px}" if t.overlap_px is not None else f"overlap {t.overlap}"
        files = ", ".join(cfg.model.files().values())
        speed = "".join(f", {k}" for k in ("channels_last", "compile") if getattr(cfg.model, k))
        tta = f", tta {'/'.join(cfg.model.tta)}" if cfg.model.tta else ""
        lines.append(f"model: {cfg.model.kind} {files} (batch {cfg.model.batch_size}, {cfg.model.precision}{tta}{speed})")
        lines.append(f"tiling: patch {t.patch_size}, {overlap}, blend {t.blend}")
        lines.append(f"engine output: {cfg.model.output}")
    else:
        name, params = cfg.method_step()
        lines.append(f"method: {name} {params or ''}".rstrip())
    if cfg.preprocess:
        lines.append("preprocess: " + ", ".join(next(iter(s)) for s in cfg.preprocess))
    if cfg.postprocess:
        lines.append("postprocess: " + ", ".join(next(iter(s)) for s in cfg.postprocess))
    for o in cfg.all_outputs():
        lines.append(f"output: {o.path} (writer {o.writer}, {o.content})")
    lines.append(f"execution: {cfg.execution.scheduler}"
                 + (f", {cfg.execution.workers} workers" if cfg.execution.workers else ""))
    if cfg.evaluate is not None:
        lines.append(f"evaluate: Dice against {cfg.evaluate.reference.path or 'the input'}"
                     f" array {cfg.evaluate.reference.array}")
    return lines


@main.command()
@click.argument("pipeline", type=click.Path(dir_okay=False))
def validate(pipeline: str) -> None:
    """Check PIPELINE against the schema and the installed plugins (exit 2 on errors)."""
    from .config import load_pipeline

    try:
        cfg = load_pipeline(pipeline)
    except TilesegError as exc:
        _fail(exc)
        return
    click.echo(f"valid: {pipeline}")
    for line in _summary(cfg):
        click.echo(f"  {line}")


def _mib(n: Any) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


@main.command()
@click.argument("pipeline", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan(pipeline: str, as_json: bool) -> None:
    """Per item: shape, chunks, patches and estimated peak memory per task (computes nothing heavy)."""
    from .planning import plan_pipeline

    try:
        rows = plan_pipeline(pipeline)
    except TilesegError as exc:
        _fail(exc)
        return
    for r in rows:
        for warning in r.get("warnings", ()):
            click.echo(f"warning: item {r['index']} ({r['input']}): {warning}", err=True)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        table = [["#", "input", "shape", "channels", "chunks", "n_patches", "n_blocks", "est_peak_task"]]
        errors = []
        for r in rows:
            if "error" in r:  # below the table: a long message would widen its columns
                table.append([str(r["index"]), r["input"], "failed (below)", "", "", "", "", ""])
                errors.append(f"item {r['index']} ({r['input']}): {r['error']}")
                continue
            table.append([
                str(r["index"]), r["input"], "x".join(map(str, r["shape"])), str(r.get("channels", "-")),
                "x".join(map(str, r["chunks"])), str(r.get("n_patches") if r.get("n_patches") is not None else "-"),
                str(r.get("n_blocks", "-")), _mib(r.get("est_peak_task_bytes")),
            ])
        widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
        for j, row in enumerate(table):
            click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
            if j == 0:
                click.echo("  ".join("-" * w for w in widths))
        for line in errors:
            click.echo(line)
    sys.exit(EXIT_FAILED if any("error" in r for r in rows) else EXIT_OK)


@main.command()
@click.argument("path")
@click.option("--array", default=None, help="Array inside a container (e.g. labels).")
@click.option("--level", default=None, type=int, help="Multiscale level (0 = full resolution).")
@click.option("--axes", default=None, help="Axis names of the stored array, e.g. cyx (overrides the file).")
@click.option("--reader", default="auto", show_default=True, help="Reader name.")
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON.")
def info(path: str, array: str | None, level: int | None, axes: str | None, reader: str, as_json: bool) -> None:
    """Show what tileseg sees in PATH: shape, axes, dtype, chunks, spacing, levels (reads no pixels)."""
    from .inspect import describe, format_description

    opts: dict[str, Any] = {"reader": reader}
    if array is not None:
        opts["array"] = array
    if level is not None:
        opts["level"] = level
    if axes is not None:
        opts["axes"] = axes
    try:
        desc = describe(path, **opts)
    except (TilesegError, OSError) as exc:
        _fail(exc, {"array": "--array", "level": "--level", "axes": "--axes", "max_pixels": "max_pixels",
                    "max_bytes": "max_bytes"})
        return
    click.echo(json.dumps(desc, indent=2, default=str) if as_json else format_description(desc))


@main.command()
@click.argument("pred")
@click.argument("ref")
@click.option("--pred-array", default=None, help="Array inside PRED.")
@click.option("--ref-array", default=None, help="Array inside REF (e.g. labels).")
@click.option("--n-classes", default=None, type=click.IntRange(min=1),
              help="Classes are 0..N-1 (default: 1 + the largest label).")
@click.option("--ignore-index", default=None, type=int, help="Reference label to leave out.")
@click.option("--json", "as_json", is_flag=True, help="Print the scores as JSON.")
def evaluate(pred: str, ref: str, pred_array: str | None, ref_array: str | None, n_classes: int | None,
             ignore_index: int | None, as_json: bool) -> None:
    """Dice, IoU and accuracy per class of the labels PRED against the reference labels REF."""
    from .metrics import evaluate as evaluate_paths

    try:
        scores = evaluate_paths(
            pred, ref, n_classes=n_classes, ignore_index=ignore_index,
            pred_options={"array": pred_array} if pred_array else None,
            ref_options={"array": ref_array} if ref_array else None,
        )
    except (TilesegError, OSError) as exc:
        _fail(exc)
        return
    if as_json:
        click.echo(json.dumps(scores, indent=2))
        return
    click.echo(f"prediction: {scores.get('prediction')}\nreference: {scores.get('reference')}")
    click.echo(f"pixels: {scores['n_pixels']}, pixel accuracy: {_num(scores['pixel_accuracy'])}, "
               f"mean Dice (foreground): {_num(scores['mean_dice'])}, mean IoU: {_num(scores['mean_iou'])}")
    rows = [["class", "dice", "iou", "accuracy", "ref_pixels", "pred_pixels"]]
    for c, v in scores["classes"].items():
        rows.append([c, _num(v["dice"]), _num(v["iou"]), _num(v["accuracy"]), str(v["ref_pixels"]),
                     str(v["pred_pixels"])])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.rjust(w) for c, w in zip(r, widths)))


@main.command("export")
@click.argument("pipeline", type=click.Path(dir_okay=False))
@click.option("--pt2", default=None, type=click.Path(dir_okay=False), help="Write a torch.export program here.")
@click.option("--onnx", "onnx_path", default=None, type=click.Path(dir_okay=False), help="Write an ONNX file here.")
@click.option("--int8", default=None, type=click.Path(dir_okay=False),
              help="Also write an ONNX Runtime INT8 quantisation of the ONNX file here.")
@click.option("--samples", default=None, type=click.Path(dir_okay=False, exists=True),
              help=".npy of sample patches (N, C, *patch) for INT8 calibration and its accuracy report.")
@click.option("--patch-size", default=None, type=int, multiple=True,
              help="Example patch size per axis (default tiling.patch_size); repeat per axis.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def export_cmd(pipeline: str, pt2: str | None, onnx_path: str | None, int8: str | None, samples: str | None,
               patch_size: tuple[int, ...], as_json: bool) -> None:
    """Export the PyTorch model of PIPELINE to .pt2 / .onnx (dynamic batch), each checked before writing."""
    import numpy as np

    from .config import load_pipeline
    from .export import export_model

    try:
        cfg = load_pipeline(pipeline)
        if cfg.model is None:
            raise ConfigError(f"{pipeline}: export needs a model: section")
        size = tuple(patch_size) or tuple(cfg.tiling.patch_size or ())
        data = None if samples is None else np.load(samples, allow_pickle=False)
        report = export_model(cfg.model.spec(), patch_size=size, pt2=pt2, onnx=onnx_path, int8=int8, samples=data)
    except (TilesegError, OSError, ValueError) as exc:
        _fail(exc)
        return
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
        return
    for fmt, path in report.written.items():
        diff = report.max_abs_diff.get(fmt)
        click.echo(f"wrote {fmt}: {path}" + ("" if diff is None else f" (max abs diff vs PyTorch {diff:.3g})"))
    q = report.quantization
    if q:
        click.echo(f"int8 on {q['n_samples']} sample patches: max abs diff {q['max_abs_diff']:.3g}, mean "
                   f"{q['mean_abs_diff']:.3g}, label agreement {100 * q['label_agreement']:.2f}%")


def _num(v: Any) -> str:
    return "-" if v is None else f"{v:.4f}"


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
@click.option("-o", "--out", default=None, type=click.Path(dir_okay=False),
              help="Where to write the page (default RUN_DIR/tileseg-report.html).")
@click.option("--no-images", is_flag=True, help="Leave out the quicklooks of inputs and outputs.")
@click.option("--max-side", default=160, show_default=True, help="Longest side of a quicklook in pixels.")
def report(run_dir: str, out: str | None, no_images: bool, max_side: int) -> None:
    """Write one self-contained HTML page for the runs kept in RUN_DIR (the outputs' folder)."""
    from .report_page import write_report_page

    try:
        path = write_report_page(run_dir, out, images=not no_images, max_side=max_side)
    except FileNotFoundError as exc:  # no run here: a wrong folder, like a missing one (click's exit 2)
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    except (TilesegError, OSError) as exc:
        _fail(exc)
        return
    click.echo(f"report page: {path} ({os.path.getsize(path) / 1024:.0f} KiB)")


if __name__ == "__main__":  # pragma: no cover
    main()
