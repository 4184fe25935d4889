"""Process-wide event counters (model loads, bad model output), collected from every worker for run reports.

Tasks run in worker processes, so what they count stays there; :func:`collect`
gathers the counts of this process and, on a distributed cluster, of every
worker (``Client.run``). Dask may run a task twice, so counts are at least
the number of distinct events. With the ``processes`` scheduler the pool's
processes cannot be asked: only this process's counts are reported (the
events are also logged).
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

_COUNTS: Counter[tuple[str, str]] = Counter()
_LOCK = threading.Lock()


def add(name: str, label: str = "", n: int = 1) -> None:
    """Count ``n`` events ``name`` (e.g. ``"model_loads"``) for ``label`` (e.g. an image) in this process."""
    with _LOCK:
        _COUNTS[(name, label)] += int(n)


def snapshot() -> dict[str, dict[str, int]]:
    """This process's counts: ``{name: {label: n}}``."""
    with _LOCK:
        out: dict[str, dict[str, int]] = {}
        for (name, label), n in _COUNTS.items():
            out.setdefault(name, {})[label] = n
        return out


def reset() -> None:
    """Forget every count of this process (tests)."""
    with _LOCK:
        _COUNTS.clear()


def collect(client: Any = None) -> dict[str, dict[str, dict[str, int]]]:
    """Counts per process: ``{"local": snapshot(), worker address: snapshot(), ...}``.

    Parameters
    ----------
    client : distributed.Client, optional
        Also ask each of its workers.
    """
    out = {"local": snapshot()}
    if client is not None:
        try:
            out.update(client.run(snapshot))
        except Exception:  # pragma: no cover - a cluster that went away: report what this process has
            pass
    return out


def total(per_process: dict[str, dict[str, dict[str, int]]], name: str, label: str | None = None) -> int:
    """Sum of ``name`` over processes (and over labels unless ``label`` is given)."""
    n = 0
    for counts in per_process.values():
        by_label = counts.get(name, {})
        n += sum(by_label.values()) if label is None else by_label.get(label, 0)
    return n
