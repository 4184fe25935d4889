"""Block writes into a partial output folder never overlap its removal (abort, publish, stale clean-up).

The race this closes
--------------------
When one store task raises, the client sees the failure while other store
tasks of the same output are still running: Dask's local schedulers return on
the first error and leave the tasks already handed to the pool running, and a
distributed ``Client.cancel`` does not stop a task a worker is executing. The
writer's ``abort`` then removes the partial folder, and a store task that had
already checked that the folder exists wrote its chunk afterwards: Zarr's
``LocalStore`` creates missing parent folders, so the partial folder came back
(a hidden ``.x.partial-*`` next to the output after a failed run).

How
---
Every block write holds a *shared* :func:`fcntl.flock` on the partial folder
itself (an ``O_RDONLY`` descriptor of the directory) and writes only if the
folder is still the one it locked (:func:`writing_into`). Removing or moving
the folder takes the *exclusive* lock first (:func:`exclusive`,
:func:`remove_partial`), so it waits for the writes in flight (one chunk each)
and every write that starts later finds the folder gone and writes nothing.
Writes into one folder share the lock and never wait for each other; other
outputs' folders are not involved. ``flock`` works across threads (each write
opens its own descriptor) and processes on one host, whatever the scheduler.

Where ``flock`` is unavailable (Windows) or refused (some network file
systems), writes fall back to checking that the folder exists, which leaves
the narrow window described above.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

_warned: set[str] = set()


def _open_dir(folder: str) -> int | None:
    """A read-only descriptor of the directory ``folder``, or ``None`` when it is not (or no longer) there."""
    try:
        return os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except (FileNotFoundError, NotADirectoryError):
        return None


def _lock(fd: int, how: int, folder: str) -> None:
    if fcntl is None:  # pragma: no cover - Windows
        return
    try:
        fcntl.flock(fd, how)
    except OSError as exc:  # pragma: no cover - a file system without flock
        if folder not in _warned:
            _warned.add(folder)
            log.warning("cannot lock the partial output %s (%s): a write still running after a failure may "
                        "leave files in it", folder, exc)


@contextlib.contextmanager
def _held(folder: str, how: str) -> Iterator[int | None]:
    """``folder`` open and ``flock``-ed (``how``: ``LOCK_SH``/``LOCK_EX``) in the block; ``None`` if it is not there."""
    fd = _open_dir(folder)
    if fd is None:
        yield None
        return
    try:
        _lock(fd, getattr(fcntl, how) if fcntl is not None else 0, folder)
        yield fd
    finally:
        os.close(fd)  # releases the lock


def _same(fd: int, folder: str) -> bool:
    """Whether ``folder`` is still the directory open as ``fd`` (not removed, not replaced)."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(folder))
    except OSError:
        return False


@contextlib.contextmanager
def writing_into(folder: str) -> Iterator[bool]:
    """Hold the partial folder ``folder`` for one block write.

    Yields
    ------
    bool
        True: write now (the folder exists and cannot be removed or moved
        until the block ends). False: the folder is gone (aborted, or moved
        into place by a finished write); write nothing.

    Examples
    --------
    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> with writing_into(folder) as ok:
    ...     ok
    True
    >>> remove_partial(folder)
    >>> with writing_into(folder) as ok:
    ...     ok
    False
    """
    with _held(folder, "LOCK_SH") as fd:
        yield fd is not None and _same(fd, folder)


@contextlib.contextmanager
def exclusive(folder: str) -> Iterator[bool]:
    """Hold ``folder`` alone: wait for the block writes in flight, keep new ones out until the block ends.

    Yields
    ------
    bool
        Whether ``folder`` exists (it may be removed, renamed or replaced inside the block).
    """
    with _held(folder, "LOCK_EX") as fd:
        yield fd is not None


def remove_partial(folder: str) -> None:
    """Remove the partial folder ``folder`` once no block is being written into it (see the module docstring).

    A file at ``folder`` is removed too; a missing one is no error.
    """
    if os.path.islink(folder) or os.path.isfile(folder):
        with contextlib.suppress(FileNotFoundError):
            os.remove(folder)
        return
    with exclusive(folder) as there:
        if there:
            shutil.rmtree(folder, ignore_errors=True)
    if os.path.lexists(folder):
        log.warning("could not remove the partial output %s completely", folder)


__all__ = ["exclusive", "remove_partial", "writing_into"]
