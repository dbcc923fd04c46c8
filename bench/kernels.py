"""The reduction's pieces timed alone on one layer's activations at GPT-J-6B's shape (GPU only).

    python -m bench.kernels [--batch 32] [--tokens 256]

Prints, median of many runs (``triton.testing.do_bench``): a device-to-device copy of the
activations (the bandwidth ceiling: bytes read + written), PyTorch's GELU alone and followed
by the statistics kernel, the statistics kernel alone at a few tilings (its floor is one read
of the activations), picking the kept neurons (run 6's int64 top-k and sort, the eager int32 top-k, the one-kernel bisection), the band packing and
the whole ``reduce_layer``; then GPT-J's rotary embedding of one layer's queries and keys,
transformers' way (rotate, then concatenate) against `workers.rotary`'s in place (eager ops,
the kernel). A diagnostic for bench/RESULTS.md and for choosing
`workers.fused`'s tiling, not a benchmark of record.
"""

from __future__ import annotations

import argparse

import torch
from transformers import GPTJConfig
from transformers.models.gptj.modeling_gptj import (
    GPTJRotaryEmbedding,
    apply_rotary_pos_emb,
)

from neuroscan.config import Selection
from workers import fused
from workers.fused import Tiling
from workers.reduce import UNSELECTED, kept_rows, pick_neurons, reduce_layer
from workers.rotary import rotate_

TILINGS = [Tiling(*t) for t in ((2, 16, 4), (4, 8, 4), (2, 16, 4, 128))]
"""(2, 16, 4) is `workers.fused.STATS_TILING`, the best of ten in run 6's kernel table (where
(4, 8, 4) was the default), and again in run 7's."""


def main() -> None:
    from triton.testing import do_bench

    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--neurons", type=int, default=16_384)
    args = parser.parse_args()
    gen = torch.Generator("cuda").manual_seed(0)
    shape = (args.batch, args.tokens, args.neurons)
    pre = torch.randn(*shape, device="cuda", dtype=torch.float16, generator=gen) * 2  # the MLP's pre-activations
    act = torch.nn.functional.gelu(pre, approximate="tanh")
    n_tokens = torch.full((args.batch,), args.tokens, device="cuda", dtype=torch.int64)
    sel = Selection()
    size = act.numel() * act.element_size()

    def ms(fn) -> float:
        return do_bench(fn, warmup=25, rep=200, return_mode="median")

    out = torch.empty_like(act)
    copy = ms(lambda: out.copy_(act))
    print(f"activations {tuple(shape)} fp16, {size / 2**20:.0f} MiB")
    print(f"{'device copy (read + write)':<40}{copy * 1e3:9.1f} us  {2 * size / copy / 1e6:7.0f} GB/s")
    reference = fused.layer_stats_fused(act, n_tokens, sel)
    gelu = lambda: torch.nn.functional.gelu(pre, approximate="tanh")
    t = ms(gelu)
    print(f"{'GELU, torch':<40}{t * 1e3:9.1f} us  {2 * size / t / 1e6:7.0f} GB/s")
    print(
        f"{'GELU, torch, then the stats kernel':<40}{ms(lambda: fused.layer_stats_fused(gelu(), n_tokens, sel)) * 1e3:9.1f} us"
    )
    for tiling in TILINGS:
        got = fused.layer_stats_fused(act, n_tokens, sel, tiling)
        same = all(torch.equal(reference[k], got[k]) for k in reference)
        t = ms(lambda tiling=tiling: fused.layer_stats_fused(act, n_tokens, sel, tiling))
        print(
            f"{f'stats {name(tiling)}':<40}{t * 1e3:9.1f} us  {size / t / 1e6:7.0f} GB/s"
            f"{'' if same else '  DIFFERENT RESULTS'}"
        )
    rank = reference["rank"]
    key = (rank.long() << 32) | (args.neurons - 1 - torch.arange(args.neurons, device="cuda"))  # run 6's rank keys
    before = run6_pick(key, 500)
    print(f"{'pick 500, int64 top-k + sort (run 6)':<40}{ms(lambda: run6_pick(key, 500)) * 1e3:9.1f} us")
    same = torch.equal(pick_neurons(rank, 500)[0], before)
    print(
        f"{'pick 500, int32 top-k + prefix sums':<40}{ms(lambda: pick_neurons(rank, 500)) * 1e3:9.1f} us{'' if same else '  DIFFERENT RESULTS'}"
    )
    for warps in (4, 8, 16):
        same = torch.equal(fused.pick_fused(rank, 500, warps)[0], before)
        print(
            f"{f'pick 500, kernel warps={warps}':<40}{ms(lambda warps=warps: fused.pick_fused(rank, 500, warps)) * 1e3:9.1f} us"
            f"{'' if same else '  DIFFERENT RESULTS'}"
        )
    idx = torch.sort(torch.randperm(args.neurons, device="cuda")[:500]).values.expand(args.batch, 500).contiguous()
    rows = fused.kept_rows_fused(act, idx, n_tokens, reference, sel)
    eager = kept_rows(act, idx, n_tokens, reference, sel)
    same = all(torch.equal(rows[k], eager[k]) for k in rows)
    print(
        f"{'kept rows, eager (500 neurons)':<40}{ms(lambda: kept_rows(act, idx, n_tokens, reference, sel)) * 1e3:9.1f} us"
    )
    print(
        f"{'kept rows, fused (500 neurons)':<40}{ms(lambda: fused.kept_rows_fused(act, idx, n_tokens, reference, sel)) * 1e3:9.1f} us"
        f"{'' if same else '  DIFFERENT RESULTS'}"
    )
    print(f"{'reduce_layer (fused)':<40}{ms(lambda: reduce_layer(act, n_tokens, sel, fused=True)) * 1e3:9.1f} us")
    print(f"{'reduce_layer (eager)':<40}{ms(lambda: reduce_layer(act, n_tokens, sel)) * 1e3:9.1f} us")
    rotary(args.batch, args.tokens, ms)


def name(tiling: Tiling) -> str:
    return f"T={tiling.block_t} U={tiling.unroll} w={tiling.num_warps} N={tiling.block_n}"


def run6_pick(key: torch.Tensor, k: int) -> torch.Tensor:
    """How run 6 picked the kept neurons from its int64 rank keys (score bits, then n - 1 -
    index): an unsorted top-k, then the kept ones sorted by index, the sentinel n last."""
    n = key.shape[1]
    ranked = key.topk(k, dim=1, sorted=False).indices
    kept = (key.gather(1, ranked) >> 32) > UNSELECTED
    return torch.sort(torch.where(kept, ranked, n), dim=1).values


def rotary(batch: int, tokens: int, ms) -> None:
    """One layer's rotary embedding at GPT-J-6B's shape (16 heads of 256, rotary_dim 64)."""
    config = GPTJConfig()
    heads, head_dim, rd = config.n_head, config.n_embd // config.n_head, config.rotary_dim
    gen = torch.Generator("cuda").manual_seed(1)
    query, key = (
        torch.randn(batch, tokens, heads, head_dim, device="cuda", dtype=torch.float16, generator=gen) for _ in range(2)
    )
    positions = torch.arange(tokens, device="cuda")[None, :].expand(batch, tokens)
    sin, cos = GPTJRotaryEmbedding(config).to("cuda")(query, positions)

    def theirs():
        return [torch.cat([apply_rotary_pos_emb(x[..., :rd], sin, cos), x[..., rd:]], dim=-1) for x in (query, key)]

    want = theirs()
    q, k = query.clone(), key.clone()
    rotate_(q, k, sin, cos, rd, kernel=True)
    same = torch.equal(q, want[0]) and torch.equal(k, want[1])
    print(f"queries and keys {(batch, tokens, heads, head_dim)} fp16, rotary_dim {rd}")
    print(f"{'rotary, transformers (+ cat)':<40}{ms(theirs) * 1e3:9.1f} us")
    print(f"{'rotary in place, eager':<40}{ms(lambda: rotate_(q, k, sin, cos, rd, kernel=False)) * 1e3:9.1f} us")
    print(
        f"{'rotary in place, kernel':<40}{ms(lambda: rotate_(q, k, sin, cos, rd, kernel=True)) * 1e3:9.1f} us"
        f"{'' if same else '  DIFFERENT RESULTS'}"
    )


if __name__ == "__main__":
    main()
