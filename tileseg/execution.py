"""Which Dask scheduler runs a pipeline, as one context manager.

``execution.scheduler`` in a pipeline (or ``--scheduler`` on the CLI) picks:

``threads`` (default)
    dask's threaded scheduler with ``workers`` threads.
``processes``
    dask's multiprocessing scheduler with ``workers`` processes, one pool
    kept for the whole run (the model is loaded once per process).
``synchronous``
    everything in the calling thread (debugging, profiling).
``local``
    a ``distributed.LocalCluster`` of ``workers`` processes with
    ``threads_per_worker`` threads each, every worker declaring
    ``resources`` (e.g. ``{GPU: 1}``); closed when the run ends.
``tcp://host:port`` / ``tls://host:port``
    an existing distributed scheduler; its workers declare their own
    resources (``dask worker ... --resources GPU=1``).

The last two need the ``distributed`` extra (``pip install 'tileseg[distributed]'``).

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
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .allocator import limit_arenas
from .errors import ConfigError

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
        The client for ``local`` and addresses.
    """

    name: str
    workers: int | None = None
    resources: dict[str, float] = field(default_factory=dict)
    client: Any = None

    @property
    def distributed(self) -> bool:
        """Whether a distributed client runs the graph."""
        return self.client is not None

    def describe(self) -> dict[str, Any]:
        """Short description for run reports."""
        out: dict[str, Any] = {"scheduler": self.name, "workers": self.workers}
        if self.client is not None:
            try:
                out["dashboard"] = self.client.dashboard_link
                out["n_workers"] = len(self.client.scheduler_info().get("workers", {}))
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


@contextlib.contextmanager
def scheduler_context(execution_cfg: Any = None, override: str | None = None) -> Iterator[SchedulerInfo]:
    """Set up the Dask scheduler for the duration of a ``with`` block.

    Parameters
    ----------
    execution_cfg : ExecutionConfig or dict, optional
        ``scheduler``, ``workers``, ``threads_per_worker``, ``resources``.
    override : str, optional
        A scheduler name or address that replaces ``execution_cfg.scheduler``
        (the CLI's ``--scheduler``).

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

    name = override or _get(execution_cfg, "scheduler", "threads")
    try:
        check_scheduler(name)
    except ValueError as exc:
        raise ConfigError(f"execution.scheduler: {exc}") from None
    workers = _get(execution_cfg, "workers", None)
    threads = _get(execution_cfg, "threads_per_worker", 1)
    resources = dict(_get(execution_cfg, "resources", None) or {})
    arenas = _get(execution_cfg, "malloc_arenas", None)
    if arenas and name in ("threads", "synchronous"):
        limit_arenas(int(arenas))

    if name in ("threads", "processes", "synchronous"):
        if resources:
            log.debug("execution.resources %r ignored by the %s scheduler", resources, name)
        settings: dict[str, Any] = {"scheduler": name}
        if workers is not None and name != "synchronous":
            settings["num_workers"] = workers
        pool = _process_pool(workers, arenas) if name == "processes" else None
        if pool is not None:
            settings["pool"] = pool
        try:
            with dask.config.set(settings):
                yield SchedulerInfo(name=name, workers=workers)
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        return

    distributed = _require_distributed()
    if name == "local":
        cluster = _local_cluster(distributed, workers, threads, resources, arenas)
        try:
            with distributed.Client(cluster, set_as_default=True) as client:
                info = SchedulerInfo(name=name, workers=workers, resources=resources, client=client)
                _prepare_placement(info)
                yield info
        finally:
            cluster.close()
        return

    try:
        client = distributed.Client(name, set_as_default=True)  # timeout: distributed.comm.timeouts.connect
    except (OSError, TimeoutError) as exc:
        raise ConfigError(f"execution.scheduler: cannot connect to {name!r}: {exc}") from exc
    with client:
        info = SchedulerInfo(name=name, workers=workers, resources=resources, client=client)
        _prepare_placement(info)
        yield info


def _local_cluster(distributed: Any, workers: int | None, threads: int, resources: dict[str, float],
                   arenas: int | None) -> Any:
    """``scheduler: local``: one worker per GPU when there are GPUs to use, else a LocalCluster."""
    import dask

    from . import placement

    spawn_env = {"distributed.nanny.pre-spawn-environ.MALLOC_ARENA_MAX": int(arenas)} if arenas else {}
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
            dashboard_address=None,
            silence_logs=logging.WARNING,
        )


def _prepare_placement(info: SchedulerInfo) -> None:
    """Distributed with resources: check that a worker offers them, and install the placement plugin."""
    if info.client is not None and info.resources:
        from . import placement

        placement.prepare(info.resources, client=info.client)


def _process_pool(workers: int | None, arenas: int | None = None) -> Any:
    """One process pool for the whole run, so worker processes (and the model
    each one caches) are reused by every item instead of respawned per compute."""
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor

    import dask

    context = multiprocessing.get_context(dask.config.get("multiprocessing.context", "spawn"))
    return ProcessPoolExecutor(max_workers=workers or os.cpu_count() or 1, mp_context=context,
                               initializer=_init_worker_process, initargs=(arenas,))


def _init_worker_process(arenas: int | None) -> None:
    from dask.multiprocessing import initialize_worker_process

    if arenas:
        limit_arenas(int(arenas))
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
    import dask

    if info is not None and info.client is not None:
        if info.resources:
            from .placement import check_workers

            check_workers(info.client, info.resources)
        futures = info.client.compute(list(collections))
        if progress:
            _require_distributed().progress(futures)
        return tuple(info.client.gather(futures))
    if progress:
        from dask.diagnostics import ProgressBar

        with ProgressBar(minimum=0.5):
            return dask.compute(*collections)
    return dask.compute(*collections)
