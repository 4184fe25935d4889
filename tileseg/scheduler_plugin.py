"""The scheduler plugin that places inference tasks (imports ``distributed``; see :mod:`tileseg.placement`)."""

from __future__ import annotations

import logging
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin

from .placement import PLUGIN_NAME, task_resources

log = logging.getLogger(__name__)


class ModelPlacement(SchedulerPlugin):
    """Give every new task that depends on a model key the resource restriction that key carries.

    Runs in the scheduler's ``update_graph``, after the graph (optimised and
    fused however the client chose) became task states and before any of them
    is assigned to a worker. A restriction already set (e.g. by the user's own
    annotations) is left alone.
    """

    name = PLUGIN_NAME
    idempotent = True

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
