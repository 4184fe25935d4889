"""Drive many items at once: a pool of item drivers that stops cleanly when the run is interrupted.

Each driver thread takes the next item and runs it to the end (open, build
the graph, compute on the shared scheduler, finalize). Up to
``max_items_in_flight`` items are in flight, so graph building, statistics
and writes of different items overlap while the scheduler (threads, a local
cluster or the user's) executes their tasks. One failing item never stops
the others: the item function records its own failure.

The calling thread only waits, so Ctrl-C (and a SIGTERM handler raising
:class:`~tileseg.errors.RunInterrupted`) reach it promptly: it then calls
``on_interrupt`` (which cancels the scheduler's work), lets the drivers
finish their clean-up and re-raises.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

log = logging.getLogger(__name__)

#: How long the waiting thread sleeps between checks (keeps Ctrl-C responsive).
POLL_S = 0.2
#: How long drivers get to clean up after an interruption.
CLEANUP_S = 120.0


def run_items(indices: Iterable[int], fn: Callable[[int, threading.Event], None], *, max_in_flight: int,
              on_interrupt: Callable[[BaseException], None]) -> None:
    """Run ``fn(index, stop)`` for every index with at most ``max_in_flight`` at a time.

    Parameters
    ----------
    indices : iterable of int
        Items, in the order they start.
    fn : callable
        Processes one item and records its result; must not raise for an
        item's own failure. ``stop`` is set once the run is interrupted (an
        item not yet started should return at once).
    max_in_flight : int
        Driver threads.
    on_interrupt : callable
        Called once with the interruption when the waiting thread is
        interrupted, before waiting for the drivers.

    Raises
    ------
    KeyboardInterrupt
        (or :class:`~tileseg.errors.RunInterrupted`) re-raised after the
        drivers finished their clean-up.
    Exception
        The first unexpected error of ``fn`` (a bug), after the others finished.
    """
    stop = threading.Event()
    pool = ThreadPoolExecutor(max_workers=max(1, int(max_in_flight)), thread_name_prefix="tileseg-item")
    pending: set[Future[None]] = set()
    try:
        for index in indices:
            pending.add(pool.submit(fn, index, stop))
        errors: list[BaseException] = []
        while pending:
            done, pending = wait(pending, timeout=POLL_S, return_when=FIRST_COMPLETED)
            errors += [f.exception() for f in done if f.exception() is not None]  # type: ignore[misc]
        if errors:
            raise errors[0]
    except BaseException as exc:
        if not isinstance(exc, KeyboardInterrupt):
            raise
        stop.set()
        log.warning("run interrupted (%s): stopping the items in flight", type(exc).__name__)
        try:
            on_interrupt(exc)
        finally:
            for f in pending:
                f.cancel()
            wait(pending, timeout=CLEANUP_S)
        raise
    finally:
        pool.shutdown(wait=not stop.is_set(), cancel_futures=True)
