"""What a run records next to its outputs: the resume manifest and the configuration hashes.

The manifest (``tileseg-run.json``) maps each output path to its status
(``running``, ``complete``, ``failed``), input and configuration hash,
written atomically after every change. An output is only ever taken as done
when this record says ``complete`` with the same hash *and* the writer
confirms the output is complete: completion is recorded, never inferred
from a file existing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any

from .config import PipelineConfig
from .report import now_iso, read_json, write_text_atomic
from .store import is_url

log = logging.getLogger(__name__)

MANIFEST_NAME = "tileseg-run.json"


def _file_digest(path: str) -> str:
    if is_url(path) or not os.path.isfile(path):
        return path
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def config_fingerprint(cfg: PipelineConfig) -> str:
    """Hash of everything that changes an item's outputs, except input and output paths (see :func:`output_hash`).

    Execution settings, evaluation and the description do not count; model
    files count by content.
    """
    data = cfg.model_dump(mode="json", exclude={"execution", "evaluate", "description", "output", "outputs"})
    data["input"].pop("path", None)
    if cfg.model is not None:
        data["model_files_sha256"] = {k: _file_digest(v) for k, v in sorted(cfg.model.files().items())}
    text = json.dumps(data, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


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


class Manifest:
    """Per-output status of runs into one output directory, saved atomically.

    The file maps each output path to ``{"input", "config_hash", "status",
    "updated", "error"}`` with status ``running``, ``complete`` or ``failed``.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            data = read_json(path)
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable manifest %s: %s", path, exc)
            data = None
        self.entries: dict[str, dict[str, Any]] = {}
        if isinstance(data, dict) and isinstance(data.get("items"), dict):
            self.entries = {str(k): v for k, v in data["items"].items() if isinstance(v, dict)}

    def get(self, output: str) -> dict[str, Any] | None:
        """The record of ``output``, if any."""
        return self.entries.get(output)

    def set(self, output: str, *, item: str, config_hash: str, status: str, error: str | None = None) -> None:
        """Record the status of ``output`` and save the manifest."""
        self.entries[output] = {"input": item, "config_hash": config_hash, "status": status,
                                "updated": now_iso(), "error": error}
        self.save()

    def save(self) -> None:
        """Write the manifest atomically."""
        write_text_atomic(self.path, json.dumps({"version": 1, "items": self.entries}, indent=2) + "\n")
