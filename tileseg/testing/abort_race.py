"""Reproduce the abort race on demand: one block write is held until the writer's ``abort`` has run.

A failed compute returns to the client while other store tasks of the same
output are still running; the writer's ``abort`` then removes the partial
folder. A test (or a writer plugin's author) makes that interleaving certain:

1. :func:`install` (in every process that runs store tasks: the test process
   for local schedulers, each worker through ``client.run`` for distributed)
   patches the process so that the *first* block write anywhere (claimed with
   a file in ``signals``, so one across all processes) announces itself
   (``signals/held``) and waits until ``signals/aborted`` exists and the folder
   it writes into has been removed (at most ``patience`` seconds), then writes;
2. the failing block calls :func:`wait_for_hold` before raising, so the
   failure reaches the client while that write is held;
3. the writer's ``abort`` is wrapped with :func:`announcing_abort`;
4. after the failure, :func:`wait_for_release` waits until the held write
   has ended; the output's folder must then hold nothing from the failed write.

``where`` picks the write that is held: ``"store"`` (a chunk written through
Zarr's ``LocalStore``, which creates missing parent folders) or ``"record"``
(the chunk's completion marker, :meth:`tileseg.writers.blocks.ChunkRecords.mark`).
Only the standard library is imported here.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import Any

#: Seconds a held write waits for the abort (a broken test never hangs).
TIMEOUT_S = 60.0
_METADATA = ("zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata")
_originals: dict[str, Any] = {}


def _touch(path: str) -> None:
    with open(path, "a"):
        pass


def _claim(signals: str) -> bool:
    """True for the one caller (across processes) that creates ``signals/held`` (holding its process id)."""
    try:
        fd = os.open(os.path.join(signals, "held"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    try:
        os.write(fd, str(os.getpid()).encode())
    finally:
        os.close(fd)
    return True


def _abort_seen(signals: str, folder: str, patience: float, start: float) -> bool:
    """Whether the held write may go on: the abort ran and ``folder`` is gone, or it waited long enough."""
    if not os.path.exists(os.path.join(signals, "aborted")):
        return time.monotonic() - start > TIMEOUT_S
    if "seen" not in _originals:
        _originals["seen"] = time.monotonic()
    return not os.path.exists(folder) or time.monotonic() - _originals["seen"] > patience


def install(signals: str, where: str = "store", patience: float = 1.0) -> None:
    """Patch this process so that its first block write waits for the abort (see the module docstring).

    Parameters
    ----------
    signals : str
        An existing folder shared by every process involved.
    where : {"store", "record"}
        Hold a Zarr chunk write or a chunk's completion marker.
    patience : float
        Seconds the held write waits, once the abort started, for the folder
        to disappear (a correct abort waits for the write, so it never does).
    """
    uninstall()
    _originals.pop("seen", None)
    if where == "store":
        from zarr.storage import LocalStore

        original = LocalStore.set
        _originals["store"] = original

        async def held_set(self: Any, key: str, value: Any) -> None:
            if key.endswith(_METADATA) or not _claim(signals):
                await original(self, key, value)
                return
            try:
                start = time.monotonic()
                while not _abort_seen(signals, str(self.root), patience, start):
                    await asyncio.sleep(0.01)
                await original(self, key, value)
            finally:
                _touch(os.path.join(signals, "released"))

        LocalStore.set = held_set  # type: ignore[method-assign]
    elif where == "record":
        from ..writers.blocks import ChunkRecords

        original_mark = ChunkRecords.mark
        _originals["record"] = original_mark

        def held_mark(self: Any, index: tuple[int, ...]) -> None:
            if not _claim(signals):
                original_mark(self, index)
                return
            try:
                start = time.monotonic()
                while not _abort_seen(signals, os.path.dirname(self.folder), patience, start):
                    time.sleep(0.01)
                original_mark(self, index)
            finally:
                _touch(os.path.join(signals, "released"))

        ChunkRecords.mark = held_mark  # type: ignore[method-assign]
    else:
        raise ValueError(f"where must be 'store' or 'record', got {where!r}")


def uninstall() -> None:
    """Undo :func:`install` in this process."""
    if "store" in _originals:
        from zarr.storage import LocalStore

        LocalStore.set = _originals.pop("store")  # type: ignore[method-assign]
    if "record" in _originals:
        from ..writers.blocks import ChunkRecords

        ChunkRecords.mark = _originals.pop("record")  # type: ignore[method-assign]


def _wait_for(path: str, what: str) -> None:
    start = time.monotonic()
    while not os.path.exists(path):
        if time.monotonic() - start > TIMEOUT_S:
            raise TimeoutError(f"{what} did not happen within {TIMEOUT_S:.0f} s ({path})")
        time.sleep(0.01)


def wait_for_hold(signals: str) -> None:
    """Block until a write is held (call it in the failing block, before raising)."""
    _wait_for(os.path.join(signals, "held"), "no block write was held")


def wait_for_release(signals: str) -> None:
    """Block until the held write has ended (written, or skipped)."""
    _wait_for(os.path.join(signals, "released"), "the held block write did not end")


def fail_block(block: Any, block_info: Any = None, *, first: int = 0, signals: str | None = None) -> Any:
    """A ``map_blocks`` function that raises ``RuntimeError("boom")`` in one block: ``(first, 0, ...)``.

    With ``signals`` it first waits for a held write (:func:`wait_for_hold`), so the
    failure reaches the client while that write is in flight, and records its
    process id in ``signals/failed`` (the held write's is in ``signals/held``).
    """
    location = tuple(block_info[0]["chunk-location"])
    if location == (first,) + (0,) * (len(location) - 1):
        if signals is not None:
            wait_for_hold(signals)
            with open(os.path.join(signals, "failed"), "w") as fh:
                fh.write(str(os.getpid()))
        raise RuntimeError("boom")
    return block


def announcing_abort(abort: Callable[[Any], None], signals: str) -> Callable[[Any], None]:
    """``abort`` that first creates ``signals/aborted`` (releasing the held write to race it)."""

    def wrapped(handle: Any) -> None:
        _touch(os.path.join(signals, "aborted"))
        abort(handle)

    return wrapped


__all__ = ["announcing_abort", "fail_block", "install", "uninstall", "wait_for_hold", "wait_for_release"]
