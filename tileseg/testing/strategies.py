"""Hypothesis strategies for chunking-invariance tests (needs ``hypothesis``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from hypothesis import strategies as st


@st.composite
def chunkings(draw, shape: Sequence[int], max_cuts: int = 3) -> tuple[tuple[int, ...], ...]:
    """Irregular dask chunk sizes for ``shape``: up to ``max_cuts`` cuts per axis, anywhere.

    Examples
    --------
    >>> chunks = chunkings((10, 7)).example()
    >>> [sum(c) for c in chunks]
    [10, 7]
    """
    out = []
    for s in shape:
        cuts = draw(st.lists(st.integers(1, s - 1), max_size=max_cuts, unique=True)) if s > 1 else []
        out.append(tuple(int(v) for v in np.diff([0, *sorted(cuts), s])))
    return tuple(out)
