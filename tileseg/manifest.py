"""The run manifest: one SQLite row per item, safe to share between runs into one folder.

``tileseg-run.sqlite`` sits next to the outputs (their common folder). It is
opened in WAL mode and every change is one short transaction, so several
``tileseg run`` processes on one machine (or on machines sharing a local
disk) can use it at the same time. SQLite's locking is not reliable on
network file systems (NFS, SMB): point ``execution.manifest`` at a local
disk there, and do not run from several machines at once.

Schema (``PRAGMA user_version`` = :data:`SCHEMA_VERSION`)::

    CREATE TABLE items (
        key                  TEXT PRIMARY KEY, -- JSON list of the item's output paths (what runs contend for)
        input                TEXT NOT NULL,    -- the input item (path, URL or container#key)
        outputs              TEXT NOT NULL,    -- JSON list of output paths
        output_hashes        TEXT,             -- JSON list: configuration hash per output
        status               TEXT NOT NULL,    -- pending | running | done | failed
        error                TEXT,             -- 'Type: message' of the last failure or interruption
        input_fingerprint    TEXT,             -- see tileseg.fingerprint
        pipeline_fingerprint TEXT,
        settings_fingerprint TEXT,            -- the whole pipeline but execution and input.path
        owner                TEXT,             -- host:pid:start:run of the run holding the claim
        heartbeat            REAL,             -- unix time the owner last said it is alive
        attempts             INTEGER NOT NULL DEFAULT 0,
        started              TEXT,             -- ISO 8601 UTC, last claim
        finished             TEXT,             -- ISO 8601 UTC, last done/failed
        updated              TEXT,
        timings              TEXT              -- JSON: seconds per stage of the last attempt
    );

"Skipped" is what a run *did* with an item (its report says so); the row
keeps the item's state (``done``, ``failed``).

Claims: :meth:`Manifest.claim` decides, inside one ``BEGIN IMMEDIATE``
transaction, whether this run processes an item, so two runs never both
take it. A claim held by a run that is gone is taken over: its process no
longer exists (same host), or its heartbeat is older than the lease
(another host, or a frozen process); :class:`Heartbeat` keeps this run's
claims fresh.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from .fingerprint import config_fingerprint, output_hash  # noqa: F401 - re-exported
from .report import now_iso

log = logging.getLogger(__name__)

MANIFEST_NAME = "tileseg-run.sqlite"
SCHEMA_VERSION = 1
#: Item states.
PENDING, RUNNING, DONE, FAILED = "pending", "running", "done", "failed"
#: Seconds without a heartbeat after which another run may take over a claim.
DEFAULT_LEASE_S = 120.0

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS items (
    key TEXT PRIMARY KEY,
    input TEXT NOT NULL,
    outputs TEXT NOT NULL,
    output_hashes TEXT,
    status TEXT NOT NULL CHECK (status IN ('{PENDING}', '{RUNNING}', '{DONE}', '{FAILED}')),
    error TEXT,
    input_fingerprint TEXT,
    pipeline_fingerprint TEXT,
    settings_fingerprint TEXT,
    owner TEXT,
    heartbeat REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    started TEXT,
    finished TEXT,
    updated TEXT,
    timings TEXT
);
CREATE INDEX IF NOT EXISTS items_status ON items (status);
"""


def _retry_locked(fn: Any, seconds: float = 60.0) -> Any:
    """Call ``fn``; while SQLite says the database is locked or busy, retry for up to ``seconds``."""
    deadline = time.monotonic() + seconds
    delay = 0.01
    while True:
        try:
            return fn()
        except sqlite3.OperationalError as exc:
            text = str(exc).lower()
            if ("locked" not in text and "busy" not in text) or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


def item_key(outputs: list[str]) -> str:
    """The manifest key of an item: its output paths (two runs writing them contend for one row)."""
    return json.dumps(list(outputs))


def _process_start(pid: int) -> str:
    try:
        import psutil

        return f"{psutil.Process(pid).create_time():.0f}"
    except Exception:  # pragma: no cover - psutil missing or the process is gone
        return "0"


def this_owner(run_id: str) -> str:
    """``host:pid:start:run`` naming this process and run."""
    return f"{socket.gethostname()}:{os.getpid()}:{_process_start(os.getpid())}:{run_id}"


def owner_alive(owner: str | None, heartbeat: float | None, lease_s: float, now: float | None = None) -> bool:
    """Whether the run named by ``owner`` may still be working on its claim.

    On this host the process must exist with the same start time (a reused
    pid is not the owner); anywhere, the heartbeat must be younger than
    ``lease_s``.
    """
    if not owner:
        return False
    now = time.time() if now is None else now
    if heartbeat is None or now - heartbeat > lease_s:
        return False
    host, _, rest = owner.partition(":")
    if host != socket.gethostname():
        return True
    pid_text, _, rest = rest.partition(":")
    start = rest.partition(":")[0]
    try:
        pid = int(pid_text)
    except ValueError:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return start in ("0", _process_start(pid))


@dataclass(frozen=True)
class Decision:
    """What :meth:`Manifest.claim` decided for one item.

    Attributes
    ----------
    action : {"run", "done", "busy", "failed"}
        ``run``: this run holds the claim and processes the item; ``done``:
        complete with the same fingerprints; ``busy``: another live run holds
        it; ``failed``: failed before with the same fingerprints and
        ``retry_failed`` was not asked.
    previous : dict or None
        The row before this decision.
    """

    action: str
    previous: dict[str, Any] | None = None


class Manifest:
    """Per-item state of every run into one output folder (SQLite, see the module docstring).

    Parameters
    ----------
    path : str
        The database file (created with its folder when missing).
    run_id : str, optional
        This run's identifier (part of the claim owner).
    lease_s : float
        Heartbeat age after which another run's claim is taken over.
    """

    def __init__(self, path: str, run_id: str | None = None, lease_s: float = DEFAULT_LEASE_S) -> None:
        from .errors import OutputError

        self.path = os.path.abspath(path)
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.owner = this_owner(self.run_id)
        self.lease_s = float(lease_s)
        self._lock = threading.Lock()
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=60.0, isolation_level=None, check_same_thread=False)
            self._db.row_factory = sqlite3.Row
            # Switching a new file to WAL takes an exclusive lock and can answer "database is locked" at once,
            # without the busy timeout, when another process opens the same new manifest at that moment.
            _retry_locked(lambda: self._db.execute("PRAGMA journal_mode=WAL"))
            self._db.execute("PRAGMA synchronous=NORMAL")
            with self._transaction() as db:
                version = db.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise OutputError(f"{self.path!r}: manifest schema {version} is newer than this tileseg's "
                                      f"({SCHEMA_VERSION}); upgrade tileseg")
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    db.execute(statement)  # executescript would commit the open transaction
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            raise OutputError(f"{self.path!r}: cannot open the run manifest (SQLite): {exc}") from exc

    # ------------------------------------------------------------------ plumbing
    def _transaction(self) -> Any:
        manifest = self

        class _Tx:
            def __enter__(self) -> sqlite3.Connection:
                manifest._lock.acquire()
                try:
                    manifest._db.execute("BEGIN IMMEDIATE")
                except BaseException:
                    manifest._lock.release()
                    raise
                return manifest._db

            def __exit__(self, kind: Any, exc: Any, tb: Any) -> None:
                try:
                    manifest._db.execute("COMMIT" if kind is None else "ROLLBACK")
                finally:
                    manifest._lock.release()

        return _Tx()

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._db.close()

    @staticmethod
    def _row(row: sqlite3.Row | None) -> dict[str, Any] | None:
        if row is None:
            return None
        out = dict(row)
        for k in ("outputs", "output_hashes", "timings"):
            if out.get(k):
                out[k] = json.loads(out[k])
        return out

    # ------------------------------------------------------------------ reading
    def get(self, key: str) -> dict[str, Any] | None:
        """The row of the item ``key`` (see :func:`item_key`), or ``None``."""
        with self._lock:
            return self._row(self._db.execute("SELECT * FROM items WHERE key = ?", (key,)).fetchone())

    def by_output(self, path: str) -> dict[str, Any] | None:
        """The row of the item that writes ``path``, or ``None``."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM items WHERE outputs LIKE ?",
                                    (f"%{json.dumps(path)[1:-1]}%",)).fetchall()
        for row in rows:
            rec = self._row(row)
            if rec is not None and path in rec["outputs"]:
                return rec
        return None

    def rows(self) -> list[dict[str, Any]]:
        """Every row, ordered by key."""
        with self._lock:
            return [self._row(r) for r in self._db.execute("SELECT * FROM items ORDER BY key").fetchall()]

    # ------------------------------------------------------------------ writing
    def claim(self, key: str, *, input: str, outputs: list[str], output_hashes: list[str], input_fingerprint: str,
              pipeline_fingerprint: str, outputs_complete: bool, settings_fingerprint: str = "",
              fresh: bool = False, retry_failed: bool = False) -> Decision:
        """Decide in one transaction whether this run processes the item, and claim it if so.

        Parameters
        ----------
        key : str
            :func:`item_key` of the item.
        input, outputs, output_hashes, input_fingerprint, pipeline_fingerprint, settings_fingerprint
            What this run would record. A failed item is not retried only when
            its input and the whole pipeline (``settings_fingerprint``) are unchanged.
        outputs_complete : bool
            Whether every writer confirms its output complete (checked by the caller).
        fresh : bool
            Ignore earlier state (a claim held by a live run is still respected).
        retry_failed : bool
            Run items that failed before with the same fingerprints.

        Returns
        -------
        Decision
        """
        now = time.time()
        with self._transaction() as db:
            prev = self._row(db.execute("SELECT * FROM items WHERE key = ?", (key,)).fetchone())
            if prev is not None:
                same = (prev["pipeline_fingerprint"] == pipeline_fingerprint
                        and prev["input_fingerprint"] == input_fingerprint
                        and not input_fingerprint.startswith("unknown:")
                        and prev["input"] == input and prev.get("output_hashes") == list(output_hashes))
                if (prev["status"] == RUNNING and prev["owner"] != self.owner
                        and owner_alive(prev["owner"], prev["heartbeat"], self.lease_s, now)):
                    return Decision("busy", prev)
                if not fresh and same and prev["status"] == DONE and outputs_complete:
                    return Decision("done", prev)
                if (not fresh and same and prev["status"] == FAILED and not retry_failed
                        and prev["settings_fingerprint"] == settings_fingerprint):
                    return Decision("failed", prev)
            db.execute(
                """INSERT INTO items (key, input, outputs, output_hashes, status, error, input_fingerprint,
                                      pipeline_fingerprint, settings_fingerprint, owner, heartbeat, attempts,
                                      started, finished, updated)
                   VALUES (?, ?, ?, ?, ?, NULL, ?, ?, ?, ?, ?, 1, ?, NULL, ?)
                   ON CONFLICT (key) DO UPDATE SET input = excluded.input, outputs = excluded.outputs,
                       output_hashes = excluded.output_hashes, status = excluded.status, error = NULL,
                       input_fingerprint = excluded.input_fingerprint,
                       pipeline_fingerprint = excluded.pipeline_fingerprint,
                       settings_fingerprint = excluded.settings_fingerprint, owner = excluded.owner,
                       heartbeat = excluded.heartbeat, attempts = items.attempts + 1,
                       started = excluded.started, finished = NULL, updated = excluded.updated""",
                (key, input, json.dumps(list(outputs)), json.dumps(list(output_hashes)), RUNNING, input_fingerprint,
                 pipeline_fingerprint, settings_fingerprint, self.owner, now, now_iso(), now_iso()))
            return Decision("run", prev)

    def finish(self, key: str, status: str, *, error: str | None = None,
               timings: dict[str, float] | None = None) -> bool:
        """Record the end of this run's claim on ``key`` (``done``, ``failed`` or ``pending`` when interrupted).

        Returns ``False`` (and changes nothing) when this run no longer holds
        the claim (another run took it over after our heartbeat lapsed).
        """
        if status not in (DONE, FAILED, PENDING):
            raise ValueError(f"status must be done, failed or pending (got {status!r})")
        with self._transaction() as db:
            cur = db.execute(
                "UPDATE items SET status = ?, error = ?, timings = ?, owner = NULL, heartbeat = NULL, "
                "finished = ?, updated = ? WHERE key = ? AND owner = ?",
                (status, error, json.dumps(timings or {}), now_iso() if status != PENDING else None, now_iso(), key,
                 self.owner))
            ok = cur.rowcount == 1
        if not ok:
            log.warning("manifest %s: the claim on %s was taken over by another run; not recording %s",
                        self.path, key, status)
        return ok

    def heartbeat(self) -> int:
        """Refresh the heartbeat of every claim this run holds; returns how many."""
        with self._transaction() as db:
            return db.execute("UPDATE items SET heartbeat = ? WHERE owner = ? AND status = ?",
                              (time.time(), self.owner, RUNNING)).rowcount

    def release_all(self, error: str) -> int:
        """Put every claim this run still holds back to ``pending`` with ``error`` (an interruption)."""
        with self._transaction() as db:
            return db.execute("UPDATE items SET status = ?, error = ?, owner = NULL, heartbeat = NULL, updated = ? "
                              "WHERE owner = ? AND status = ?",
                              (PENDING, error, now_iso(), self.owner, RUNNING)).rowcount


class Heartbeat:
    """A daemon thread that refreshes a manifest's claims every ``lease_s / 4`` seconds (context manager)."""

    def __init__(self, manifest: Manifest, interval_s: float | None = None) -> None:
        self.manifest = manifest
        self.interval_s = interval_s if interval_s is not None else max(0.5, manifest.lease_s / 4)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tileseg-heartbeat", daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.manifest.heartbeat()
            except Exception as exc:  # pragma: no cover - a locked or vanished database
                log.warning("manifest heartbeat failed: %s", exc)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
