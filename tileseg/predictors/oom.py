"""Adaptive batch size: halve the batch on GPU out-of-memory, remember the size that fits.

A predictor called with ``N`` patches runs them in slices of at most the
batch size this process has found to fit (initially ``N``). When a forward
raises ``torch.cuda.OutOfMemoryError`` (or ``torch.OutOfMemoryError``), the
slice is halved and retried, down to one patch; the size found is kept in a
per-process table keyed by the predictor and its device, so every later call
in that worker process starts there, and it is logged once per new size. An
item never fails for this reason unless a single patch does not fit.

:func:`snapshot` returns the table for run reports
(:func:`tileseg.runner.run_pipeline` gathers it from the client process and,
on a distributed cluster, from every worker).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import ModelError

log = logging.getLogger(__name__)

__all__ = ["is_out_of_memory", "run_adaptive", "batch_limit", "snapshot", "gather", "reset"]

#: (predictor key, device) -> {"batch_size": fitted size, "requested": largest size asked for, ...}
_LIMITS: dict[tuple[str, str], dict[str, Any]] = {}
_LOCK = threading.Lock()


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is torch's device out-of-memory error (``torch.cuda.OutOfMemoryError``)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    return oom is not None and isinstance(exc, oom)


def batch_limit(key: str, device: str) -> int | None:
    """The batch size this process found to fit for ``(key, device)``, or None when none was needed."""
    with _LOCK:
        entry = _LIMITS.get((key, device))
        return None if entry is None else int(entry["batch_size"])


def _lower(key: str, device: str, size: int, requested: int, name: str) -> int:
    """Record that ``size`` did not fit; return the new (halved) limit."""
    new = max(1, size // 2)
    with _LOCK:
        entry = _LIMITS.get((key, device))
        if entry is not None and entry["batch_size"] <= new:  # another thread lowered it further already
            return int(entry["batch_size"])
        _LIMITS[(key, device)] = {"key": key, "model": name, "device": device, "batch_size": new, "requested": requested,
                                  "host": socket.gethostname(), "pid": os.getpid()}
    log.warning("%s on %s: out of memory with a batch of %d patches; retrying with %d (kept for the rest of "
                "the run in this worker process)", name, device, size, new)
    return new


def release_cached_memory() -> None:
    """Hand torch's cached CUDA blocks back to the driver (nothing without CUDA)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_adaptive(forward: Callable[[np.ndarray], Any], batch: np.ndarray, *, key: str, device: str,
                 name: str = "model") -> Any:
    """``forward(batch)``, in slices that fit: halved on out-of-memory, the size found kept per process.

    Parameters
    ----------
    forward : callable
        Maps ``(n, ...)`` to ``(n, ...)`` numpy arrays or torch tensors (one model forward).
    batch : numpy.ndarray
        ``(N, C, *patch)``.
    key, device : str
        Identify the model and the device it runs on (the per-process table's key).
    name : str
        Model name for log messages and reports.

    Returns
    -------
    numpy.ndarray or torch.Tensor
        The outputs of all slices, concatenated along the batch axis (tensors
        stay on their device).

    Raises
    ------
    ModelError
        When a single patch does not fit in device memory.

    Examples
    --------
    >>> run_adaptive(lambda b: b * 2, np.ones((3, 1, 2, 2), np.float32), key="doc", device="cpu").shape
    (3, 1, 2, 2)
    """
    n = len(batch)
    limit = batch_limit(key, device) or n
    outs: list[Any] = []
    i = 0
    while i < n:
        size = min(limit, n - i)
        failed = False
        try:
            outs.append(forward(batch[i : i + size]))
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            if size == 1:
                raise ModelError(f"{name} on {device}: out of device memory with a batch of a single patch "
                                 f"{tuple(batch.shape[1:])!r}; use smaller patches or a larger device: "
                                 f"{str(exc).strip()[:300]}") from exc
            failed = True  # leave the except block first so the traceback's tensors are freed
        if failed:
            release_cached_memory()
            limit = _lower(key, device, size, n, name)
            continue
        i += size
    if len(outs) == 1:
        return outs[0]
    if isinstance(outs[0], np.ndarray):
        return np.concatenate(outs, axis=0)
    return sys.modules["torch"].cat(outs, dim=0)  # device tensors (TorchPredictor.predict_tensor) stay there


def snapshot() -> list[dict[str, Any]]:
    """This process's fitted batch sizes: ``[{"key", "model", "device", "batch_size", "requested", "host", "pid"}]``."""
    with _LOCK:
        return [dict(v) for v in _LIMITS.values()]


def gather(client: Any = None, key: str | None = None) -> list[dict[str, Any]]:
    """Fitted batch sizes of this process and, with a distributed ``client``, of every worker.

    ``key`` keeps only the entries of one predictor (its ``_key``).

    Entries from workers carry a ``worker`` address. Worker processes of the
    ``processes`` scheduler cannot be asked; their back-offs are in their logs.
    """
    out = []
    if client is not None:
        try:
            per_worker = client.run(snapshot)
        except Exception as exc:  # a worker that went away must not fail the report
            log.debug("could not gather batch sizes from the workers: %s", exc)
            per_worker = {}
        for addr, entries in sorted(per_worker.items()):
            out.extend(dict(e, worker=addr) for e in entries)
    out += [dict(e, worker="local") for e in snapshot()]
    unique: dict[tuple, dict[str, Any]] = {}  # workers sharing one process share (and report) one table
    for e in out:
        if key is None or e["key"] == key:
            unique.setdefault((e["host"], e["pid"], e["key"], e["device"]), e)
    return list(unique.values())


def reset() -> None:
    """Forget every fitted batch size in this process (tests, or a new run in a long-lived process)."""
    with _LOCK:
        _LIMITS.clear()
