"""Host <-> CUDA copies that overlap with the model's compute.

Each Dask thread that feeds a CUDA model copies its batch into a pinned
(page-locked) host buffer of its own and uploads it on a side stream of its
own, *outside* the per-device forward lock: while one thread's forward runs
on the device's default stream, the next thread's upload is already under
way. The result goes back the same way: the side stream waits for the
forward, copies into a pinned buffer, and the thread waits for that copy
after it has released the lock, so the next forward starts at once.

Used only when the model's device is a CUDA device; the CPU path never
touches this module. Buffers are reused per thread and shape (a few shapes
per thread: full and remainder batches), so pinning, which is slow, happens
once per shape.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

__all__ = ["upload", "use", "download", "wait"]

_local = threading.local()
_MAX_BUFFERS = 8  # per thread; beyond that the oldest is released


def _torch():
    import torch

    return torch


def _pinned(tag: str, shape: tuple[int, ...]) -> Any:
    """A pinned float32 host tensor of ``shape``, reused by this thread for ``tag``."""
    torch = _torch()
    cache: dict = getattr(_local, "buffers", None)
    if cache is None:
        cache = _local.buffers = {}
    key = (tag, tuple(shape))
    buf = cache.pop(key, None)
    if buf is None:
        if len(cache) >= _MAX_BUFFERS:
            cache.pop(next(iter(cache)))
        buf = torch.empty(shape, dtype=torch.float32, pin_memory=True)
    cache[key] = buf  # most recently used last
    return buf


def _side_stream(device: Any) -> Any:
    """This thread's copy stream on ``device``."""
    torch = _torch()
    streams: dict = getattr(_local, "streams", None)
    if streams is None:
        streams = _local.streams = {}
    s = streams.get(device)
    if s is None:
        s = streams[device] = torch.cuda.Stream(device=device)
    return s


def upload(batch: np.ndarray, device: Any) -> tuple[Any, Any]:
    """Start copying ``batch`` to ``device``; returns ``(tensor, stream)``.

    The tensor is valid on the device's current stream only after
    ``torch.cuda.current_stream(device).wait_stream(stream)`` (done by
    :func:`download`'s caller under the forward lock, see
    :meth:`tileseg.predictors.torch.TorchPredictor`).
    """
    torch = _torch()
    device = torch.device(device)
    host = _pinned("in", batch.shape)
    host.numpy()[...] = batch
    stream = _side_stream(device)
    with torch.cuda.stream(stream):
        x = host.to(device, non_blocking=True)
    return x, stream


def use(x: Any, stream: Any, device: Any) -> Any:
    """Make the compute stream wait for ``x``'s upload on ``stream`` (call under the forward lock)."""
    torch = _torch()
    compute = torch.cuda.current_stream(torch.device(device))
    compute.wait_stream(stream)
    x.record_stream(compute)  # the allocator must not reuse x's memory before the forward is done
    return x


def download(y: Any, stream: Any) -> tuple[Any, Any]:
    """Queue ``y`` (float32, on the device) to a pinned host buffer on ``stream``, after the forward.

    Returns ``(host_tensor, event)``; call :func:`wait` after releasing the lock.
    """
    torch = _torch()
    host = _pinned("out", tuple(y.shape))
    stream.wait_stream(torch.cuda.current_stream(y.device))
    with torch.cuda.stream(stream):
        host.copy_(y, non_blocking=True)
        y.record_stream(stream)
        done = torch.cuda.Event()
        done.record(stream)
    return host, done


def wait(host: Any, done: Any) -> np.ndarray:
    """Wait for a :func:`download` and return its data as a new numpy array."""
    done.synchronize()
    return host.numpy().copy()
