"""The fused reduction on a real GPU (run with ``pytest -m gpu tests/gpu`` on a CUDA machine).

Same rows as the eager reference path on the same activations (exact sets, band codes and
statistics: both compare the same fp16 values against the same thresholds), no host
synchronisation in the reduction (CUDA's sync debug mode turns one into an error), and the
reduction's device-memory overhead under 10 % of a stage's weights at GPT-J-6B's shape.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neuroscan.config import Selection
from workers.reduce import layer_stats, pick_neurons, rank_scores, reduce_layer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

D_MLP = 16_384  # GPT-J-6B
D_MODEL = 4_096
N_LAYER = 28


def activations(b: int, t: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GELU outputs of random pre-activations (the real distribution: most just below 0, a tail above 3)."""
    gen = torch.Generator("cuda").manual_seed(seed)
    pre = torch.randn(b, t, D_MLP, device="cuda", generator=gen, dtype=dtype) * 2.0  # [batch, pos, d_mlp]
    n_tokens = torch.randint(1, t + 1, (b,), device="cuda", generator=gen)
    n_tokens[0] = t
    return torch.nn.functional.gelu(pre, approximate="tanh"), n_tokens


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("b", "t"), [(32, 256), (1, 8192), (5, 77)])
def test_fused_statistics_equal_eager(dtype, b, t):
    from workers.fused import layer_stats_fused

    act, n_tokens = activations(b, t, dtype, seed=b + t)
    sel = Selection()
    eager, fused = layer_stats(act, n_tokens, sel), layer_stats_fused(act, n_tokens, sel)
    for name, value in eager.items():
        assert torch.equal(value.to(fused[name].dtype), fused[name]), name
    assert torch.equal(fused["rank"], rank_scores(eager["max_act"], eager["min_act"], sel, dtype))


@pytest.mark.parametrize("k", [500, 1, 16_384])
def test_pick_kernel_equals_eager_at_gptj_shape(k):
    """The one-kernel pick (a bisection for the k-th rank) against the eager one (a top-k),
    on real ranks and on ranks with many ties."""
    from workers.fused import layer_stats_fused, pick_fused

    act, n_tokens = activations(32, 256, torch.float16, seed=k)
    rank = layer_stats_fused(act, n_tokens, Selection())["rank"]
    tied = rank // 1_000_000 * 1_000_000  # a few hundred distinct values
    for r in (rank, tied):
        fused, eager = pick_fused(r, k), pick_neurons(r, k)
        assert torch.equal(fused[0], eager[0]) and torch.equal(fused[1], eager[1])


@pytest.mark.parametrize("cap", [500, 0])
def test_fused_rows_equal_eager(cap):
    act, n_tokens = activations(16, 256, torch.float16, seed=cap)
    sel = Selection(max_per_layer=cap)
    eager, fused = reduce_layer(act, n_tokens, sel), reduce_layer(act, n_tokens, sel, fused=True)
    for name in eager:
        assert torch.equal(eager[name], fused[name]), name


def test_fused_reduction_never_synchronises():
    act, n_tokens = activations(8, 256, torch.float16, seed=1)
    reduce_layer(act, n_tokens, Selection(), fused=True)  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        reduce_layer(act, n_tokens, Selection(), fused=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.parametrize("stages", [1, 2])
def test_reduction_memory_is_under_a_tenth_of_the_stage_weights(stages):
    act, n_tokens = activations(32, 256, torch.float16, seed=2)  # 8,192 tokens
    sel = Selection()
    reduce_layer(act, n_tokens, sel, fused=True)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = reduce_layer(act, n_tokens, sel, fused=True)
    torch.cuda.synchronize()
    overhead = torch.cuda.max_memory_allocated() - base
    del out
    layers = N_LAYER // stages
    weights = 2 * layers * (4 * D_MODEL**2 + 2 * D_MODEL * D_MLP + D_MLP + D_MODEL)  # fp16 blocks
    print(f"reduction peak {overhead / 2**20:.0f} MiB = {overhead / weights:.1%} of a {stages}-stage shard's weights")
    assert overhead < 0.10 * weights


def test_a_gpu_stage_gives_the_cpu_stage_rows(tiny_model):
    """The whole stage (fused reduction, one host copy) on CUDA vs the CPU eager stage, fp32:
    the same kept rows and band codes but for the few that rounding moves across a threshold
    (GPU matmuls and tanh are not bit-identical to the CPU's: a GELU that saturates to -0.0 on
    one and to -1e-30 on the other is grey on one and blue on the other)."""
    from prompts.batching import micro_batches
    from workers.checkpoint import load_config, load_tokenizer
    from workers.shard import ShardSpec
    from workers.stage import Stage, StageSpec

    config = load_config(tiny_model)
    shard = ShardSpec(0, config.n_layer, config.n_layer)
    gpu, cpu = (Stage(StageSpec(str(tiny_model), shard, d, "float32")) for d in ("cuda", "cpu"))
    assert gpu.setup()["reduction"] == "fused" and cpu.setup()["reduction"] == "eager"
    batches = [b for b, _ in micro_batches("seed", load_tokenizer(tiny_model), config.n_positions, 2048, False)]
    compared = band_bytes = band_mismatches = 0
    for batch in batches:
        (_, a), (_, b) = gpu.forward(batch), cpu.forward(batch)
        ka, kb = (
            set(zip(r.rows["layer_offset"].tolist(), r.rows["row"].tolist(), r.rows["neuron"].tolist())) for r in (a, b)
        )
        differ = ka ^ kb
        assert len(differ) <= 0.001 * len(kb), f"{len(differ)} of {len(kb)} rows differ"
        index_a = {
            key: i
            for i, key in enumerate(
                zip(a.rows["layer_offset"].tolist(), a.rows["row"].tolist(), a.rows["neuron"].tolist())
            )
        }
        for j, key in enumerate(
            zip(b.rows["layer_offset"].tolist(), b.rows["row"].tolist(), b.rows["neuron"].tolist())
        ):
            if key in index_a:
                i = index_a[key]
                assert abs(a.rows["max_act"][i] - b.rows["max_act"][j]) < 1e-3
                band_mismatches += int(np.count_nonzero(a.rows["bands"][i] != b.rows["bands"][j]))
                band_bytes += len(b.rows["bands"][j])
                compared += 1
    assert compared > 1000 and band_mismatches <= 0.005 * band_bytes, (compared, band_bytes, band_mismatches)


def _gpu_stage(model_path, dtype="float16"):
    from workers.checkpoint import load_config
    from workers.shard import ShardSpec
    from workers.stage import Stage, StageSpec

    config = load_config(model_path)
    stage = Stage(StageSpec(str(model_path), ShardSpec(0, config.n_layer, config.n_layer), "cuda", dtype))
    stage.setup()
    return stage, config


def test_side_stream_and_concurrent_calls_give_the_one_stream_rows(tiny_model):
    """The reduction on a side stream, and two calls launching in turn from two threads (as
    Ray runs a stage), give exactly the rows of the reduction inline on one thread."""
    from concurrent.futures import ThreadPoolExecutor

    from prompts.batching import micro_batches
    from workers.checkpoint import load_tokenizer

    stage, config = _gpu_stage(tiny_model)
    assert stage.reduce_stream is not None
    batches = [b for b, _ in micro_batches("seed", load_tokenizer(tiny_model), config.n_positions, 1024, False)][:8]
    side = stage.reduce_stream
    stage.reduce_stream = None
    inline = [stage.forward(b)[1] for b in batches]
    stage.reduce_stream = side
    with ThreadPoolExecutor(2) as pool:
        overlapped = [r for _, r in pool.map(stage.forward, batches)]
    for a, b in zip(inline, overlapped):
        assert a.batch_id == b.batch_id
        for name in a.rows:
            assert np.array_equal(a.rows[name], b.rows[name]), name
        for name in a.per_prompt:
            assert np.array_equal(a.per_prompt[name], b.per_prompt[name]), name
        for name in a.predictions:
            assert np.array_equal(a.predictions[name], b.predictions[name]), name


def test_a_stage_micro_batch_synchronises_a_handful_of_times_never_per_layer(tiny_model):
    """The syncs CUDA's debug mode reports for one micro-batch (the compaction's ``nonzero``,
    copies of the batch's small index arrays) are a handful, never one per layer."""
    from prompts.batching import micro_batches
    from workers.checkpoint import load_tokenizer

    stage, config = _gpu_stage(tiny_model)
    [batch, *_] = [b for b, _ in micro_batches("seed", load_tokenizer(tiny_model), config.n_positions, 1024, False)]
    stage.forward(batch)
    torch.cuda.synchronize()
    import warnings

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            stage.forward(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
    print(f"{len(syncs)} synchronising calls in a {config.n_layer}-layer micro-batch")
    assert len(syncs) < 10 < config.n_layer, syncs
