"""Which Dask scheduler runs a pipeline, as one context manager.

``execution.scheduler`` in a pipeline (or ``--scheduler`` on the CLI) picks:

(not set)
    the active ``distributed.Client`` when the caller has one (``with
    Client(...)`` or ``get_client()``), else ``threads``. A client passed as
    ``client=`` wins over ``execution.scheduler`` (only an ``override``, the
    CLI's ``--scheduler``, wins over it). tileseg then creates no scheduler
    and closes nothing.
``threads`` (default)
    dask's threaded scheduler with ``workers`` threads (one pool shared by
    all items in flight).
``processes``
    dask's multiprocessing scheduler with ``workers`` processes, one pool
    kept for the whole run (the model is loaded once per process).
``synchronous``
    everything in the calling thread (debugging, profiling).
``local``
    a ``distributed.LocalCluster`` of ``workers`` processes with
    ``threads_per_worker`` threads and ``memory_limit`` each, every worker
    declaring ``resources`` (e.g. ``{GPU: 1}``); closed when the run ends.
``tcp://host:port`` / ``tls://host:port``
    an existing distributed scheduler; its workers declare their own
    resources (``dask worker ... --resources GPU=1``).

The last two need the ``distributed`` extra (``pip install 'tileseg[distributed]'``).
On a distributed scheduler, ``retries`` is passed to ``Client.compute``: a
task that raised is run again that many times (a worker that dies is
handled by the scheduler itself). :meth:`SchedulerInfo.cancel` stops the
work of every item in flight (an interrupted run).

GPU tasks: with ``resources`` on a distributed scheduler, model inference
tasks run only on workers that offer them, whatever graph optimisation does
(see :mod:`tileseg.placement`), while reading, writing and post-processing
tasks are scheduled freely. The run fails early with a
:class:`~tileseg.errors.PlacementError` when no worker offers the resources,
before anything is submitted, and fails the inference tasks when such
workers leave during a run (see :class:`~tileseg.scheduler_plugin.ModelPlacement`).

``local`` with GPUs: when this process sees CUDA devices and ``resources``
names ``GPU`` (or neither ``resources`` nor ``workers`` is set), the cluster
has one worker process per visible device, each pinned to it with
``CUDA_VISIBLE_DEVICES`` and declaring ``GPU: 1`` (dask-cuda's
``LocalCUDACluster`` when installed).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .allocator import limit_arenas, pin_mmap_threshold
from .errors import ConfigError, RunInterrupted

log = logging.getLogger(__name__)


@dataclass
class SchedulerInfo:
    """The scheduler a run uses.

    Attributes
    ----------
    name : str
        ``threads``, ``processes``, ``synchronous``, ``local`` or an address.
    workers : int or None
        Number of workers requested (``None``: dask's default).
    resources : dict
        Resources model inference needs (distributed only; see :mod:`tileseg.placement`).
    client : distributed.Client or None
        The client for ``local``, addresses and the caller's own client.
    retries : int
        Task retries on a distributed scheduler.
    owned : bool
        Whether tileseg created the client (``False``: the caller's).
    """

    name: str
    workers: int | None = None
    resources: dict[str, float] = field(default_factory=dict)
    client: Any = None
    retries: int = 0
    owned: bool = True
    pool: Any = None
    _futures: set[Any] = field(default_factory=set, repr=False)
    _lock: Any = field(default_factory=threading.Lock, repr=False)
    cancelled: bool = False
    cancel_reason: str = "the run was interrupted"

    def cancel(self, reason: Any = None) -> None:
        """Stop the work of every item in flight: running computations raise, new ones refuse to start.

        Distributed: the futures tileseg submitted are cancelled (never the
        caller's other work). Local pools stop taking tasks.
        """
        if reason is not None:
            self.cancel_reason = f"the run was interrupted ({reason or 'Ctrl-C'})"
        self.cancelled = True
        with self._lock:
            futures = list(self._futures)
        if self.client is not None and futures:
            try:
                self.client.cancel(futures)
            except Exception as exc:  # pragma: no cover - a scheduler that went away
                log.debug("cancel failed: %s", exc)
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)

    @property
    def distributed(self) -> bool:
        """Whether a distributed client runs the graph."""
        return self.client is not None

    def describe(self) -> dict[str, Any]:
        """Short description for run reports."""
        out: dict[str, Any] = {"scheduler": self.name, "workers": self.workers}
        if self.retries:
            out["retries"] = self.retries
        if self.client is not None:
            try:
                out["dashboard"] = self.client.dashboard_link
                workers = self.client.scheduler_info().get("workers", {})
                out["n_workers"] = len(workers)
                limits = {w.get("memory_limit") for w in workers.values()}
                if len(limits) == 1:
                    out["memory_limit"] = limits.pop()
            except Exception:  # pragma: no cover - a scheduler that went away
                pass
        if self.resources:
            out["resources"] = dict(self.resources)
        return out


def _get(cfg: Any, key: str, default: Any) -> Any:
    if cfg is None:
        return default
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def active_client() -> Any:
    """The caller's active ``distributed.Client`` (``with Client()``, ``set_as_default``), or ``None``.

    Never imports ``distributed`` (a program that did not import it has no client).
    """
    if "distributed" not in sys.modules or sys.modules["distributed"] is None:
        return None
    try:
        from distributed import default_client

        client = default_client()
    except (ValueError, ImportError):
        return None
    return client if getattr(client, "status", None) == "running" else None


def _explicit(cfg: Any, key: str) -> bool:
    if cfg is None:
        return False
    if isinstance(cfg, dict):
        return key in cfg
    return key in getattr(cfg, "model_fields_set", set())


@contextlib.contextmanager
def scheduler_context(execution_cfg: Any = None, override: str | None = None,
                      client: Any = None) -> Iterator[SchedulerInfo]:
    """Set up the Dask scheduler for the duration of a ``with`` block.

    Parameters
    ----------
    execution_cfg : ExecutionConfig or dict, optional
        ``scheduler``, ``workers``, ``threads_per_worker``, ``memory_limit``,
        ``resources``, ``retries``.
    override : str, optional
        A scheduler name or address that replaces ``execution_cfg.scheduler``
        (the CLI's ``--scheduler``).
    client : distributed.Client, optional
        Run on this client (created by the caller, left open). Without
        ``override`` or an ``execution.scheduler`` written in the pipeline,
        the caller's active client is used the same way.

    Yields
    ------
    SchedulerInfo
        What runs the graph; ``info.client`` is the distributed client if any.

    Raises
    ------
    ConfigError
        If the scheduler name is invalid or the address cannot be reached.
    MissingDependencyError
        If ``local`` or an address is asked for without ``distributed``.

    Examples
    --------
    >>> import dask.array as da
    >>> with scheduler_context({"scheduler": "threads", "workers": 2}) as info:
    ...     int(da.ones(10, chunks=5).sum().compute())
    10
    """
    import dask

    from .config.schema import check_scheduler

    workers = _get(execution_cfg, "workers", None)
    threads = _get(execution_cfg, "threads_per_worker", 1)
    resources = dict(_get(execution_cfg, "resources", None) or {})
    arenas = _get(execution_cfg, "malloc_arenas", None)
    mmap = _get(execution_cfg, "malloc_mmap_threshold", None)
    retries = int(_get(execution_cfg, "retries", 0) or 0)
    named = override or (_get(execution_cfg, "scheduler", None) if _explicit(execution_cfg, "scheduler") else None)
    if client is None and (named is None or named == "client"):
        client = active_client()  # "client": the caller's active distributed client, else threads
        if client is None and named == "client":
            log.warning("execution.scheduler: client, but no distributed client is active: using threads")
            override = "threads"
    elif client is None and override is None and named is not None and active_client() is not None:
        log.warning("a Dask client is active but the pipeline names execution.scheduler: %s, which wins; "
                    "use --scheduler client or execution.scheduler: client to run on the active client", named)
    if override in (None, "client") and client is not None:
        log.info("running on the caller's Dask client %s", getattr(client, "dashboard_link", client))
        info = SchedulerInfo(name="client", workers=workers, resources=resources, client=client, retries=retries,
                             owned=False)
        _prepare_placement(info)
        yield info
        return

    name = override or _get(execution_cfg, "scheduler", "threads")
    try:
        check_scheduler(name)
    except ValueError as exc:
        raise ConfigError(f"execution.scheduler: {exc}") from None
    if arenas and name in ("threads", "synchronous"):
        limit_arenas(int(arenas))
    if mmap and name in ("threads", "synchronous"):
        pin_mmap_threshold(int(mmap), 4 * int(mmap))

    if name in ("threads", "processes", "synchronous"):
        if resources:
            log.debug("execution.resources %r ignored by the %s scheduler", resources, name)
        settings: dict[str, Any] = {"scheduler": _local_get(name)}
        if dask.config.get("array.rechunk.method", None) is None:  # what dask picks without a client, found
            settings["array.rechunk.method"] = "tasks"              # without importing distributed to look
        if workers is not None and name != "synchronous":
            settings["num_workers"] = workers
        pool = None
        if name == "processes":
            pool = _process_pool(workers, arenas, mmap)
        elif name == "threads":  # one pool for every item in flight (not one per driver thread)
            from concurrent.futures import ThreadPoolExecutor

            pool = ThreadPoolExecutor(max_workers=workers or _cpu_count(), thread_name_prefix="tileseg-dask")
        if pool is not None:
            settings["pool"] = pool
        try:
            with dask.config.set(settings):
                yield SchedulerInfo(name=name, workers=workers, pool=pool)
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        return

    distributed = _require_distributed()
    if name == "local":
        cluster = _local_cluster(distributed, workers, threads, resources, arenas,
                                 _get(execution_cfg, "memory_limit", None), mmap)
        try:
            with distributed.Client(cluster, set_as_default=True) as own:
                info = SchedulerInfo(name=name, workers=workers, resources=resources, client=own, retries=retries)
                _prepare_placement(info)
                yield info
        finally:
            cluster.close()
        return

    try:
        own = distributed.Client(name, set_as_default=True)  # timeout: distributed.comm.timeouts.connect
    except (OSError, TimeoutError) as exc:
        raise ConfigError(f"execution.scheduler: cannot connect to {name!r}: {exc}") from exc
    with own:
        info = SchedulerInfo(name=name, workers=workers, resources=resources, client=own, retries=retries)
        _prepare_placement(info)
        yield info


def _local_get(name: str) -> Any:
    """Dask's get function for a local scheduler name (the name itself for ``processes``).

    Dask resolves a scheduler given by name by importing :mod:`distributed`
    first, to look for a client (about 0.5 s, in the first item's set-up); the
    function itself needs no look-up, and a client is never used inside this
    context anyway.
    """
    import dask.local
    import dask.threaded

    return {"threads": dask.threaded.get, "synchronous": dask.local.get_sync}.get(name, name)


def _local_cluster(distributed: Any, workers: int | None, threads: int, resources: dict[str, float],
                   arenas: int | None, memory_limit: Any = None, mmap: int | None = None) -> Any:
    """``scheduler: local``: one worker per GPU when there are GPUs to use, else a LocalCluster."""
    import dask

    from . import placement

    spawn_env = {f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in (
        (("MALLOC_ARENA_MAX", int(arenas)),) if arenas else ()) + (
        (("MALLOC_MMAP_THRESHOLD_", int(mmap)), ("MALLOC_TRIM_THRESHOLD_", 4 * int(mmap))) if mmap else ())}
    wants_gpus = "GPU" in resources or (not resources and workers is None)
    n_devices = placement.device_count() if wants_gpus else 0
    with dask.config.set(spawn_env):
        if n_devices:
            if workers is not None and workers != n_devices:
                log.info("execution.workers %d replaced by one worker per GPU (%d)", workers, n_devices)
            return placement.local_gpu_cluster(threads, resources, n_devices)
        return distributed.LocalCluster(
            n_workers=workers,
            threads_per_worker=threads,
            processes=True,
            resources=resources or None,
            memory_limit="auto" if memory_limit is None else memory_limit,
            dashboard_address=None,
            silence_logs=logging.WARNING,
        )


def _prepare_placement(info: SchedulerInfo) -> None:
    """Distributed with resources: check that a worker offers them, and install the placement plugin."""
    if info.client is not None and info.resources:
        from . import placement

        placement.prepare(info.resources, client=info.client)


def _cpu_count() -> int:
    import os

    return os.cpu_count() or 1


def _process_pool(workers: int | None, arenas: int | None = None, mmap: int | None = None) -> Any:
    """One process pool for the whole run, so worker processes (and the model
    each one caches) are reused by every item instead of respawned per compute."""
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor

    import dask

    context = multiprocessing.get_context(dask.config.get("multiprocessing.context", "spawn"))
    return ProcessPoolExecutor(max_workers=workers or os.cpu_count() or 1, mp_context=context,
                               initializer=_init_worker_process, initargs=(arenas, mmap))


def _init_worker_process(arenas: int | None, mmap: int | None = None) -> None:
    from dask.multiprocessing import initialize_worker_process

    if arenas:
        limit_arenas(int(arenas))
    if mmap:
        pin_mmap_threshold(int(mmap), 4 * int(mmap))
    initialize_worker_process()


def _require_distributed() -> Any:
    from .errors import require

    return require("distributed", "distributed")


def compute(info: SchedulerInfo | None, *collections: Any, progress: bool = False) -> tuple[Any, ...]:
    """Compute dask collections on the active scheduler, with an optional progress bar.

    Parameters
    ----------
    info : SchedulerInfo or None
        From :func:`scheduler_context`; ``None`` uses dask's current default.
    *collections
        Dask arrays/delayed objects.
    progress : bool
        Show ``dask.diagnostics.ProgressBar`` (local schedulers) or
        ``distributed.progress`` (distributed) on the terminal.

    Returns
    -------
    tuple
        One result per collection.
    """
    from .gcpause import frozen

    if info is not None and info.cancelled:
        raise RunInterrupted(info.cancel_reason)

    with frozen():  # the built graph is not walked by every garbage collection while it is scheduled
        return _compute(info, collections, progress)


def _compute(info: SchedulerInfo | None, collections: tuple[Any, ...], progress: bool) -> tuple[Any, ...]:
    import dask

    if info is not None and info.client is not None:
        if info.resources:
            from .placement import check_workers

            check_workers(info.client, info.resources)
        futures = info.client.compute(list(collections), retries=info.retries or None)
        with info._lock:
            info._futures.update(futures)
        try:
            if progress:
                _require_distributed().progress(futures)
            return tuple(info.client.gather(futures))
        except BaseException:
            try:
                info.client.cancel(futures)  # a failed item stops its leftover tasks, not the others'
            except Exception:  # pragma: no cover - a scheduler that went away
                pass
            if info.cancelled:
                raise RunInterrupted(info.cancel_reason) from None
            raise
        finally:
            with info._lock:
                info._futures.difference_update(futures)
    try:
        if progress:
            from dask.diagnostics import ProgressBar

            with ProgressBar(minimum=0.5):
                return dask.compute(*collections)
        return dask.compute(*collections)
    except BaseException:
        if info is not None and info.cancelled:  # the shared pool was shut down under us
            raise RunInterrupted(info.cancel_reason) from None
        raise
