"""Run reports: per-item results, package versions, a JSON file and a summary table."""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

#: File name of the latest run's report, next to the outputs.
REPORT_NAME = "tileseg-report.json"
#: Folder next to the outputs keeping every run's report (one file per run, never overwritten).
RUNS_DIR = "tileseg-runs"

#: Item statuses: done now, failed, left alone (done earlier, or held by another run), stopped by an
#: interruption, not reached yet.
OK, FAILED, SKIPPED, INTERRUPTED, PENDING_STATUS = "ok", "failed", "skipped", "interrupted", "pending"


@dataclass
class ItemResult:
    """What happened to one input item.

    Attributes
    ----------
    index : int
        Position of the item in the expanded input list.
    input, output : str
        Input path/URL and its first rendered output path.
    outputs : list of str
        Every rendered output path of the item (``outputs:`` in the pipeline).
    status : {"ok", "failed", "skipped", "interrupted", "pending"}
        ``skipped``: an earlier run already completed the item with the same
        input and pipeline, or another run is processing it right now
        (``skipped_reason`` says which); ``interrupted``: the run was stopped
        before the item finished.
    skipped_reason : str
        Why a skipped item was left alone.
    shape, chunks : list of int
        Spatial shape of the input and output chunk sizes.
    n_patches : int
        Patches predicted (model pipelines).
    n_patches_skipped : int
        Patches left out because all their pixels are nodata (never sent to the model).
    timings : dict
        Seconds per stage: ``open``, ``graph``, ``statistics`` and ``components``
        (whole-image passes made while the graph is built, see :mod:`tileseg.passes`),
        ``compute_write``, ``finalize``, ``evaluate``. Set-up is ``graph`` + ``statistics``.
    pixels_per_s : float
        Spatial pixels this run computed (all but ``resumed_share``) divided by the time computing the
        result (``components`` + ``compute_write``).
    resumed_share : float
        Share of the output chunks an earlier, interrupted run had written (resumed; 0 for a fresh write,
        ``None`` for outputs without chunk records, such as URLs).
    peak_rss_bytes : int
        Peak resident memory of this process and its children during the item.
    error : str
        ``ExceptionType: message`` naming the file, for failed items.
    dice : dict
        Dice per class (``None`` where a class is absent from both images).
    bad_output_px : int
        Pixels written as nodata because the model output NaN/Inf there
        (``model.bad_output: nodata``; see :mod:`tileseg.counters`).
    """

    index: int
    input: str
    output: str | None = None
    outputs: list[str] | None = None
    status: str = FAILED
    shape: list[int] | None = None
    chunks: list[int] | None = None
    n_patches: int | None = None
    n_patches_skipped: int | None = None
    timings: dict[str, float] = field(default_factory=dict)
    pixels_per_s: float | None = None
    peak_rss_bytes: int | None = None
    error: str | None = None
    dice: dict[str, float | None] | None = None
    config_hash: str | None = None
    skipped_reason: str | None = None
    bad_output_px: int | None = None
    resumed_share: float | None = None


@dataclass
class RunReport:
    """The result of :func:`tileseg.runner.run_pipeline`.

    Attributes
    ----------
    pipeline : dict
        The fully resolved pipeline (defaults filled in, absolute paths).
    versions : dict
        Versions of tileseg, Python and the libraries that did the work.
    scheduler : dict
        The scheduler that ran the graph.
    items : list of ItemResult
    report_path, manifest_path : str
        Where the JSON report and the run manifest were written.
    run_id : str
        This run's identifier (its claims in the manifest carry it).
    error : str
        What stopped the whole run (the model failed to load, an interruption).
    interrupted : bool
        Whether the run was stopped (Ctrl-C, SIGTERM) before every item finished.
    model_loads : dict
        Model loads per process since it started (``local``: this process,
        else worker addresses; see :mod:`tileseg.counters`): a worker that
        runs inference loads the model once.
    batch_sizes : list of dict
        Batch sizes lowered after device out-of-memory, per model and worker
        process (``model``, ``device``, ``batch_size`` found, ``requested``,
        ``worker``, ``host``, ``pid``; see :mod:`tileseg.predictors.oom`).
        Empty when every batch fitted.
    progress : dict
        The progress display's figures when the report was written (items,
        chunks of the items in flight, throughput, ETA; see :mod:`tileseg.progress`).
    """

    pipeline: dict[str, Any]
    versions: dict[str, str]
    scheduler: dict[str, Any] = field(default_factory=dict)
    items: list[ItemResult] = field(default_factory=list)
    started: str = ""
    finished: str | None = None
    duration_s: float | None = None
    report_path: str | None = None
    manifest_path: str | None = None
    run_id: str | None = None
    error: str | None = None
    interrupted: bool = False
    model_loads: dict[str, int] | None = None
    batch_sizes: list[dict[str, Any]] = field(default_factory=list)
    progress: dict[str, Any] | None = None
    _run_file: str | None = field(default=None, repr=False, compare=False)

    @property
    def n_failed(self) -> int:
        """Number of failed items."""
        return sum(i.status == FAILED for i in self.items)

    @property
    def ok(self) -> bool:
        """Whether every item succeeded or was left alone (done earlier, or by another run)."""
        return all(i.status in (OK, SKIPPED) for i in self.items) and self.error is None

    def counts(self) -> dict[str, int]:
        """Items per status (``interrupted`` and ``pending`` only when there are some)."""
        out = {s: sum(i.status == s for i in self.items) for s in (OK, SKIPPED, FAILED)}
        for s in (INTERRUPTED, PENDING_STATUS):
            n = sum(i.status == s for i in self.items)
            if n:
                out[s] = n
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        out = asdict(self)
        out.pop("_run_file", None)
        out["summary"] = self.counts()
        return _jsonable(out)

    def write(self, path: str) -> str:
        """Write the report as JSON (atomically) and remember where.

        The same JSON also goes to this run's own file in :data:`RUNS_DIR`
        beside ``path`` (named by start time and process), so a later run,
        which replaces ``path``, never erases this run's figures.
        """
        self.report_path = path
        text = json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"
        write_text_atomic(path, text)
        if self._run_file is None:  # named by the first write's time: runs sort in the order they started
            name = f"{time.time_ns():020d}-{platform.node() or 'host'}-{os.getpid()}.json"
            self._run_file = os.path.join(os.path.dirname(path) or ".", RUNS_DIR, name)
        write_text_atomic(self._run_file, text)
        return path

    def summary_table(self) -> str:
        """A plain-text table with one row per item."""
        return summary_table(self.items)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return _jsonable(obj.item())
    return obj


def now_iso() -> str:
    """The current UTC time, ISO 8601."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def package_versions() -> dict[str, str]:
    """Versions of tileseg, Python and the libraries used (torch only if loaded)."""
    from importlib import metadata

    from . import __version__

    out = {"tileseg": __version__, "python": platform.python_version(), "platform": platform.platform()}
    names = ["dask", "zarr", "numpy", "pydantic"]
    names += [n for n in ("torch", "distributed", "scikit-image", "scipy", "onnxruntime")
              if n.replace("scikit-image", "skimage") in sys.modules]
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:  # pragma: no cover - odd installs
            mod = sys.modules.get(name)
            out[name] = str(getattr(mod, "__version__", "unknown"))
    return out


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and ``os.replace`` (URLs via fsspec)."""
    from .store import is_url, url_to_fs

    if is_url(path) and not path.startswith("file://"):
        fs, inner = url_to_fs(path)  # a missing filesystem package is named (MissingDependencyError)
        with fs.open(inner, "w", encoding="utf-8") as fh:
            fh.write(text)
        return
    path = path[len("file://"):] if path.startswith("file://") else path
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=directory)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600: readable like any other file the user writes
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _umask() -> int:
    """The process umask (read from /proc where it exists; setting it back at once otherwise)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def read_json(path: str) -> Any:
    """Read a JSON file (local or fsspec URL); ``None`` if it does not exist."""
    from .store import is_url

    if is_url(path) and not path.startswith("file://"):
        from .store import url_to_fs

        fs, p = url_to_fs(path)
        if not fs.exists(p):
            return None
        with fs.open(p, "r") as fh:
            return json.load(fh)
    path = path[len("file://"):] if path.startswith("file://") else path
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _fmt_bytes(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f}M"


def _short(text: str | None, width: int) -> str:
    if not text:
        return "-"
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def summary_table(items: list[ItemResult]) -> str:
    """Format items as an aligned text table.

    Columns: status, input, shape, patches, total seconds, Mpx/s of the
    compute+write stage, peak RSS, mean foreground Dice, error.
    """
    header = ["#", "status", "input", "shape", "patches", "time s", "Mpx/s", "peak RSS", "dice fg", "error"]
    rows = [header]
    for it in items:
        total = sum(it.timings.values()) if it.timings else None
        dice = None
        if it.dice:  # mean over the foreground classes (all but the first), like metrics.mean_dice
            vals = list(it.dice.values())
            vals = [v for v in (vals[1:] if len(vals) > 1 else vals) if v is not None]
            dice = f"{sum(vals) / len(vals):.3f}" if vals else "-"
        rows.append([
            str(it.index),
            it.status,
            _short(os.path.basename(it.input.rstrip("/")) or it.input, 28),
            "x".join(map(str, it.shape)) if it.shape else "-",
            "-" if it.n_patches is None else str(it.n_patches),
            "-" if total is None else f"{total:.2f}",
            "-" if not it.pixels_per_s else f"{it.pixels_per_s / 1e6:.2f}",
            _fmt_bytes(it.peak_rss_bytes),
            dice or "-",
            _short(it.error, 60),
        ])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


class PeakRSS:
    """Sample the resident memory of this process and its children in a thread.

    Examples
    --------
    >>> with PeakRSS() as mem:
    ...     _ = bytearray(10_000_000)
    >>> mem.peak > 0
    True
    """

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        import psutil

        proc = psutil.Process()
        while True:
            try:
                rss = proc.memory_info().rss
                for child in proc.children(recursive=True):
                    try:
                        rss += child.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak = max(self.peak, rss)
            except psutil.Error:  # pragma: no cover
                pass
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> PeakRSS:
        self._thread = threading.Thread(target=self._sample, name="tileseg-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
