"""The reduction's device memory overhead stays under 10% of a stage's weights (GPT-J-6B shapes).

Measured without a GPU: the reduction runs on meta tensors under a dispatch mode that adds up
every freshly allocated (non-view) output and subtracts it when Python frees it.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from accelerate import init_empty_weights
from torch.utils._python_dispatch import TorchDispatchMode

from cluster.partition import partition_layers
from neuroscan.config import Selection
from workers.embedded import preset_config
from workers.reduce import reduce_layer
from workers.shard import ShardSpec, StageModel


class PeakBytes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def _free(self, n: int) -> None:
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not any(r.alias_info is not None for r in func._schema.returns):  # views allocate nothing
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    n = t.numel() * t.element_size()
                    self.live += n
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(t, self._free, n)
        return out


def reduction_peak(batch: int, pos: int, d_mlp: int, sel: Selection) -> int:
    act = torch.empty(batch, pos, d_mlp, dtype=torch.float16, device="meta")  # [batch, pos, d_mlp]
    n_tokens = torch.full((batch,), pos, device="meta")
    with PeakBytes() as tracker:
        reduce_layer(act, n_tokens, sel)
    return tracker.peak


def test_tracker_counts_a_temporary():
    with PeakBytes() as tracker:
        x = torch.empty(1024, device="meta", dtype=torch.float32)
        y = x * 2  # 4 KiB
        del y
        x.view(32, 32)  # a view: nothing
    assert tracker.peak == 2 * 4096 and tracker.live == 4096


@pytest.mark.parametrize("stages", [1, 2])
@pytest.mark.parametrize("cap", [500, 0])
def test_reduction_overhead_under_a_tenth_of_stage_weights(stages, cap):
    config = preset_config("gptj-6b")
    peak = reduction_peak(32, 256, config.n_inner or 4 * config.n_embd, Selection(max_per_layer=cap))
    for start, stop in partition_layers(config.n_layer, stages):
        with init_empty_weights():
            stage = StageModel(config, ShardSpec(start, stop, config.n_layer))
        weights = sum(p.numel() for p in stage.parameters()) * 2  # fp16
        assert peak < 0.10 * weights, (stages, start, stop, peak / 2**20, weights / 2**20)
