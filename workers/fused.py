"""The per-neuron statistics of one layer in a single pass over its activations (Triton).

`workers.reduce.layer_stats` is the eager reference: it reads the [batch, pos, d_mlp]
activations about ten times (two masked copies, max, min, three comparisons and their
sums). This kernel reads them once: a program owns one prompt and ``BLOCK_N`` neurons,
walks the prompt's own tokens only (padding is never loaded) in ``BLOCK_T`` slices, and
keeps running max/argmax, min/argmin and the three counts in registers, per lane of the
slice, reducing across the slice's rows once at the end. Each step loads ``UNROLL`` slices
before folding them in, so that enough bytes are in flight to keep the memory busy. Loads
are coalesced along the neuron axis, the innermost one of the activations.

Same results as the eager path: values compared in float32 after an exact upcast, first
position on ties. On a CPU the kernel runs under Triton's interpreter (``TRITON_INTERPRET=1``),
which is how CI tests it; production CPU stages use the eager path.
"""

from __future__ import annotations

import functools
import os

import torch

from cluster.config import Selection

try:
    import triton.language as tl
except ImportError:  # CPU installs without Triton use the eager path only
    tl = None

BLOCK_N = 256
BLOCK_T = 8
UNROLL = 4
NUM_WARPS = 8


def available(device: torch.device) -> bool:
    """Whether the fused pass is the one to use on ``device``: Triton on a CUDA device. (On a
    CPU it runs only when asked for, under the interpreter: that is for tests, not speed.)"""
    return tl is not None and device.type == "cuda"


def stats_kernel(
    act, n_tokens, max_act, max_pos, min_act, min_pos, n_above, n_below, n_red,
    n_neurons, stride_b, stride_t, high, low, red,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, UNROLL: tl.constexpr,
):
    # Each lane of the [BLOCK_T, BLOCK_N] tile keeps its own running statistics while the
    # program walks the prompt; the tile is reduced along the token axis once, at the end.
    # (Reducing every slice as it is loaded costs a cross-warp exchange per statistic per
    # slice: measured on an H200, that kernel ran at 1.1 ms a layer instead of ~0.1.)
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
        # v2 loaded one [BLOCK_T, BLOCK_N] slice a step: 4 KB in flight per program, ~0.44 ms a
        # layer on an H200 (a seventh of its bandwidth). The UNROLL loads below do not depend on
        # each other or on the running statistics, so they are all issued before the first is used.
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


@functools.cache
def _kernel(interpret: bool):
    """`stats_kernel` compiled by Triton on first use. ``interpret`` is part of the cache key:
    ``triton.jit`` reads the interpreter flag when it wraps the function."""
    import triton

    return triton.jit(stats_kernel)


def layer_stats_fused(act: torch.Tensor, n_tokens: torch.Tensor, sel: Selection, block_t: int = BLOCK_T,
                      unroll: int = UNROLL, num_warps: int = NUM_WARPS) -> dict[str, torch.Tensor]:
    """`workers.reduce.layer_stats` in one pass: act [batch, pos, d_mlp] (unit stride along
    d_mlp), n_tokens [batch] -> [batch, d_mlp] max_act/min_act float32 and
    max_pos/min_pos/n_above/n_below/n_red int32. The tiling arguments are for `bench.kernels`."""
    if act.stride(2) != 1:
        act = act.contiguous()
    b, _, n = act.shape
    dev = act.device
    out = {name: torch.empty(b, n, dtype=torch.float32, device=dev) for name in ("max_act", "min_act")}
    for name in ("max_pos", "min_pos", "n_above", "n_below", "n_red"):
        out[name] = torch.empty(b, n, dtype=torch.int32, device=dev)
    from workers.reduce import thresholds

    high, low, red = thresholds(sel, act.dtype)  # the same exact comparisons as the eager path
    kernel = _kernel(os.environ.get("TRITON_INTERPRET") == "1")
    kernel[(b, -(-n // BLOCK_N))](
        act, n_tokens.to(torch.int32), out["max_act"], out["max_pos"], out["min_act"], out["min_pos"],
        out["n_above"], out["n_below"], out["n_red"], n, act.stride(0), act.stride(1),
        high, low, red, BLOCK_T=block_t, BLOCK_N=BLOCK_N, UNROLL=unroll, num_warps=num_warps,
    )
    return out
