"""The per-neuron statistics of one layer in a single pass over its activations (Triton).

`workers.reduce.layer_stats` is the eager reference: it reads the [batch, pos, d_mlp]
activations about ten times (two masked copies, max, min, three comparisons and their
sums). This kernel reads them once: a program owns one prompt and ``BLOCK_N`` neurons,
walks the prompt's own tokens only (padding is never loaded) in ``BLOCK_T`` slices, and
keeps running max/argmax, min/argmin and the three counts in registers, per lane of the
slice, reducing across the slice's rows once at the end. Each step loads ``UNROLL`` slices
before folding them in, so that enough bytes are in flight to keep the memory busy. Loads
are coalesced along the neuron axis, the innermost one of the activations.

The pick (`pick_fused`) and the kept rows' statistics and band codes (`kept_rows_fused`) are
one kernel each too. (The GELU and these statistics in one kernel, which saves the second read
of the activations, is slower end to end: bench/RESULTS.md.)

Same results as the eager path: values compared in float32 after an exact upcast, first
position on ties. On a CPU the kernel runs under Triton's interpreter (``TRITON_INTERPRET=1``),
which is how CI tests it; production CPU stages use the eager path.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch

from neuroscan.config import Selection
from workers.thresholds import UNSELECTED, thresholds

try:
    import triton.language as tl
except ImportError:  # CPU installs without Triton use the eager path only
    tl = None


class Tiling(NamedTuple):
    """How `stats_kernel` cuts the work: a program owns ``block_n`` neurons of one prompt and
    walks it ``block_t`` tokens a slice, ``unroll`` slices a step, on ``num_warps`` warps."""

    block_t: int
    unroll: int
    num_warps: int
    block_n: int = 256


STATS_TILING = Tiling(2, 16, 4)
"""The fastest of the tilings `bench.kernels` tries, at GPT-J-6B's shape on a GPU (figures in
bench/RESULTS.md)."""


def available(device: torch.device) -> bool:
    """Whether the fused pass is the one to use on ``device``: Triton on a CUDA device. (On a
    CPU it runs only when asked for, under the interpreter: that is for tests, not speed.)"""
    return tl is not None and device.type == "cuda"


def stats_kernel(
    act,
    n_tokens,
    max_act,
    max_pos,
    min_act,
    min_pos,
    n_above,
    n_below,
    n_red,
    rank,
    n_neurons,
    stride_b,
    stride_t,
    high,
    low,
    red,
    sel_high,
    sel_low,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UNROLL: tl.constexpr,
):
    # Only the prompt's own tokens are read.
    # Each lane of the [BLOCK_T, BLOCK_N] tile keeps its own running statistics while the
    # program walks the prompt; the tile is reduced along the token axis once, at the end.
    # (Reducing every slice as it is loaded would cost a cross-warp exchange per statistic
    # per slice, an order of magnitude slower: bench/RESULTS.md.)
    b = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    col_ok = cols < n_neurons
    length = tl.load(n_tokens + b)
    lane_max = tl.full((BLOCK_T, BLOCK_N), float("-inf"), tl.float32)
    lane_min = tl.full((BLOCK_T, BLOCK_N), float("inf"), tl.float32)
    lane_arg_max = tl.zeros((BLOCK_T, BLOCK_N), tl.int32)
    lane_arg_min = tl.zeros((BLOCK_T, BLOCK_N), tl.int32)
    above = tl.zeros((BLOCK_T, BLOCK_N), tl.int32)
    below = tl.zeros((BLOCK_T, BLOCK_N), tl.int32)
    reds = tl.zeros((BLOCK_T, BLOCK_N), tl.int32)
    base = act + b.to(tl.int64) * stride_b
    for t0 in range(0, length, BLOCK_T * UNROLL):
        # One [BLOCK_T, BLOCK_N] slice a step leaves too few bytes in flight to use the memory's
        # bandwidth. The UNROLL loads below do not depend on each other or on the running
        # statistics, so they are all issued before the first is used.
        for u in tl.static_range(UNROLL):
            rows = t0 + u * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T]
            ok = (rows < length)[:, None] & col_ok[None, :]
            x = tl.load(base + rows[:, None].to(tl.int64) * stride_t + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            hi = tl.where(ok, x, float("-inf"))
            lo = tl.where(ok, x, float("inf"))
            new_max = hi > lane_max  # strict: a lane keeps its earliest position on ties
            new_min = lo < lane_min
            lane_arg_max = tl.where(new_max, rows[:, None], lane_arg_max)
            lane_arg_min = tl.where(new_min, rows[:, None], lane_arg_min)
            lane_max = tl.where(new_max, hi, lane_max)
            lane_min = tl.where(new_min, lo, lane_min)
            above += (hi > high).to(tl.int32)
            below += (lo < low).to(tl.int32)
            reds += (hi > red).to(tl.int32)
    run_max = tl.max(lane_max, axis=0)
    run_min = tl.min(lane_min, axis=0)
    big = 2147483647  # the earliest position among the lanes holding the max (0 if none)
    arg_max = tl.min(tl.where(lane_max == run_max[None, :], lane_arg_max, big), axis=0)
    arg_min = tl.min(tl.where(lane_min == run_min[None, :], lane_arg_min, big), axis=0)
    arg_max = tl.where(arg_max == big, 0, arg_max)
    arg_min = tl.where(arg_min == big, 0, arg_min)
    out = b.to(tl.int64) * n_neurons + cols
    tl.store(max_act + out, run_max, mask=col_ok)
    tl.store(max_pos + out, arg_max, mask=col_ok)
    tl.store(min_act + out, run_min, mask=col_ok)
    tl.store(min_pos + out, arg_min, mask=col_ok)
    tl.store(n_above + out, tl.sum(above, axis=0), mask=col_ok)
    tl.store(n_below + out, tl.sum(below, axis=0), mask=col_ok)
    tl.store(n_red + out, tl.sum(reds, axis=0), mask=col_ok)
    # The rank, as `workers.reduce.rank_scores` computes it (saves ~15 small kernels a layer).
    red_bits = (tl.maximum(run_max - sel_high, 0.0) + 0.0).to(tl.int32, bitcast=True)
    blue_bits = (tl.maximum(sel_low - run_min, 0.0) + 0.0).to(tl.int32, bitcast=True)
    ranked = tl.where(
        run_max > high, red_bits + 1, tl.where(run_min < low, blue_bits - 0x7F800000, -0x7F800000 - 1)
    )  # UNSELECTED
    tl.store(rank + out, ranked, mask=col_ok)


@functools.cache
def compiled(kernel, interpret: bool):
    """``kernel`` compiled by Triton on first use. ``interpret`` is part of the cache key:
    ``triton.jit`` reads the interpreter flag when it wraps the function."""
    import triton

    return triton.jit(kernel)


def interpreted() -> bool:
    """Whether Triton runs kernels under its interpreter (``TRITON_INTERPRET=1``, on a CPU)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def layer_stats_fused(
    act: torch.Tensor, n_tokens: torch.Tensor, sel: Selection, tiling: Tiling = STATS_TILING
) -> dict[str, torch.Tensor]:
    """`workers.reduce.layer_stats` in one pass: act [batch, pos, d_mlp] (unit stride along
    d_mlp), n_tokens [batch] -> [batch, d_mlp] max_act/min_act float32 and
    max_pos/min_pos/n_above/n_below/n_red int32, and rank int32 (`workers.reduce.rank_scores`).
    Other tilings are for `bench.kernels`."""
    if act.stride(2) != 1:
        act = act.contiguous()
    b, _, n = act.shape
    dev = act.device
    out = {name: torch.empty(b, n, dtype=torch.float32, device=dev) for name in ("max_act", "min_act")}
    for name in ("max_pos", "min_pos", "n_above", "n_below", "n_red"):
        out[name] = torch.empty(b, n, dtype=torch.int32, device=dev)
    out["rank"] = torch.empty(b, n, dtype=torch.int32, device=dev)
    high, low, red = thresholds(sel, act.dtype)  # the same exact comparisons as the eager path
    compiled(stats_kernel, interpreted())[(b, -(-n // tiling.block_n))](
        act,
        n_tokens.to(torch.int32),
        out["max_act"],
        out["max_pos"],
        out["min_act"],
        out["min_pos"],
        out["n_above"],
        out["n_below"],
        out["n_red"],
        out["rank"],
        n,
        act.stride(0),
        act.stride(1),
        high,
        low,
        red,
        sel.high,
        sel.low,
        BLOCK_T=tiling.block_t,
        BLOCK_N=tiling.block_n,
        UNROLL=tiling.unroll,
        num_warps=tiling.num_warps,
    )
    return out


PICK_WARPS = 16
"""A prompt's 16,384 ranks over 512 threads, 32 each: with fewer warps each thread holds more
ranks than its registers and spills (`tests/unit/test_fused_compile.py` checks the count on
sm_90; timings by warps in bench/RESULTS.md)."""


def pick_kernel(rank, neuron, n_selected, n_neurons, k, unselected, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # One program per prompt holds the prompt's whole row of ranks. The k-th highest rank comes
    # from a bisection over the 32-bit values (32 counts of the ranks at or above a guess, each
    # a reduction in registers: no sort, no top-k); then every rank above it is kept, and the
    # lowest-index neurons at it while room is left, written in ascending order by a prefix sum.
    b = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    ok = cols < n_neurons
    r = tl.load(rank + b * n_neurons + cols, mask=ok, other=-(2**31))
    lo = b * 0 - 2**31  # at least k ranks are >= lo; the k-th highest is in [lo, hi]
    hi = b * 0 + 2**31 - 1  # (int64 scalars, like b, so that lo + hi cannot overflow)
    for _ in range(32):
        mid = (lo + hi + 1) >> 1
        enough = tl.sum((ok & (r >= mid.to(tl.int32))).to(tl.int32), axis=0) >= k
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid - 1)
    kth = lo.to(tl.int32)
    selected = ok & (r > unselected)
    above = ok & (r > kth)
    at = ok & (r == kth)
    room = k - tl.sum(above.to(tl.int32), axis=0)
    chosen = selected & (above | (at & (tl.cumsum(at.to(tl.int32), axis=0) <= room)))
    slot = tl.cumsum(chosen.to(tl.int32), axis=0) - 1
    row = neuron + b * k
    tl.store(row + slot, cols.to(tl.int64), mask=chosen & (slot < k))  # (< k holds; the mask keeps writes in the row)
    count = tl.sum(chosen.to(tl.int32), axis=0)
    for k0 in range(0, k, BLOCK_K):  # the slots left over: the sentinel n
        ks = k0 + tl.arange(0, BLOCK_K)
        tl.store(row + ks, tl.full((BLOCK_K,), 0, tl.int64) + n_neurons, mask=(ks >= count) & (ks < k))
    tl.store(n_selected + b, tl.sum(selected.to(tl.int32), axis=0))


def pick_fused(rank: torch.Tensor, k: int, num_warps: int = PICK_WARPS) -> tuple[torch.Tensor, torch.Tensor]:
    """`workers.reduce.pick_neurons` in one kernel (same results): ranks [batch, n] int32 ->
    kept neurons ascending then ``n``, [batch, k] int64, and n_selected [batch] int32.
    ``num_warps`` is for `bench.kernels`."""
    import triton

    b, n = rank.shape
    neuron = torch.empty(b, k, dtype=torch.int64, device=rank.device)
    n_selected = torch.empty(b, dtype=torch.int32, device=rank.device)
    compiled(pick_kernel, interpreted())[(b,)](
        rank.contiguous(),
        neuron,
        n_selected,
        n,
        k,
        UNSELECTED,
        BLOCK_N=max(16, triton.next_power_of_2(n)),
        BLOCK_K=256,
        num_warps=num_warps,
    )
    return neuron, n_selected


ROWS_BLOCK_K = 32
ROWS_BLOCK_W = 16


def rows_kernel(
    act,
    n_tokens,
    idx,
    max_act,
    max_pos,
    min_act,
    min_pos,
    n_above,
    n_below,
    n_red,
    o_max_act,
    o_max_pos,
    o_min_act,
    o_min_pos,
    o_n_above,
    o_n_below,
    o_n_red,
    bands,
    n_neurons,
    n_slots,
    width,
    stride_b,
    stride_t,
    high,
    low,
    red,
    BLOCK_K: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    # A program owns BLOCK_K slots (kept neurons) of one prompt: it copies their statistics
    # and writes their band codes, four tokens a byte, walking the prompt BLOCK_W bytes a step.
    # Replaces ~20 small kernels a layer (7 gathers, 4 casts, the band codes' compares, masks,
    # transposes and shifts).
    b = tl.program_id(0)
    slots = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)  # [BLOCK_K]
    slot_ok = slots < n_slots
    neuron = tl.load(idx + b.to(tl.int64) * n_slots + slots, mask=slot_ok, other=0).to(tl.int64)
    src = b.to(tl.int64) * n_neurons + neuron
    out = b.to(tl.int64) * n_slots + slots
    tl.store(o_max_act + out, tl.load(max_act + src, mask=slot_ok), mask=slot_ok)
    tl.store(o_min_act + out, tl.load(min_act + src, mask=slot_ok), mask=slot_ok)
    tl.store(o_max_pos + out, tl.load(max_pos + src, mask=slot_ok).to(tl.int16), mask=slot_ok)
    tl.store(o_min_pos + out, tl.load(min_pos + src, mask=slot_ok).to(tl.int16), mask=slot_ok)
    tl.store(o_n_above + out, tl.load(n_above + src, mask=slot_ok).to(tl.int16), mask=slot_ok)
    tl.store(o_n_below + out, tl.load(n_below + src, mask=slot_ok).to(tl.int16), mask=slot_ok)
    tl.store(o_n_red + out, tl.load(n_red + src, mask=slot_ok), mask=slot_ok)
    length = tl.load(n_tokens + b)
    base = act + b.to(tl.int64) * stride_b
    for w0 in range(0, width, BLOCK_W):
        byte = w0 + tl.arange(0, BLOCK_W)  # [BLOCK_W]
        packed = tl.zeros((BLOCK_K, BLOCK_W), tl.int32)
        for j in tl.static_range(4):
            t = byte * 4 + j
            ok = slot_ok[:, None] & (t < length)[None, :]
            x = tl.load(base + t[None, :].to(tl.int64) * stride_t + neuron[:, None], mask=ok, other=0.0).to(tl.float32)
            # `workers.reduce.band_codes`: red over orange over blue; grey past the prompt.
            code = tl.where(x > red, 3, tl.where(x > high, 2, tl.where(x < low, 1, 0)))
            packed = packed | (tl.where(ok, code, 0) << (2 * j))
        dest = bands + out[:, None] * width + byte[None, :]
        tl.store(dest, packed.to(tl.uint8), mask=slot_ok[:, None] & (byte < width)[None, :])


def kept_rows_fused(
    act: torch.Tensor, idx: torch.Tensor, n_tokens: torch.Tensor, stats: dict[str, torch.Tensor], sel: Selection
) -> dict[str, torch.Tensor]:
    """`workers.reduce.kept_rows` in one kernel: the statistics and packed band codes of the
    neurons ``idx`` [batch, K] (same values, same dtypes)."""
    if act.stride(2) != 1:
        act = act.contiguous()
    b, t, n = act.shape
    k = idx.shape[1]
    width = (t + 3) // 4
    dev = act.device
    out = {name: torch.empty(b, k, dtype=torch.float32, device=dev) for name in ("max_act", "min_act")}
    for name in ("max_pos", "min_pos", "n_above", "n_below"):
        out[name] = torch.empty(b, k, dtype=torch.int16, device=dev)
    out["n_red"] = torch.empty(b, k, dtype=torch.int32, device=dev)
    out["bands"] = torch.empty(b, k, width, dtype=torch.uint8, device=dev)
    high, low, red = thresholds(sel, act.dtype)
    compiled(rows_kernel, interpreted())[(b, -(-k // ROWS_BLOCK_K))](
        act,
        n_tokens.to(torch.int32),
        idx.contiguous(),
        *(stats[name] for name in ("max_act", "max_pos", "min_act", "min_pos", "n_above", "n_below", "n_red")),
        *(out[name] for name in ("max_act", "max_pos", "min_act", "min_pos", "n_above", "n_below", "n_red", "bands")),
        n,
        k,
        width,
        act.stride(0),
        act.stride(1),
        high,
        low,
        red,
        BLOCK_K=ROWS_BLOCK_K,
        BLOCK_W=ROWS_BLOCK_W,
    )
    return out
