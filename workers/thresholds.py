"""The thresholds both reductions compare against (`workers.reduce` eager, `workers.fused`
Triton), exact in the activations' dtype, and the rank of an unselected neuron: a leaf, so
that the two reductions share them without importing each other."""

from __future__ import annotations

import functools
import struct

import numpy as np
import torch

from neuroscan.config import Selection

UNSELECTED = -0x7F800000 - 1
"""The rank of an unselected neuron (the int32 of -inf's float bits, ordered as `workers.reduce.rank_scores`
orders them); every selected neuron, red or blue, ranks above it."""


def threshold(value: float, dtype: torch.dtype, side: str) -> float:
    """The ``dtype`` value that makes a comparison in ``dtype`` exact for the real threshold.

    ``x > value`` for every ``x`` of ``dtype`` is ``x > threshold(value, dtype, "above")`` (the
    largest ``dtype`` value <= ``value``); ``x < value`` is ``x < threshold(value, dtype, "below")``
    (the smallest >= ``value``). Both paths (eager and fused) compare against these, so a
    threshold that ``dtype`` cannot hold (3.1 in float16) means the same thing everywhere.
    Pure Python: no tensor op, so nothing here can wait on a device.
    """
    down = side == "above"
    if dtype == torch.float64:
        return float(value)
    if dtype == torch.bfloat16:  # float32 with the low 16 bits zero
        f = threshold(value, torch.float32, side)
        bits = struct.unpack("<I", struct.pack("<f", f))[0] & 0xFFFF0000
        toward_zero = struct.unpack("<f", struct.pack("<I", bits))[0]
        if toward_zero == f:
            return toward_zero
        away = struct.unpack("<f", struct.pack("<I", bits + 0x10000))[0]
        lower, upper = sorted((toward_zero, away))
        return lower if down else upper
    kind = {torch.float16: np.float16, torch.float32: np.float32}[dtype]
    t = kind(value)
    if (down and float(t) > value) or (not down and float(t) < value):
        t = np.nextafter(t, kind(-np.inf if down else np.inf))
    return float(t)


@functools.cache
def thresholds(sel: Selection, dtype: torch.dtype) -> tuple[float, float, float]:
    """(high, low, red) for comparisons in ``dtype``; see `threshold`. Cached: every layer asks."""
    return threshold(sel.high, dtype, "above"), threshold(sel.low, dtype, "below"), threshold(sel.red, dtype, "above")
