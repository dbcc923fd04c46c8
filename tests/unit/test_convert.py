"""aggregator.convert: stage rows into the Arrow tables' record batches."""

from __future__ import annotations

import numpy as np

from aggregator.convert import packed_bands


def test_packed_bands_cuts_each_row_to_its_prompt():
    bands = np.arange(12, dtype=np.uint8).reshape(3, 4)
    arr = packed_bands(bands, np.array([16, 1, 5]))
    assert arr.to_pylist() == [bytes([0, 1, 2, 3]), bytes([4]), bytes([8, 9])]
