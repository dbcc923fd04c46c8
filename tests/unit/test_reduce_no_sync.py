"""No silent slow paths: the reduction never makes the host wait on the device per layer.

A host synchronisation is any op whose result the host must read: ``nonzero`` and boolean
indexing (output size depends on data), ``item``/``bool``/``tolist`` (``_local_scalar_dense``),
``masked_select``, ``unique``. On CPU nothing waits, but the same ops run on CUDA would, so
the ops are counted with a dispatch mode here, no GPU needed.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from neuroscan.config import Selection
from neuroscan.messages import MicroBatch
from tests.triton_cpu import needs_triton
from workers.checkpoint import load_config
from workers.reduce import reduce_layer
from workers.shard import ShardSpec
from workers.stage import Stage, StageSpec

SYNCING = {
    "nonzero",
    "_local_scalar_dense",
    "masked_select",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "boolean_index",
}


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("index", "index_put_", "index_put", "_index_put_impl_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or [])
        ):
            name = "boolean_index"  # a data-dependent size: nonzero under the hood
        self.ops[name] += 1
        return func(*args, **(kwargs or {}))

    def syncing(self) -> dict:
        return {op: n for op, n in self.ops.items() if op in SYNCING}


def test_the_counter_sees_syncing_ops():
    a = torch.randn(4, 5)
    with OpCounter() as counter:
        b = torch.zeros(4, 5)
        b[a > 0] = 1
        _ = a[a > 0]
        bool((a > 0).any())
    assert counter.syncing() == {"boolean_index": 2, "_local_scalar_dense": 1}


def test_reduce_layer_has_no_syncing_op():
    act = torch.randn(3, 10, 64) * 3
    for cap in (0, 5):
        with OpCounter() as counter:
            reduce_layer(act, torch.tensor([10, 4, 7]), Selection(max_per_layer=cap))
        assert counter.syncing() == {}, counter.syncing()


@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=needs_triton)])
def test_a_stage_syncs_once_per_micro_batch_whatever_its_layer_count(other_model, fused):
    """Eager, and fused (the statistics, the pick and the rows each one kernel, here under
    Triton's interpreter)."""
    import numpy as np

    config = load_config(other_model)
    batch = MicroBatch(
        0,
        np.arange(2),
        np.random.default_rng(0).integers(0, 256, (2, 12)).astype(np.int32),
        np.array([12, 5], np.int32),
        np.array([12, 5], np.int32),
        np.zeros((2, 0), np.int32),
    )
    counts = []
    for stop in (1, config.n_layer):
        stage = Stage(StageSpec(str(other_model), ShardSpec(0, stop, config.n_layer), "cpu", "float32"))
        stage.setup()
        stage.fused = fused
        with OpCounter() as counter:
            stage.forward(batch)
        counts.append(counter.syncing())
    assert counts[0] == counts[1] == {"nonzero": 1}, counts  # the one compaction of all layers' rows
