"""Scheduler selection for pipeline runs."""

from __future__ import annotations

import os
import sys

import dask
import dask.array as da
import numpy as np
import pytest

from tileseg.errors import ConfigError, MissingDependencyError
from tileseg.execution import compute, scheduler_context


def test_threads_sets_worker_count_and_restores():
    before = dask.config.get("scheduler", None)
    with scheduler_context({"scheduler": "threads", "workers": 3}) as info:
        assert dask.config.get("scheduler") is dask.threaded.get and dask.config.get("num_workers") == 3
        assert not info.distributed
        x = da.arange(100, chunks=7)
        assert compute(info, x.sum())[0] == 4950
    assert dask.config.get("scheduler", None) == before


def test_a_local_run_does_not_import_distributed(tmp_path):
    """Dask imports distributed (about 0.5 s) to look for a client when a scheduler is named, and rechunking
    looks for one too; a run on local threads passes the scheduler function and the rechunk method instead."""
    import subprocess

    code = (
        "import sys, numpy as np, dask.array as da\n"
        "from tileseg.execution import compute, scheduler_context\n"
        "with scheduler_context({'scheduler': 'threads', 'workers': 2}) as info:\n"
        "    x = da.from_array(np.arange(400.0).reshape(20, 20), chunks=5).rechunk((4, 20))\n"
        "    assert compute(info, x.sum())[0] == 79800.0\n"
        "print('distributed' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_override_wins_over_config():
    with scheduler_context({"scheduler": "threads", "workers": 2}, override="synchronous") as info:
        assert info.name == "synchronous" and dask.config.get("scheduler") is dask.local.get_sync


def test_progress_bar_prints(capsys):
    import time

    def slow(block):
        time.sleep(0.2)
        return block

    with scheduler_context({"scheduler": "synchronous"}) as info:
        x = da.from_array(np.ones((16, 16)), chunks=8).map_blocks(slow)
        (total,) = compute(info, x.sum(), progress=True)
    assert total == 256
    assert "100% Completed" in capsys.readouterr().out
    with scheduler_context({"scheduler": "synchronous"}) as info:
        compute(info, x.sum(), progress=False)
    assert "Completed" not in capsys.readouterr().out


@pytest.mark.parametrize("bad", ["thread", "tcp:/nohost", "gpu"])
def test_invalid_scheduler_is_config_error(bad):
    with pytest.raises(ConfigError, match="execution.scheduler"):
        with scheduler_context({"scheduler": "threads"}, override=bad):
            pass


def test_missing_distributed_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # makes `import distributed` fail
    with pytest.raises(MissingDependencyError, match=r"tileseg\[distributed\]"):
        with scheduler_context({"scheduler": "local"}):
            pass


def test_unreachable_address_is_config_error():
    pytest.importorskip("distributed")
    with pytest.raises(ConfigError, match="cannot connect"):
        with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
            with scheduler_context({"scheduler": "threads"}, override="tcp://127.0.0.1:9"):
                pass


def test_processes_reuse_one_pool_for_the_run():
    import os

    with scheduler_context({"scheduler": "processes", "workers": 1}) as info:
        first = compute(info, dask.delayed(os.getpid)())[0]
        second = compute(info, dask.delayed(os.getpid)())[0]
    assert first == second != os.getpid()  # same worker process both times, not this one


def test_existing_scheduler_address():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=1, processes=False, protocol="tcp://", dashboard_address=None) as cluster:
        with scheduler_context({"scheduler": "threads"}, override=cluster.scheduler_address) as info:
            assert info.distributed and info.name == cluster.scheduler_address
            assert compute(info, da.arange(10, chunks=3).sum())[0] == 45
        assert info.client.status == "closed"


def test_an_active_client_is_used_unless_the_pipeline_names_a_scheduler():
    distributed = pytest.importorskip("distributed")
    from tileseg.config.schema import ExecutionConfig

    with distributed.LocalCluster(n_workers=1, processes=False, dashboard_address=None) as cluster:
        with distributed.Client(cluster) as client:
            for cfg in (None, {}, ExecutionConfig(workers=2)):  # the threads default does not override it
                with scheduler_context(cfg) as info:
                    assert info.name == "client" and info.client is client and not info.owned
                    assert compute(info, da.arange(10, chunks=3).sum())[0] == 45
            for cfg, name in (({"scheduler": "threads"}, "threads"),
                              (ExecutionConfig(scheduler="synchronous"), "synchronous")):
                with scheduler_context(cfg) as info:  # a scheduler the pipeline names wins
                    assert info.name == name and info.client is None
                    assert dask.config.get("scheduler") is {"threads": dask.threaded.get,
                                                            "synchronous": dask.local.get_sync}[name]
                    assert compute(info, da.arange(10, chunks=3).sum())[0] == 45
            with scheduler_context({"scheduler": "threads"}, client=client) as info:  # client= wins
                assert info.client is client
            assert client.status == "running"  # never closed by tileseg
    with scheduler_context(None) as info:  # no client any more: threads
        assert info.name == "threads" and info.client is None


def test_retries_are_passed_to_dask(tmp_path):
    distributed = pytest.importorskip("distributed")
    marks = str(tmp_path)

    def flaky(block, block_info=None):
        mark = os.path.join(marks, str(block_info[0]["chunk-location"][0]))
        if not os.path.exists(mark):  # every block raises once: a transient error
            open(mark, "w").close()
            raise OSError(f"transient failure in {mark}")
        return block + 1

    def failures() -> set[str]:
        return set(os.listdir(marks))

    with distributed.LocalCluster(n_workers=1, processes=False, dashboard_address=None) as cluster:
        with distributed.Client(cluster) as client:
            x = da.zeros(8, chunks=2).map_blocks(flaky, dtype=float)
            with scheduler_context({"retries": 0}, client=client) as info:
                with pytest.raises(OSError, match="transient failure"):
                    compute(info, x.sum())
            for f in failures():
                os.remove(os.path.join(marks, f))
            with scheduler_context({"retries": 1}, client=client) as info:
                assert info.describe()["retries"] == 1
                assert compute(info, x.sum())[0] == 8 and failures() == {"0", "1", "2", "3"}


def test_cancel_stops_local_work_and_says_interrupted():
    from tileseg.errors import RunInterrupted

    with scheduler_context({"scheduler": "threads", "workers": 1}) as info:
        info.cancel("SIGTERM")
        with pytest.raises(RunInterrupted, match="SIGTERM"):
            compute(info, da.ones(4, chunks=2).sum())


def test_scheduler_client_means_the_active_client(caplog):
    """``execution.scheduler: client`` runs on the caller's active client; a named scheduler that bypasses
    an active client says so; without any client, ``client`` falls back to threads with a warning."""
    distributed = pytest.importorskip("distributed")
    from tileseg.execution import scheduler_context

    with caplog.at_level("WARNING", logger="tileseg"):
        with scheduler_context({"scheduler": "client"}) as info:
            assert info.name == "threads" and info.client is None
    assert "no distributed client is active" in caplog.text
    with distributed.LocalCluster(n_workers=1, processes=False, dashboard_address=":0") as cluster, \
            distributed.Client(cluster) as client:
        with scheduler_context({"scheduler": "client"}) as info:
            assert info.client is client
        caplog.clear()
        with caplog.at_level("WARNING", logger="tileseg"):
            with scheduler_context({"scheduler": "threads"}) as info:
                assert info.client is None
        assert "a Dask client is active" in caplog.text
