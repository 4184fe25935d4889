"""The writer interface: prepare, a dask task that writes, finalize.

A writer stores a lazy dask array, carrying metadata from the input
:class:`~tileseg.image.Image`. Writing is split in three steps so that a
pipeline run can build the graphs of many items, compute them together and
record completion only for the items that really finished:

1. ``handle = writer.prepare(data, path, like=image, axes=axes, ...)``
   checks the destination, creates the empty output (metadata only) and
   marks it *incomplete*;
2. ``task = writer.write_task(handle, data)`` returns a
   :class:`dask.delayed.Delayed` that writes every output chunk (nothing runs
   yet); computing it twice writes the same bytes (idempotent);
3. ``writer.finalize(handle, info)`` after the task succeeded marks the
   output *complete* (and for local paths moves it into place), or
   ``writer.abort(handle)`` after a failure.

:meth:`Writer.write` chains the three for simple use.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..image import SPATIAL_AXES, Image

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WriteHandle:
    """Where and what a prepared write goes to (small, picklable).

    Attributes
    ----------
    path : str
        The final output path or URL.
    target : str
        Where chunks are written now (a hidden temporary sibling of ``path``
        for local outputs, ``path`` itself for URLs).
    writer : str
        Name of the writer that prepared it.
    shape, chunks, dtype : tuple, tuple, str
        Of the stored array.
    axes : tuple of str
        Axis names of the stored array.
    run_id : str
        Identifier recorded in the output's status.
    storage_options : dict or None
        fsspec options for URLs.
    details : dict
        Writer-specific facts (e.g. ``array_path``, ``zarr_format``).
    """

    path: str
    target: str
    writer: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: str
    axes: tuple[str, ...]
    run_id: str
    storage_options: dict[str, Any] | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class WriteJob:
    """Result of :meth:`Writer.write`: the handle and, when not computed, the task to compute."""

    handle: WriteHandle
    task: Any = None
    done: bool = False


class Writer:
    """Base class of output writers (see the module docstring for the protocol).

    Writers receive the result as an :class:`~tileseg.image.Image`: its data,
    axes, geometry (spacing, origin, direction, CRS, transform), nodata,
    class names and the attributes to carry over.
    """

    name: ClassVar[str] = ""

    def prepare(
        self,
        image: Image,
        path: str,
        *,
        overwrite: bool = False,
        storage_options: dict[str, Any] | None = None,
        **options: Any,
    ) -> WriteHandle:  # pragma: no cover - interface
        """Create the empty output, marked incomplete; return its handle."""
        raise NotImplementedError

    def write_task(self, handle: WriteHandle, image: Image) -> Any:  # pragma: no cover - interface
        """A dask ``Delayed`` that writes ``image.data`` into the prepared output."""
        raise NotImplementedError

    def finalize(self, handle: WriteHandle, info: dict[str, Any] | None = None) -> None:  # pragma: no cover
        """Mark the output complete (after the write task succeeded)."""
        raise NotImplementedError

    def abort(self, handle: WriteHandle) -> None:  # pragma: no cover - interface
        """Discard a prepared output after a failure (best effort)."""
        raise NotImplementedError

    def is_complete(
        self, path: str, storage_options: dict[str, Any] | None = None
    ) -> bool:  # pragma: no cover
        """Whether ``path`` holds a finished output of this writer."""
        raise NotImplementedError

    def write(
        self,
        image: Image,
        path: str,
        *,
        overwrite: bool = False,
        storage_options: dict[str, Any] | None = None,
        compute: bool = True,
        info: dict[str, Any] | None = None,
        options: dict[str, Any] | None = None,
    ) -> WriteJob:
        """Prepare, write and (when ``compute``) finalize in one call.

        Parameters
        ----------
        image : Image
            What to write, with its geometry and attributes.
        path : str
            Output path or fsspec URL.
        overwrite : bool
            Replace an existing finished output.
        storage_options : dict, optional
            fsspec options for URLs.
        compute : bool
            Run the write now and finalize. When ``False`` the returned job
            holds the ``task``; compute it, then call :meth:`finalize` with
            ``job.handle``.
        info : dict, optional
            JSON-friendly facts recorded by :meth:`finalize` (e.g. run id).
        options : dict, optional
            Writer-specific keyword arguments of :meth:`prepare`.

        Returns
        -------
        WriteJob
        """
        from ..step_call import check_params

        options = dict(options or {})
        check_params(self.prepare, "writer", self.name, options, skip=4, from_image=False)  # image, path, overwrite, storage_options
        handle = self.prepare(image, path, overwrite=overwrite, storage_options=storage_options, **options)
        task = self.write_task(handle, image)
        if not compute:
            return WriteJob(handle=handle, task=task)
        import dask

        from ..gcpause import frozen

        try:
            with frozen():  # a huge image's graph is not walked by every garbage collection while it runs
                dask.compute(task)
            self.finalize(handle, info)
        except BaseException:
            self.abort(handle)
            raise
        return WriteJob(handle=handle, task=None, done=True)


def check_axes(axes: tuple[str, ...], ndim: int, path: str) -> tuple[str, ...]:
    """Validate output axis names: ``c`` optional and first, then 2-3 of ``z, y, x`` in order."""
    from ..errors import OutputError

    axes = tuple(str(a) for a in axes)
    spatial = axes[1:] if axes and axes[0] == "c" else axes
    ok = len(axes) == ndim and len(spatial) in (2, 3) and spatial == SPATIAL_AXES[-len(spatial) :]
    if not ok:
        raise OutputError(
            f"{path!r}: axes {axes!r} do not fit a {ndim}-D output "
            "(expected optional 'c' first, then ('y', 'x') or ('z', 'y', 'x'))"
        )
    return axes


def partial_sibling(path: str, key: str | None = None) -> tuple[str, str]:
    """``(final, target)`` of a local output: its absolute path and a hidden partial sibling.

    The sibling ``<dir>/.<name>.partial-<id>`` is on the same filesystem as
    the final path, so renaming it into place is atomic. The parent folder is
    created. ``id`` is a new uuid, or ``key`` (a run's hash of the item, its
    output settings and the pipeline fingerprint): the same item and pipeline
    then find their partial output again and resume it (see
    :mod:`tileseg.writers.blocks`), and partial siblings of this output made for
    another key (a changed pipeline, an older tileseg) are removed.

    Raises
    ------
    OutputError
        The parent folder cannot be created, or ``key`` is not a short hex string.
    """
    from ..errors import OutputError

    final = os.path.abspath(path.rstrip("/") or path)
    parent, base = os.path.split(final)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{path!r}: cannot create the output folder {parent!r}: {exc}") from exc
    if key is None:
        return final, os.path.join(parent, f".{base}.partial-{uuid.uuid4().hex[:12]}")
    if not (0 < len(key) <= 64 and all(c in "0123456789abcdef" for c in key)):
        raise OutputError(f"{path!r}: partial_key must be a lowercase hex string of at most 64 characters, got {key!r}")
    target = os.path.join(parent, f".{base}.partial-{key}")
    prefix = f".{base}.partial-"
    for name in os.listdir(parent):
        if name.startswith(prefix) and os.path.join(parent, name) != target:
            log.info("removing a stale partial output %s (another pipeline or run)", os.path.join(parent, name))
            _remove(os.path.join(parent, name))
    return final, target


def _remove(path: str) -> None:
    from .partial_lock import remove_partial

    remove_partial(path)  # waits for block writes still running into it (see tileseg.writers.partial_lock)


def open_partial(target: str, layout: dict[str, Any], resume: bool) -> bool:
    """Reuse the partial folder ``target`` if it was made for ``layout``, else start it empty.

    Returns
    -------
    bool
        True when an earlier partial output is resumed (its chunk records
        kept); False when ``target`` was (re)created empty; the caller then
        creates its store inside and calls :func:`~tileseg.writers.blocks.mark_partial`.
    """
    from .blocks import reusable

    if resume and os.path.isdir(target) and reusable(target, layout):
        log.info("resuming the partial output %s", target)
        return True
    if os.path.lexists(target):
        _remove(target)
    return False


#: A partial sibling named by a fresh uuid (``partial_sibling`` without a key): never resumed.
_UUID_PARTIAL = re.compile(r"\.partial-[0-9a-f]{12}$")


def stale_siblings(path: str) -> list[str]:
    """Hidden siblings of a local output left by killed runs that nothing will reuse.

    ``.<name>.old-*`` (a replaced output not yet removed) and uuid-named
    ``.<name>.partial-<12 hex>`` folders. Partial outputs named by a longer key
    (a run's hash of the item and pipeline, for chunk-level resume) are left to
    the writer, which resumes the one for its key and removes the others.
    """
    from ..store import local_path

    local = local_path(path)
    if local is None:
        return []
    final = os.path.abspath(local.rstrip("/") or local)
    parent, base = os.path.split(final)
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    old, partial = f".{base}.old-", f".{base}.partial-"
    return sorted(os.path.join(parent, n) for n in names
                  if n.startswith(old) or (n.startswith(partial) and _UUID_PARTIAL.search(n)))


def remove_stale(path: str) -> list[str]:
    """Remove the stale siblings of ``path`` (see :func:`stale_siblings`); returns what went.

    Call it only while holding the item's claim in the run manifest: no live
    run is then writing these folders.
    """
    from .partial_lock import remove_partial

    removed = []
    for p in stale_siblings(path):
        try:
            remove_partial(p)
        except OSError:
            continue
        removed.append(p)
    if removed:
        log.info("removed %d stale partial folder(s) of %s", len(removed), path)
    return removed


def move_into_place(src: str, dst: str) -> None:
    """Rename ``src`` onto ``dst``, replacing an existing ``dst`` (file or folder).

    A file replaces a file atomically (:func:`os.replace`); otherwise the old
    ``dst`` is moved aside first and removed after the rename.
    """
    if os.path.isfile(src) and (not os.path.lexists(dst) or os.path.isfile(dst)):
        os.replace(src, dst)
        return
    parent, base = os.path.split(dst)
    if os.path.lexists(dst):
        old = os.path.join(parent, f".{base}.old-{uuid.uuid4().hex[:12]}")
        os.rename(dst, old)
        try:
            os.rename(src, dst)
        except OSError:
            os.rename(old, dst)
            raise
        if os.path.isdir(old) and not os.path.islink(old):
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.remove(old)
    else:
        os.rename(src, dst)


class GuardedTarget:
    """A ``dask.array.store`` target that skips writes once the partial folder is gone (an aborted write).

    After a failure, dask may still run blocks already started while ``abort``
    removes the partial folder; each write holds the folder
    (:func:`~tileseg.writers.partial_lock.writing_into`), so the removal waits
    for it and later writes find the folder gone instead of recreating it.

    Parameters
    ----------
    arr : array-like
        The store array (supports ``__setitem__``).
    target : str
        The partial folder that must still exist for a write to happen.
    """

    def __init__(self, arr: Any, target: str) -> None:
        self.arr, self.target = arr, target
        self.shape, self.dtype, self.ndim = arr.shape, arr.dtype, arr.ndim

    def __setitem__(self, key: Any, value: Any) -> None:
        from .partial_lock import writing_into

        with writing_into(self.target) as ok:
            if ok:
                self.arr[key] = value


class SingleFileWriter(Writer):
    """Base of writers whose output is one file built in ``finalize`` (COG, NIfTI, DICOM SEG, polygons).

    The run writes blocks into a hidden partial folder beside the output;
    ``finalize`` builds the file inside it and calls :meth:`publish`;
    :meth:`abort` removes the folder. Subclasses name their format
    (``format_name``, for messages) and give ``_is_complete(path)``: whether an
    existing file of their format records a finished tileseg output.
    """

    #: The output format in messages ("GeoTIFF", "NIfTI", ...).
    format_name: ClassVar[str] = "output"

    def _is_complete(self, path: str) -> bool:  # pragma: no cover - interface
        """Whether the existing file ``path`` is a finished tileseg output (it raises when it is not of the format)."""
        raise NotImplementedError

    def _format_of(self, path: str) -> str:
        """The format ``path`` must have (``format_name``; writers of several formats pick by the path)."""
        return self.format_name

    def _status(self, path: str) -> str | None:
        """``None`` (absent), ``"complete"`` (a finished tileseg output) or ``"foreign"`` (another file of the format).

        Raises
        ------
        OutputError
            ``path`` exists and is not a file of the writer's format.
        """
        from ..errors import MissingDependencyError, OutputError

        if not os.path.lexists(path):
            return None
        refuse = f"{path!r} exists and is not a {self._format_of(path)} file; refusing to replace it"
        if not os.path.isfile(path):
            raise OutputError(refuse)
        try:
            done = self._is_complete(path)
        except (OutputError, MissingDependencyError):
            raise
        except Exception as exc:
            raise OutputError(f"{refuse} ({exc})") from exc
        return "complete" if done else "foreign"

    def local_output(self, path: str, storage_options: dict[str, Any] | None) -> str:
        """The local path of ``path``; these writers write local files only (write locally, then upload).

        Raises
        ------
        OutputError
            A URL, or storage options.
        """
        from ..errors import OutputError
        from ..store import local_path

        local = local_path(path)
        if local is None or storage_options:
            raise OutputError(f"{path!r}: the {self.name} writer writes local files only (write locally, then upload)")
        return local

    def claim(self, path: str, local: str, overwrite: bool, what: str, key: str | None = None) -> tuple[str, str]:
        """``(final, partial folder)`` for ``local``, refusing an existing output unless ``overwrite``.

        ``what`` names a foreign file of this format in the message (``"a GeoTIFF"``);
        ``key`` names the partial folder (see :func:`partial_sibling`).

        Raises
        ------
        OutputError
            Something is at the path (a finished output or a file of this format, without
            ``overwrite``; anything else always, from ``_status``).
        """
        from ..errors import OutputError

        final, target = partial_sibling(local, key)
        existing = self._status(final)
        if existing is not None and not overwrite:
            kind = "a finished tileseg output" if existing == "complete" else what
            raise OutputError(f"{path!r} already exists ({kind}); pass overwrite=True to replace it")
        return final, target

    def partial_store(self, path: str, target: str, layout: dict[str, Any], resume: bool,
                      create: Any) -> bool:
        """Resume the partial folder ``target`` made for ``layout``, or make it anew with ``create(target)``.

        Returns
        -------
        bool
            True when resumed (chunks already recorded there are not written again).

        Raises
        ------
        OutputError
            The folder or its store cannot be created.
        """
        from ..errors import OutputError
        from .blocks import mark_partial

        if open_partial(target, layout, resume):
            return True
        try:
            os.makedirs(target)
            create(target)
            mark_partial(target, layout)
        except Exception as exc:
            _remove(target)
            raise OutputError(f"{path!r}: cannot create the partial store in {target!r}: {exc}") from exc
        return False

    def is_complete(self, path: str, storage_options: dict[str, Any] | None = None) -> bool:
        """Whether ``path`` is a local file of this writer whose recorded status is ``complete``."""
        from ..errors import OutputError
        from ..store import local_path

        local = local_path(str(path))
        try:
            return local is not None and self._status(local) == "complete"
        except OutputError:
            return False

    def publish(self, handle: WriteHandle, built: str, final: str, overwrite: bool) -> None:
        """Move the finished file ``built`` onto ``final`` and remove the partial folder.

        Raises
        ------
        OutputError
            Something appeared at ``final`` while writing (and ``overwrite`` is false);
            the new file is left in the partial folder.
        """
        from ..errors import OutputError

        if self._status(final) is not None and not overwrite:
            raise OutputError(f"{handle.path!r} was created by someone else while writing; left the new output "
                              f"at {built!r}")
        move_into_place(built, final)
        _remove(handle.target)

    def abort(self, handle: WriteHandle) -> None:
        """Remove the partial folder (the final path is untouched).

        Block writes still running (a failed compute returns before its other
        tasks end) finish first; later ones write nothing (see :mod:`tileseg.writers.partial_lock`).
        """
        _remove(handle.target)
