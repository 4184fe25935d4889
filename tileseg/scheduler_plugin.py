"""The scheduler plugin that places inference tasks (imports ``distributed``; see :mod:`tileseg.placement`)."""

from __future__ import annotations

import logging
import time
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin

from .placement import PLUGIN_NAME, offering_workers, task_resources

log = logging.getLogger(__name__)


class ModelPlacement(SchedulerPlugin):
    """Give every new task that depends on a model key the resource restriction that key carries.

    Runs in the scheduler's ``update_graph``, after the graph (optimised and
    fused however the client chose) became task states and before any of them
    is assigned to a worker. A restriction already set (e.g. by the user's own
    annotations) is left alone.

    Every ``check_s`` seconds it also fails, with a
    :class:`~tileseg.errors.PlacementError`, the inference tasks that have
    been ready but unrunnable for ``grace_s`` seconds because no worker
    offers their resources any more (the workers left), instead of letting
    the computation wait forever.

    Parameters
    ----------
    grace_s : float
        How long a ready inference task may wait for a worker offering its resources.
    check_s : float
        Seconds between checks.
    """

    name = PLUGIN_NAME
    idempotent = True

    def __init__(self, grace_s: float = 10.0, check_s: float = 1.0) -> None:
        self.grace_s, self.check_s = float(grace_s), float(check_s)
        self._callback: Any = None

    def update_graph(self, scheduler: Any, *, tasks: Any = (), **kwargs: Any) -> None:
        restricted = 0
        for key in tasks:
            ts = scheduler.tasks.get(key)
            if ts is None or ts.run_spec is None or ts.resource_restrictions:
                continue
            needed = task_resources(dts.key for dts in ts.dependencies)
            if needed:
                ts.resource_restrictions = needed
                ts.annotations = {**(ts.annotations or {}), "resources": needed}
                restricted += 1
        if restricted:
            log.debug("tileseg: %d inference tasks restricted to workers offering their resources", restricted)

    def start(self, scheduler: Any) -> None:
        from tornado.ioloop import PeriodicCallback

        self._callback = PeriodicCallback(lambda: self.fail_unplaceable(scheduler), self.check_s * 1000)
        self._callback.start()

    async def close(self) -> None:
        if self._callback is not None:
            self._callback.stop()
            self._callback = None

    def fail_unplaceable(self, scheduler: Any) -> list[Any]:
        """Fail the inference tasks waiting longer than ``grace_s`` for resources no worker offers; their keys."""
        from distributed.protocol.pickle import dumps

        from .errors import PlacementError
        from .placement import describe_workers

        now = time.monotonic()
        workers = {ws.address: {"resources": dict(ws.resources or {})} for ws in scheduler.workers.values()}
        stuck = []
        for ts, since in list(getattr(scheduler, "unrunnable", {}).items()):
            needed = task_resources(dts.key for dts in ts.dependencies)
            if needed and now - since >= self.grace_s and not offering_workers(workers, needed):
                stuck.append((ts, needed))
        failed = []
        for ts, needed in stuck:
            if ts.state != "no-worker":
                continue
            exc = PlacementError(f"model inference needs {needed!r} but no worker of the cluster offers it any more "
                                 f"(waited {self.grace_s:g} s; workers: {describe_workers(workers)})")
            stimulus_id = f"tileseg-placement-{time.time()}"
            recs = scheduler.transition(ts.key, "erred", exception=dumps(exc), cause=ts.key, stimulus_id=stimulus_id)
            scheduler.transitions(recs, stimulus_id=stimulus_id)
            failed.append(ts.key)
        if failed:
            log.error("tileseg: %d inference tasks failed: no worker offers their resources", len(failed))
        return failed
