"""Whole-image passes computed while a graph is built: what kind they are, for reports and progress.

Some steps need something of the whole image before their lazy graph can be
built. Two kinds:

``statistics``
    a reduction of the whole image: the histogram of a global threshold, the
    means and deviations of a z-score, which patches hold valid pixels. Set-up:
    the result is computed afterwards.
``components``
    the first pass of a connected-components step
    (:func:`tileseg.stitching.labels.components`): it computes the upstream
    steps chunk by chunk once and keeps every chunk's labels; the second pass
    (writing) only relabels them. Part of computing the result, not set-up.

Library code wraps such a compute in :func:`whole_image_pass`; a compute
that is not wrapped counts as ``statistics``. Whoever runs the build (the
runner, :mod:`tileseg.runner`) reads :func:`current_pass` from the thread
that started the compute, to time each kind and show its progress.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

#: The kinds of whole-image passes.
KINDS = ("statistics", "components")

_local = threading.local()


@contextmanager
def whole_image_pass(kind: str, what: str = "") -> Iterator[None]:
    """Mark the Dask computes made inside the block, in this thread, as a pass of ``kind``.

    Parameters
    ----------
    kind : {"statistics", "components"}
        See the module docstring.
    what : str
        A short description for logs (e.g. ``"connected components"``).

    Examples
    --------
    >>> with whole_image_pass("components", "labels"):
    ...     current_pass()
    ('components', 'labels')
    >>> current_pass() is None
    True
    """
    if kind not in KINDS:
        raise ValueError(f"pass kind must be one of {KINDS}, got {kind!r}")
    outer = getattr(_local, "current", None)
    _local.current = (kind, what)
    try:
        yield
    finally:
        _local.current = outer


def current_pass() -> tuple[str, str] | None:
    """``(kind, what)`` of the pass this thread is in, or None."""
    return getattr(_local, "current", None)


__all__ = ["KINDS", "current_pass", "whole_image_pass"]
