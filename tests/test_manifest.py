"""The SQLite run manifest: claims decided in one transaction, shared by processes, taken over from dead runs."""

from __future__ import annotations

import multiprocessing
import socket
import sqlite3
import time

import pytest

from tileseg.manifest import DONE, FAILED, PENDING, Heartbeat, Manifest, item_key, owner_alive

KW = dict(input="/in/a.zarr", outputs=["/out/a.zarr"], output_hashes=["h"], input_fingerprint="stat:1:2",
          pipeline_fingerprint="p", settings_fingerprint="s", outputs_complete=True)
KEY = item_key(["/out/a.zarr"])


def test_schema_wal_and_roundtrip(tmp_path):
    m = Manifest(str(tmp_path / "m.sqlite"))
    assert m.claim(KEY, **KW).action == "run"
    row = m.get(KEY)
    assert row["status"] == "running" and row["owner"] == m.owner and row["attempts"] == 1
    assert m.finish(KEY, DONE, timings={"open": 0.5})
    row = m.by_output("/out/a.zarr")
    assert row["status"] == DONE and row["owner"] is None and row["timings"] == {"open": 0.5}
    assert row["outputs"] == ["/out/a.zarr"] and row["input_fingerprint"] == "stat:1:2"
    with sqlite3.connect(m.path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] == 1
        with pytest.raises(sqlite3.IntegrityError):  # the status set is enforced by the schema
            db.execute("UPDATE items SET status = 'complete'")


def test_rerun_decisions(tmp_path):
    m = Manifest(str(tmp_path / "m.sqlite"))
    m.claim(KEY, **KW)
    m.finish(KEY, DONE)
    assert m.claim(KEY, **KW).action == "done"
    assert m.claim(KEY, **{**KW, "outputs_complete": False}).action == "run"  # output gone: rerun
    m.finish(KEY, DONE)
    assert m.claim(KEY, **{**KW, "input_fingerprint": "stat:1:3"}).action == "run"  # input changed
    m.finish(KEY, FAILED, error="InputError: bad")
    changed = {**KW, "input_fingerprint": "stat:1:3"}
    decision = m.claim(KEY, **changed)
    assert decision.action == "failed" and decision.previous["error"] == "InputError: bad"
    assert m.get(KEY)["status"] == FAILED  # a decision not to run changes nothing
    assert m.claim(KEY, **{**changed, "settings_fingerprint": "s2"}).action == "run"  # e.g. overwrite: true now
    m.finish(KEY, FAILED, error="again")
    assert m.claim(KEY, **{**changed, "settings_fingerprint": "s2"}, retry_failed=True).action == "run"
    m.finish(KEY, DONE)
    assert m.claim(KEY, **changed, fresh=True).action == "run"
    assert m.get(KEY)["attempts"] == 6  # every claim counted


def test_live_claims_are_respected_dead_ones_taken_over(tmp_path):
    path = str(tmp_path / "m.sqlite")
    first, second = Manifest(path, lease_s=60), Manifest(path, lease_s=60)
    assert first.claim(KEY, **KW).action == "run"
    busy = second.claim(KEY, **KW, fresh=True)
    assert busy.action == "busy" and busy.previous["owner"] == first.owner
    # a pid that does not exist on this host: dead at once, whatever its heartbeat
    with sqlite3.connect(path) as db:
        db.execute("UPDATE items SET owner = ?, heartbeat = ?", (f"{socket.gethostname()}:999999999:0:x",
                                                                 time.time()))
    assert second.claim(KEY, **KW).action == "run"
    assert not first.finish(KEY, DONE)  # the claim is no longer first's: nothing recorded
    assert second.finish(KEY, DONE) and second.get(KEY)["status"] == DONE
    # another host: alive while its heartbeat is younger than the lease
    now = time.time()
    assert owner_alive("elsewhere:1:0:r", now - 10, 60, now)
    assert not owner_alive("elsewhere:1:0:r", now - 61, 60, now)
    assert not owner_alive(None, now, 60, now)


def test_heartbeat_keeps_a_claim_and_release_puts_it_back(tmp_path):
    path = str(tmp_path / "m.sqlite")
    m = Manifest(path, lease_s=0.6)
    m.claim(KEY, **KW)
    with sqlite3.connect(path) as db:
        db.execute("UPDATE items SET heartbeat = 0")
    with Heartbeat(m, interval_s=0.05):
        time.sleep(0.3)
    assert time.time() - m.get(KEY)["heartbeat"] < 0.6
    assert m.release_all("interrupted (SIGTERM)") == 1
    row = m.get(KEY)
    assert row["status"] == PENDING and row["error"] == "interrupted (SIGTERM)" and row["owner"] is None


def _claim_all(path: str, keys: list[str], queue) -> None:
    m = Manifest(path)
    got = []
    for key in keys:
        if m.claim(key, **{**KW, "outputs": [key]}).action == "run":
            got.append(key)
            m.finish(key, DONE)
    queue.put(got)


def test_processes_claiming_at_once_never_share_an_item(tmp_path):
    path = str(tmp_path / "m.sqlite")
    Manifest(path).close()
    keys = [item_key([f"/out/{i}.zarr"]) for i in range(60)]
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_claim_all, args=(path, keys[::step], queue)) for step in (1, 1, -1, -1)]
    for p in procs:
        p.start()
    got = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    claimed = [k for g in got for k in g]
    assert sorted(claimed) == sorted(keys)  # every item exactly once, none lost
    rows = Manifest(path).rows()
    assert len(rows) == 60 and {r["status"] for r in rows} == {DONE}


def _open_new(path: str, barrier, queue) -> None:
    barrier.wait()
    try:
        Manifest(path).close()
        queue.put(None)
    except Exception as exc:  # noqa: BLE001 - reported to the test
        queue.put(str(exc))


def test_processes_creating_one_manifest_at_once_all_open_it(tmp_path):
    """Two runs started together on a new folder: switching the new file to WAL answered "database is
    locked" at once (no busy wait) to 3 of 160 openers before the retry."""
    ctx = multiprocessing.get_context("fork")
    errors = []
    for round_ in range(40):
        path = str(tmp_path / f"m{round_}.sqlite")
        barrier, queue = ctx.Barrier(4), ctx.Queue()
        procs = [ctx.Process(target=_open_new, args=(path, barrier, queue)) for _ in range(4)]
        for p in procs:
            p.start()
        errors += [e for e in (queue.get(timeout=120) for _ in procs) if e]
        for p in procs:
            p.join(timeout=60)
    assert errors == []
