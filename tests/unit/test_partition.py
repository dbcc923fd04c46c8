"""cluster.partition: the layers of each stage."""

from __future__ import annotations

import pytest

from cluster.partition import partition_layers
from neuroscan.errors import UserError


@pytest.mark.parametrize("n, s", [(28, 1), (28, 2), (28, 3), (28, 8), (28, 28), (5, 3), (1, 1)])
def test_partition_covers_every_layer_once_evenly(n, s):
    bounds = partition_layers(n, s)
    assert len(bounds) == s
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    sizes = [stop - start for start, stop in bounds]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    assert sizes == sorted(sizes, reverse=True)  # the last stage, which has lm_head, is never larger


def test_partition_28_by_3():
    assert partition_layers(28, 3) == [(0, 10), (10, 19), (19, 28)]


@pytest.mark.parametrize("s", [0, 29, -1])
def test_partition_refuses_impossible_stage_counts(s):
    with pytest.raises(UserError, match="--stages"):
        partition_layers(28, s)
