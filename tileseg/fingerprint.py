"""Fingerprints that decide whether an earlier result still holds: the pipeline's and each input's.

A run skips an item only when the manifest records it done with the same
*pipeline fingerprint* (everything in the pipeline that changes its outputs,
model weights by content) and the same *input fingerprint*:

- local file: ``stat:<size>:<mtime_ns>``;
- local folder (a Zarr store, a DICOM series folder): a hash over every
  file's relative path, size and ``mtime_ns`` (``tree:<files>:<hash>``), so a
  chunk rewritten in place changes it;
- remote object or prefix (fsspec): a hash over what the store reports per
  object: ETag, version id, generation, checksum, size, modification time
  (``remote:<files>:<hash>``);
- ``checksum=True`` (``execution.input_checksum``): SHA-256 of every byte
  instead of sizes and times (``sha256:<hash>``), local and remote.

An item ``container#key`` (one series of a study) is fingerprinted by its
container. An input that cannot be inspected gets ``unknown:<reason>``,
which never equals a recorded fingerprint, so the item is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from .store import is_url, local_path

#: fsspec ``info`` fields that identify an object's content or version, in order of preference.
REMOTE_FIELDS = ("ETag", "etag", "VersionId", "version_id", "generation", "md5Hash", "crc32c", "checksum",
                 "size", "mtime", "LastModified", "last_modified", "updated", "created")


def _container(item: str) -> str:
    """The path that holds ``item`` (``study#series`` -> ``study``)."""
    head, sep, frag = str(item).rpartition("#")
    if sep and head and frag:
        local = local_path(item)
        if local is None or not os.path.exists(local):
            return head.rstrip("/") or head
    return str(item)


def _file_sha256(open_fn: Any, h: Any) -> None:
    with open_fn() as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)


def _local(path: str, checksum: bool) -> str:
    st = os.stat(path)
    if not os.path.isdir(path):
        if checksum:
            h = hashlib.sha256()
            _file_sha256(lambda: open(path, "rb"), h)
            return f"sha256:{h.hexdigest()}"
        return f"stat:{st.st_size}:{st.st_mtime_ns}"
    h = hashlib.sha256()
    n = 0
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            rel = os.path.relpath(full, path)
            try:
                fst = os.stat(full)
            except FileNotFoundError:  # removed while listing
                continue
            n += 1
            h.update(rel.encode("utf-8", "surrogateescape") + b"\0")
            if checksum:
                _file_sha256(lambda full=full: open(full, "rb"), h)
            else:
                h.update(f"{fst.st_size}:{fst.st_mtime_ns}\0".encode())
    return f"{'sha256' if checksum else 'tree'}:{n}:{h.hexdigest()[:32]}"


def _remote(url: str, storage_options: dict[str, Any] | None, checksum: bool) -> str:
    from .store import url_to_fs

    fs, root = url_to_fs(url, storage_options)
    info = fs.info(root)
    if info.get("type") == "directory":
        listing = fs.find(root, detail=True)
    else:
        listing = {root: info}
    h = hashlib.sha256()
    for name in sorted(listing):
        entry = listing[name]
        h.update(str(name)[len(root):].encode() + b"\0")
        if checksum:
            _file_sha256(lambda name=name: fs.open(name, "rb"), h)
        else:
            fields = {k: str(entry[k]) for k in REMOTE_FIELDS if entry.get(k) is not None}
            h.update(json.dumps(fields, sort_keys=True).encode() + b"\0")
    return f"{'sha256' if checksum else 'remote'}:{len(listing)}:{h.hexdigest()[:32]}"


def input_fingerprint(item: str, *, storage_options: dict[str, Any] | None = None, checksum: bool = False) -> str:
    """The fingerprint of an input item's content (see the module docstring).

    Parameters
    ----------
    item : str
        Local path, fsspec URL or ``container#key``.
    storage_options : dict, optional
        fsspec options for URLs.
    checksum : bool
        Hash every byte instead of sizes and modification times.

    Returns
    -------
    str
        ``kind:...``; ``unknown:...`` when the input cannot be inspected.

    Examples
    --------
    >>> import os, tempfile
    >>> p = os.path.join(tempfile.mkdtemp(), "a.bin")
    >>> _ = open(p, "wb").write(b"abc")
    >>> input_fingerprint(p, checksum=True)[:15]
    'sha256:ba7816bf'
    """
    path = _container(item)
    try:
        local = local_path(path)
        if local is not None:
            return _local(local, checksum)
        if is_url(path):
            return _remote(path, storage_options, checksum)
    except (OSError, ValueError) as exc:
        return f"unknown:{type(exc).__name__}"
    return "unknown:not-a-path"  # pragma: no cover - local_path handles every non-URL


def file_digest(path: str) -> str:
    """SHA-256 of a local file's bytes (``path`` itself for URLs and missing files)."""
    if is_url(path) or not os.path.isfile(path):
        return path
    h = hashlib.sha256()
    _file_sha256(lambda: open(path, "rb"), h)
    return h.hexdigest()


def config_fingerprint(cfg: Any) -> str:
    """Hash of everything in a pipeline that changes an item's outputs, except input and output paths.

    Execution settings, evaluation and the description do not count; model
    files count by content (see :func:`output_hash` for the per-output part).
    """
    data = cfg.model_dump(mode="json", exclude={"execution", "evaluate", "description", "output", "outputs"})
    data["input"].pop("path", None)
    if cfg.model is not None:
        data["model_files_sha256"] = {k: file_digest(v) for k, v in sorted(cfg.model.files().items())}
    text = json.dumps(data, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def settings_fingerprint(cfg: Any) -> str:
    """Hash of the whole pipeline except ``execution``, ``description`` and the list of inputs.

    Outputs and ``overwrite`` are included. A failed item is reported failed
    again without running only while this and its input are unchanged; which
    other inputs the run lists (``input.path``) does not change an item.
    """
    data = cfg.model_dump(mode="json", exclude={"execution": True, "description": True, "input": {"path"}})
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def output_hash(fingerprint: str, item: str, output: Any, path: str) -> str:
    """The configuration hash recorded for one output of one item.

    Parameters
    ----------
    fingerprint : str
        :func:`config_fingerprint` of the pipeline.
    item : str
        The input item.
    output : OutputConfig
        The output's settings (writer, content, options; not ``overwrite``).
    path : str
        The rendered output path.
    """
    settings = output.model_dump(mode="json", exclude={"overwrite", "path"})
    text = json.dumps(settings, sort_keys=True)
    return hashlib.sha256(f"{fingerprint}\0{item}\0{path}\0{text}".encode()).hexdigest()[:32]
