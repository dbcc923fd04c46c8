"""The one-pass Triton statistics against the eager reference, on the CPU under Triton's
interpreter (on a GPU the same comparisons run in tests/gpu/)."""

from __future__ import annotations

import pytest
import torch

from neuroscan.config import Selection
from tests.triton_cpu import needs_triton
from workers.reduce import (
    UNSELECTED,
    layer_stats,
    pick_neurons,
    rank_scores,
    reduce_layer,
)

pytestmark = needs_triton

STATS = ("max_act", "max_pos", "min_act", "min_pos", "n_above", "n_below", "n_red")


def fused_stats(act, n_tokens, sel):
    from workers.fused import layer_stats_fused

    return layer_stats_fused(act, n_tokens, sel)


def assert_same_stats(act, n_tokens, sel):
    eager, fused = layer_stats(act, n_tokens, sel), fused_stats(act, n_tokens, sel)
    for name in STATS:
        assert torch.equal(eager[name].to(fused[name].dtype), fused[name]), name
    # The kernel's ranks are bit for bit the eager ones.
    assert torch.equal(fused["rank"], rank_scores(eager["max_act"], eager["min_act"], sel, act.dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("b", "t", "n"), [(1, 1, 1), (3, 33, 130), (2, 70, 257), (4, 5, 128)])
def test_same_statistics_as_eager(dtype, b, t, n):
    gen = torch.Generator().manual_seed(b * 1000 + t * 10 + n)
    act = (torch.randn(b, t, n, generator=gen) * 2.5).to(dtype)  # [batch, pos, d_mlp]
    n_tokens = torch.randint(1, t + 1, (b,), generator=gen)
    n_tokens[0] = t
    for row in range(b):
        act[row, n_tokens[row] :] = 50.0  # padding must never be read into a statistic
    assert_same_stats(act, n_tokens, Selection(high=2.0, low=-0.5, red=3.0))


def test_ties_take_the_first_position_across_slices():
    # Values on a coarse grid, so the max and min repeat within and across 32-token slices.
    gen = torch.Generator().manual_seed(7)
    act = torch.randint(-2, 3, (2, 100, 140), generator=gen).float()
    assert_same_stats(act, torch.tensor([100, 65]), Selection(high=1.0, low=-1.0, red=1.5))


def test_thresholds_a_float16_cannot_hold_mean_the_same_on_both_paths():
    sel = Selection(high=3.1, low=-0.01, red=3.3)  # none of these is a float16 value
    values = torch.tensor([3.0996, 3.1016, -0.01, -0.0099, 3.3008, 3.2988], dtype=torch.float16)
    act = values.repeat(40, 1)[None]  # [1, 40, 6]
    assert_same_stats(act, torch.tensor([40]), sel)
    counts = layer_stats(act, torch.tensor([40]), sel)
    assert counts["n_above"][0].tolist() == [0, 40, 0, 0, 40, 40]  # 3.0996 < 3.1 < 3.1016
    assert counts["n_below"][0].tolist() == [0, 0, 40, 0, 0, 0]  # -0.01 in float16 is -0.010002


def test_a_strided_input_gives_the_same_statistics():
    act = torch.randn(3, 40, 300)[:, ::2, :]  # [batch, pos, d_mlp], pos stride 600
    assert_same_stats(act, torch.tensor([20, 3, 11]), Selection())


@pytest.mark.parametrize("cap", [0, 7])
def test_reduce_layer_rows_are_the_same_fused_or_eager(cap):
    gen = torch.Generator().manual_seed(cap)
    act = torch.randn(3, 37, 150, generator=gen) * 3  # [batch, pos, d_mlp]
    n_tokens = torch.tensor([37, 12, 1])
    sel = Selection(max_per_layer=cap)
    eager, fused = reduce_layer(act, n_tokens, sel), reduce_layer(act, n_tokens, sel, fused=True)
    assert eager.keys() == fused.keys()
    for name in eager:
        assert torch.equal(eager[name], fused[name]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("b", "t", "k"), [(2, 130, 45), (3, 7, 1), (1, 64, 33)])
def test_kept_rows_kernel_equals_the_gathers_and_band_packing(dtype, b, t, k):
    """Several byte blocks (t up to 130: 33 bytes), a partial slot block, repeated neurons,
    thresholds hit exactly, and a prompt shorter than the batch's width."""
    from workers.fused import kept_rows_fused
    from workers.reduce import kept_rows

    gen = torch.Generator().manual_seed(b * 100 + t + k)
    n = 90
    act = (torch.randint(-8, 16, (b, t, n), generator=gen) * 0.25).to(dtype)  # exact 0, 3 and 3.5 appear
    n_tokens = torch.randint(1, t + 1, (b,), generator=gen)
    n_tokens[0] = t
    idx = torch.randint(0, n, (b, k), generator=gen).sort(dim=1).values  # [batch, K], repeats allowed
    sel = Selection(high=3.0, low=0.0, red=3.5)
    stats = layer_stats(act, n_tokens, sel)
    eager, fused = kept_rows(act, idx, n_tokens, stats, sel), kept_rows_fused(act, idx, n_tokens, stats, sel)
    assert eager.keys() == fused.keys()
    for name in eager:
        assert eager[name].dtype == fused[name].dtype and torch.equal(eager[name], fused[name]), name


@pytest.mark.parametrize(("b", "n", "k"), [(3, 300, 7), (2, 300, 300), (4, 130, 1), (1, 16, 16), (2, 1000, 250)])
def test_pick_kernel_equals_the_eager_pick(b, n, k):
    """Ranks drawn from a few values (ties at the k-th rank, which take the lower indices),
    rows with fewer selected neurons than k, the extreme ranks, n not a power of two."""
    from workers.fused import pick_fused

    gen = torch.Generator().manual_seed(b * n + k)
    values = torch.tensor([UNSELECTED, -5, 0, 1, 2, 2**31 - 1, -(2**31)], dtype=torch.int32)
    rank = values[torch.randint(0, len(values), (b, n), generator=gen)]
    rank[0] = UNSELECTED  # nothing selected
    rank[-1, : n // 2] = UNSELECTED  # some selected, maybe fewer than k
    fused, eager = pick_fused(rank, k), pick_neurons(rank, k)
    assert torch.equal(fused[0], eager[0]) and torch.equal(fused[1], eager[1])
    assert fused[0][0].tolist() == [n] * k and fused[1][0] == 0


def test_a_scanning_stage_reduces_the_activations_its_blocks_use(other_model):
    """With the fused reduction, the rows are the eager reduction of the very activations the
    next matmul read; the blocks keep their own GELU, and the hooks are gone after."""
    from workers.checkpoint import load_config
    from workers.shard import ShardSpec, TanhGELU
    from workers.stage import Stage, StageSpec, reducing_hooks

    config = load_config(other_model)
    stage = Stage(StageSpec(str(other_model), ShardSpec(0, config.n_layer, config.n_layer), "cpu", "float32"))
    stage.setup()
    blocks = stage.model.blocks
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (2, 11), generator=gen)
    n_tokens = torch.tensor([11, 6])
    positions = torch.arange(11)[None, :].expand(2, 11)
    sel = Selection(high=0.5, red=1.0, max_per_layer=7)
    read: list[torch.Tensor] = []
    handles = [
        block.mlp.fc_out.register_forward_pre_hook(lambda m, args: read.append(args[0].clone())) for block in blocks
    ]
    sink: list = []
    with torch.inference_mode():
        plain = stage.model(ids, None, positions)
        read.clear()
        with reducing_hooks(stage.model, n_tokens, sel, sink, fused=True):
            scanned = stage.model(ids, None, positions)
    for handle in handles:
        handle.remove()
    assert all(type(block.mlp.act) is TanhGELU and not block.mlp.fc_out._forward_pre_hooks for block in blocks)
    assert len(sink) == len(read) == config.n_layer
    for layer, act in zip(sink, read):
        eager = reduce_layer(act, n_tokens, sel)
        for name, value in eager.items():
            assert torch.equal(value, layer[name]), name
    torch.testing.assert_close(scanned, plain, rtol=1e-4, atol=1e-4)
