"""One progress display for a whole run: items, chunks of the items in flight, throughput, ETA.

On a terminal it is one tqdm bar over the run's work (an item counts 1 when
finished, and the fraction of its output chunks written while it runs), with
items done/failed/total, chunks, pixels per second and an ETA in the bar's
text, redrawn at most every 0.5 s. When the output is not a terminal it
writes plain log lines instead: one per finished item and a status line at
most every ``interval`` seconds, never redraws. ``quiet`` turns it off.
The same figures go into the run report (:meth:`RunProgress.snapshot`).
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TextIO

#: Seconds between status lines when the output is not a terminal.
LOG_INTERVAL_S = 30.0


@dataclass
class _Item:
    name: str
    stage: str = "queued"
    chunks_total: int = 0
    chunks_done: int = 0
    pixels_done: int = 0


@dataclass
class RunProgress:
    """Progress of a run over ``total`` items (thread-safe: items may run concurrently).

    Parameters
    ----------
    total : int
        Number of input items.
    stream : file, optional
        Where to draw (default ``sys.stderr``).
    mode : {"auto", "bar", "log", "off"}
        ``auto``: a bar on a terminal, log lines otherwise.
    interval : float
        Seconds between status lines in ``log`` mode.
    """

    total: int
    stream: TextIO | None = None
    mode: str = "auto"
    interval: float = LOG_INTERVAL_S
    done: int = 0
    failed: int = 0
    skipped: int = 0
    interrupted: int = 0
    pixels: int = 0
    chunks_written: int = 0
    _items: dict[int, _Item] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _bar: Any = field(default=None, repr=False)
    _t0: float = field(default_factory=time.perf_counter, repr=False)
    _last_log: float = field(default=0.0, repr=False)
    lines_written: int = 0

    def __post_init__(self) -> None:
        self.stream = self.stream or sys.stderr
        if self.mode not in ("auto", "bar", "log", "off"):
            raise ValueError(f"progress mode must be auto, bar, log or off, got {self.mode!r}")
        if self.mode == "auto":
            isatty = getattr(self.stream, "isatty", lambda: False)
            self.mode = "bar" if isatty() else "log"
        self._last_log = self._t0
        if self.mode == "bar":
            import shutil

            from tqdm import tqdm

            width = shutil.get_terminal_size((100, 20)).columns or 100  # a pty without a size reports 0
            self._bar = tqdm(total=self.total, file=self.stream, unit="item", mininterval=0.5, leave=True, ncols=width,
                             bar_format="{l_bar}{bar}| {n:.2f}/{total} items [{elapsed}<{remaining}] {postfix}")

    # -- events -----------------------------------------------------------------------------------
    def start_item(self, index: int, name: str, stage: str = "open") -> None:
        """Item ``index`` (displayed as ``name``) started, in ``stage``."""
        with self._lock:
            self._items[index] = _Item(name=name, stage=stage)
        self._update(force=self.mode == "log" and self.lines_written == 0)

    def stage(self, index: int, stage: str, chunks_total: int | None = None) -> None:
        """Item ``index`` moved to ``stage`` (``graph``, ``compute``, ``finalize`` ...)."""
        with self._lock:
            item = self._items.get(index)
            if item is not None:
                item.stage = stage
                if chunks_total is not None:
                    item.chunks_total = int(chunks_total)
        self._update()

    def pass_progress(self, index: int, kind: str, done: int, total: int) -> None:
        """Item ``index`` is in a whole-image pass of ``kind`` (:mod:`tileseg.passes`), ``done`` of ``total`` tasks."""
        pct = 100 * done // max(1, total)
        self.stage(index, f"{kind} {pct}% of {total} tasks")

    def chunk_done(self, index: int, n: int = 1, pixels: int = 0) -> None:
        """``n`` output chunks (``pixels`` spatial pixels) of item ``index`` are written."""
        with self._lock:
            item = self._items.get(index)
            if item is not None:
                item.chunks_done += n
                item.pixels_done += pixels
            self.pixels += pixels
            self.chunks_written += n
        self._update()

    def finish_item(self, index: int, status: str, message: str = "", name: str | None = None) -> None:
        """Item ``index`` ended with ``status`` (``ok``, ``failed``, ``skipped``, or ``interrupted``/``pending``).

        ``name`` names an item that never started (skipped, or failed before it started).
        """
        with self._lock:
            item = self._items.pop(index, None)
            if status == "failed":
                self.failed += 1
            elif status == "skipped":
                self.skipped += 1
            elif status == "ok":
                self.done += 1
            else:  # interrupted: back to pending, not done
                self.interrupted += 1
        if self.mode == "log":
            name = item.name if item else (name or f"item {index}")
            self._line(f"[{self.finished}/{self.total}] {name}: {status}" + (f" ({message})" if message else ""))
        self._update()

    def close(self) -> None:
        """Final line (log mode) or close the bar."""
        if self._bar is not None:
            self._update(force=True)
            self._bar.close()
            self._bar = None
        elif self.mode == "log":
            self._line(self.status_line())

    # -- figures ----------------------------------------------------------------------------------
    @property
    def finished(self) -> int:
        """Items that ended (ok, skipped or failed)."""
        return self.done + self.failed + self.skipped + self.interrupted

    def snapshot(self) -> dict[str, Any]:
        """The figures shown: items, chunks of the items in flight, throughput and ETA."""
        with self._lock:
            elapsed = time.perf_counter() - self._t0
            running = list(self._items.values())
            chunks_done = sum(i.chunks_done for i in running)
            chunks_total = sum(i.chunks_total for i in running)
            partial = sum(i.chunks_done / i.chunks_total for i in running if i.chunks_total)
            work = self.finished + partial
            eta = elapsed * (self.total - work) / work if work > 0 and self.total > work else (0.0 if work else None)
            return {
                "items_total": self.total, "items_done": self.done, "items_failed": self.failed,
                "items_skipped": self.skipped, "items_interrupted": self.interrupted,
                "items_running": len(running), "chunks_done": chunks_done, "chunks_total": chunks_total,
                "chunks_written": self.chunks_written,
                "pixels_per_s": self.pixels / elapsed if elapsed > 0 else None,
                "elapsed_s": round(elapsed, 3), "eta_s": None if eta is None else round(eta, 1),
                "work_done": round(work, 4),
            }

    def status_line(self) -> str:
        """One line with the current figures."""
        s = self.snapshot()
        parts = [f"{s['items_done']} done, {s['items_skipped']} skipped, {s['items_failed']} failed "
                 + (f"{s['items_interrupted']} interrupted " if s["items_interrupted"] else "")
                 + f"of {s['items_total']} items"]
        if s["items_running"]:
            with self._lock:
                stages = ", ".join(f"{i.name}: {i.stage}" for i in list(self._items.values())[:3])
            more = "" if s["items_running"] <= 3 else ", ..."
            parts.append(f"{s['items_running']} running ({s['chunks_done']}/{s['chunks_total']} chunks; "
                         f"{stages}{more})")
        if s["pixels_per_s"]:
            parts.append(f"{s['pixels_per_s'] / 1e6:.2f} Mpx/s")
        if s["eta_s"] is not None and self.finished < s["items_total"]:
            parts.append(f"ETA {_duration(s['eta_s'])}")
        return "; ".join(parts)

    # -- drawing ----------------------------------------------------------------------------------
    def _update(self, force: bool = False) -> None:
        if self.mode == "off":
            return
        if self._bar is not None:
            s = self.snapshot()
            self._bar.n = s["work_done"]
            self._bar.set_postfix_str(
                f"{s['items_done']} ok, {s['items_failed']} failed, {s['items_skipped']} skipped; "
                f"chunks {s['chunks_done']}/{s['chunks_total']}"
                + (f"; {s['pixels_per_s'] / 1e6:.1f} Mpx/s" if s["pixels_per_s"] else ""), refresh=False)
            self._bar.refresh() if force else self._bar.update(0)
            return
        now = time.perf_counter()
        if force or now - self._last_log >= self.interval:
            self._line(self.status_line())

    def _line(self, text: str) -> None:
        with self._lock:
            self._last_log = time.perf_counter()
            self.lines_written += 1
        print(f"tileseg: {text}", file=self.stream, flush=True)


def _local_outputs(handles: Sequence[Any]) -> list[tuple[Any, int]]:
    """The outputs among ``handles`` that keep chunk records (local ones), each with its number of chunks."""
    from .store import is_url

    return [(h, math.prod(math.ceil(s / max(1, c)) for s, c in zip(h.shape, h.chunks)))
            for h in handles if not is_url(h.target) and h.shape and h.chunks]


def _recorded(handle: Any) -> int:
    """How many finished-chunk records the output ``handle`` holds (:mod:`tileseg.writers.blocks`)."""
    from .writers.blocks import records_of

    try:
        return len(os.listdir(records_of(handle.target).folder))
    except OSError:
        return 0


def written_share(handles: Sequence[Any]) -> float | None:
    """The share of their chunks that the local outputs ``handles`` already hold (a resumed run), or ``None``.

    With several outputs, the least written one's share: the compute still has
    to produce every chunk that one lacks.
    """
    shares = [min(_recorded(h), total) / max(1, total) for h, total in _local_outputs(handles)]
    return min(shares) if shares else None


@contextmanager
def watch_chunks(display: RunProgress, index: int, handles: Sequence[Any], pixels: int,
                 every_s: float = 0.5) -> Iterator[None]:
    """Feed ``display`` with the chunks of item ``index`` written so far, while the block runs.

    Counts the finished-chunk records that local outputs keep
    (:mod:`tileseg.writers.blocks`), so it works with every scheduler, a
    remote cluster included (the records are files next to the output).
    Outputs without records (URLs) count only when the item ends.

    Parameters
    ----------
    display : RunProgress
    index : int
        The item.
    handles : sequence of WriteHandle
        The item's prepared outputs (``target``, ``shape``, ``chunks``).
    pixels : int
        Spatial pixels of the item (spread over its chunks for the throughput).
    every_s : float
        Seconds between counts.
    """
    local = _local_outputs(handles)
    total = sum(n for _, n in local)
    display.stage(index, "compute", chunks_total=total)
    seen = 0
    stop = threading.Event()

    def count() -> None:
        nonlocal seen
        n = min(sum(_recorded(h) for h, _ in local), total)
        if n > seen:
            display.chunk_done(index, n - seen, pixels=int(pixels * (n - seen) / total) if total else 0)
            seen = n

    def loop() -> None:
        while not stop.wait(every_s):
            count()

    thread = threading.Thread(target=loop, name=f"tileseg-progress-{index}", daemon=True)
    if total and display.mode != "off":
        thread.start()
    try:
        yield
    finally:
        stop.set()
        if thread.is_alive():
            thread.join()
        if total:  # the report's figures, display on or off
            count()


def _duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else (f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s")
