"""The on-device reduction of one layer's MLP activations: pure tensor functions.

For each (prompt, neuron), over the prompt's own tokens only (no padding, no appended answer
tokens): the max and its first position, the min and its first position, how many tokens are
above ``high`` and below ``low``. A neuron is *selected* when ``max > high or min < low``.
At most ``max_per_layer`` selected neurons are kept per (prompt, layer): the red-selected ones
(``max > high``) first, by ``max_act - high``, then those only the blue rule selected, by
``low - min_act`` (how far past its threshold the neuron goes), ties to the lower neuron index
(`rank_scores`). Kept rows carry 2-bit band codes per token
(0 grey, 1 blue < low, 2 orange in (high, red], 3 red > red), four tokens a byte, token t
in byte t // 4 at bits 2 * (t % 4).

Everything here keeps fixed shapes ((B, K) with K the cap), so no step needs the host to
look at a value: the stage compacts all its layers at once, once per micro-batch.
"""

from __future__ import annotations

import torch

from neuroscan.config import Selection
from workers.fused import kept_rows_fused, layer_stats_fused, pick_fused
from workers.thresholds import UNSELECTED, thresholds

ROW_FIELDS = ("neuron", "max_act", "max_pos", "min_act", "min_pos", "n_above", "n_below", "bands")
GATED_FIELDS = ("up_at_max", "up_at_min")
"""Gated MLPs only: the up projection's value at the kept neuron's max and min token."""
PROMPT_FIELDS = ("n_selected", "n_kept", "n_above_any", "n_below_any", "mean_coverage", "red_coverage", "blue_coverage")


def band_codes(act: torch.Tensor, sel: Selection) -> torch.Tensor:
    """2-bit band code of every activation, as uint8, same shape as ``act``."""
    high, low, red = thresholds(sel, act.dtype)
    code = (act < low).to(torch.uint8)
    code.masked_fill_(act > high, 2)
    return code.masked_fill_(act > red, 3)


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """Pack 2-bit codes along the last dim, four a byte: (..., T) -> (..., ceil(T / 4)), all in uint8."""
    t = codes.shape[-1]
    pad = (-t) % 4
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    quads = codes.reshape(*codes.shape[:-1], -1, 4)  # (..., T/4, 4)
    return quads[..., 0] | (quads[..., 1] << 2) | (quads[..., 2] << 4) | (quads[..., 3] << 6)


def layer_stats(act: torch.Tensor, n_tokens: torch.Tensor, sel: Selection) -> dict[str, torch.Tensor]:
    """Per (prompt, neuron) over the prompt's own tokens: the eager reference of
    `workers.fused.layer_stats_fused` (same fields, same values).

    act [batch, pos, d_mlp], n_tokens [batch] -> [batch, d_mlp] max_act/min_act float32
    (first position on ties in max_pos/min_pos), n_above/n_below/n_red token counts.
    """
    high, low, red = thresholds(sel, act.dtype)
    pos = torch.arange(act.shape[1], device=act.device)
    invalid = (pos[None, :] >= n_tokens[:, None])[:, :, None]  # [batch, pos, 1]
    hi = act.masked_fill(invalid, float("-inf"))
    max_act, max_pos = hi.max(dim=1)  # [batch, d_mlp]; first position on ties
    n_above = (hi > high).sum(dim=1)
    n_red = (hi > red).sum(dim=1)
    del hi
    lo = act.masked_fill(invalid, float("inf"))
    min_act, min_pos = lo.min(dim=1)
    n_below = (lo < low).sum(dim=1)
    del lo
    return {
        "max_act": max_act.float(),
        "max_pos": max_pos,
        "min_act": min_act.float(),
        "min_pos": min_pos,
        "n_above": n_above,
        "n_below": n_below,
        "n_red": n_red,
    }


def reduce_layer(
    act: torch.Tensor,
    n_tokens: torch.Tensor,
    sel: Selection,
    fused: bool = False,
    up: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Reduce one layer's activations to fixed-shape candidate rows.

    act:      [batch, pos, d_mlp] activations (any float dtype)
    n_tokens: [batch] the prompt's own tokens (prompts start at position 0; the rest is
              padding or appended answer tokens and is ignored)
    fused:    take the statistics from the one-pass Triton kernel (`workers.fused`)
              instead of the eager reference; the rows are the same
    up:       gated MLPs (``act = act_fn(gate) * up``): the up projection's output, same
              shape as ``act``; read only at each kept neuron's max and min token

    Returns (B = batch, K = cap or d_mlp, W = ceil(pos / 4)):
      kept [B, K] bool, neuron [B, K] int32 (ascending among kept rows), max_act/min_act [B, K]
      float32, max_pos/min_pos/n_above/n_below [B, K] int16, bands [B, K, W] uint8, and per
      prompt n_selected/n_kept [B] int32, n_above_any/n_below_any [B] int32 (neurons selected
      by the red rule, max > high, and by the blue rule, min < low) and, as [B] float32 means over the kept
      neurons of a fraction of the prompt's tokens: mean_coverage (above ``high``),
      red_coverage (above ``red``) and blue_coverage (below ``low``). With ``up``, also
      up_at_max/up_at_min [B, K] float32: ``up`` at (max_pos, neuron) and (min_pos, neuron).
    """
    n = act.shape[2]
    stats, rank = scored(act, n_tokens, sel, fused)
    high, low, _ = thresholds(sel, act.dtype)
    neuron, n_selected = (pick_fused if fused else pick_neurons)(rank, cap(sel, n))  # [batch, K] ascending, then n
    kept = neuron < n
    idx = neuron.clamp(max=n - 1)  # [batch, K]
    picked = (kept_rows_fused if fused else kept_rows)(act, idx, n_tokens, stats, sel)
    if up is not None:
        picked.update(up_at_extremes(up, idx, picked))
    counts = {
        "n_selected": n_selected,
        "n_above_any": (stats["max_act"] > high).sum(dim=1).to(torch.int32),
        "n_below_any": (stats["min_act"] < low).sum(dim=1).to(torch.int32),
    }
    return layer_rows(kept, idx, picked, counts, n_tokens)


def scored(
    act: torch.Tensor, n_tokens: torch.Tensor, sel: Selection, fused: bool
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Every neuron's statistics (`layer_stats`) and rank (`rank_scores`), [batch, n] each."""
    if fused:  # the kernel also gives each neuron's rank
        stats = layer_stats_fused(act, n_tokens, sel)
        return stats, stats["rank"]
    stats = layer_stats(act, n_tokens, sel)
    return stats, rank_scores(stats["max_act"], stats["min_act"], sel, act.dtype)


def cap(sel: Selection, n: int) -> int:
    """Neurons kept at most per (prompt, layer) of ``n``: the cap, or all of them with cap 0."""
    return n if sel.max_per_layer == 0 else min(sel.max_per_layer, n)


def up_at_extremes(up: torch.Tensor, idx: torch.Tensor, picked: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A gated MLP's up projection [batch, pos, n] at each neuron ``idx`` [batch, K]'s max and
    min token: one gather of B x K values each, the up projection is not copied."""
    n = up.shape[2]
    flat = up.reshape(up.shape[0], -1)  # [batch, pos * n], a view
    return {
        name: flat.gather(1, picked[pos].long() * n + idx).float()
        for name, pos in (("up_at_max", "max_pos"), ("up_at_min", "min_pos"))
    }


def layer_rows(
    kept: torch.Tensor,
    idx: torch.Tensor,
    picked: dict[str, torch.Tensor],
    counts: dict[str, torch.Tensor],
    n_tokens: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """`reduce_layer`'s result from the kept slots ``kept`` [batch, K], their neurons ``idx``,
    their statistics and bands (``picked``: `kept_rows`' fields, and GATED_FIELDS from a gated
    MLP) and the per-prompt ``counts`` (n_selected, n_above_any, n_below_any): the coverages
    are means over the kept rows."""
    n_kept = kept.sum(dim=1)
    per_token = (n_kept * n_tokens.clamp(min=1)).clamp(min=1).float()  # [batch]

    def coverage(counts: torch.Tensor) -> torch.Tensor:  # [batch, K] token counts -> [batch]
        return (counts * kept).sum(dim=1).float() / per_token

    return {
        **{name: picked[name] for name in GATED_FIELDS if name in picked},
        "kept": kept,
        "neuron": idx.to(torch.int32),
        **{name: picked[name] for name in ROW_FIELDS if name != "neuron"},
        **counts,
        "n_kept": n_kept.to(torch.int32),
        "mean_coverage": coverage(picked["n_above"]),
        "red_coverage": coverage(picked["n_red"]),
        "blue_coverage": coverage(picked["n_below"]),
    }


def kept_rows(
    act: torch.Tensor, idx: torch.Tensor, n_tokens: torch.Tensor, stats: dict[str, torch.Tensor], sel: Selection
) -> dict[str, torch.Tensor]:
    """The statistics and packed band codes of the neurons ``idx`` [batch, K]: the eager
    reference of `workers.fused.kept_rows_fused`. max_act/min_act float32, max_pos/min_pos/
    n_above/n_below int16, n_red int32 [batch, K]; bands [batch, K, ceil(pos / 4)] uint8."""
    picked = {name: stats[name].gather(1, idx) for name in ("max_act", "min_act")}
    for name in ("max_pos", "min_pos", "n_above", "n_below"):
        picked[name] = stats[name].gather(1, idx).to(torch.int16)
    picked["n_red"] = stats["n_red"].gather(1, idx).to(torch.int32)
    picked["bands"] = packed_bands(act, idx, n_tokens, sel)
    return picked


def rank_scores(max_act: torch.Tensor, min_act: torch.Tensor, sel: Selection, dtype: torch.dtype) -> torch.Tensor:
    """Each neuron's rank (the eager reference of the fused kernel's, bit for bit).

    A neuron is selected by the red rule when ``max > high``, by the blue rule when
    ``min < low`` (compared as ``dtype`` values, see `threshold`). Every red-selected neuron
    ranks above every neuron the blue rule alone selected, so that the blue rule (which with
    ``low = 0`` selects nearly every neuron of a GELU model) never crowds a red one out of the
    cap; red-selected neurons rank by ``max - high``, blue-only ones by ``low - min``, both in
    float32 (how far past its threshold the neuron goes). Unselected neurons rank
    `UNSELECTED`, below all.

    The rank is an int32 built from the float32 bits of those non-negative distances (bits
    of non-negative floats order as the floats do; + 0.0 turns -0.0 into 0.0): red ranks lie in
    [1, 0x7F800001], blue-only ranks in [-0x7F800000, 0]. [batch, n] float32 -> [batch, n] int32.
    """
    high, low, _ = thresholds(sel, dtype)
    red = ((max_act - sel.high).clamp(min=0.0) + 0.0).contiguous().view(torch.int32) + 1
    blue = ((sel.low - min_act).clamp(min=0.0) + 0.0).contiguous().view(torch.int32) - 0x7F800000
    unselected = torch.full_like(red, UNSELECTED)
    return torch.where(max_act > high, red, torch.where(min_act < low, blue, unselected))


def is_selected(rank: torch.Tensor) -> torch.Tensor:
    """Whether ranks belong to selected neurons (a score above -inf)."""
    return rank > UNSELECTED


def pick_neurons(rank: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept neurons of each row of ranks [batch, n], the eager reference of
    `workers.fused.pick_fused`.

    Kept: the selected neurons among the ``k`` best ranks, ties to the lower index (the head of
    a stable descending sort by score): every rank above the ``k``-th highest, then the
    lowest-index neurons ranked the ``k``-th highest while room is left. Returns their indices
    ascending, then ``n`` in the slots left over, [batch, k] int64; and how many neurons are
    selected, [batch] int32.
    """
    b, n = rank.shape
    # The k-th highest rank [batch]: a top-k of 32-bit values (a radix selection, not a sort).
    kth = rank.amin(dim=1) if k == n else rank.topk(k, dim=1, sorted=False).values.amin(dim=1)
    selected = is_selected(rank)
    above = rank > kth[:, None]
    at = rank == kth[:, None]
    room = k - above.sum(dim=1, keepdim=True)
    chosen = selected & (above | (at & (at.cumsum(dim=1) <= room)))
    slot = torch.where(chosen, chosen.cumsum(dim=1) - 1, k)  # the unchosen all land in a spare column
    out = torch.full((b, k + 1), n, dtype=torch.int64, device=rank.device)
    out.scatter_(1, slot, torch.arange(n, device=rank.device).expand(b, n))
    return out[:, :k], selected.sum(dim=1).to(torch.int32)


def packed_bands(
    act: torch.Tensor, idx: torch.Tensor, n_tokens: torch.Tensor, sel: Selection, chunk: int = 2048
) -> torch.Tensor:
    """Band codes of the neurons ``idx`` [batch, K], packed: [batch, K, ceil(pos / 4)] uint8,
    grey (0) past each prompt's ``n_tokens``.

    Done ``chunk`` neurons at a time, so that keeping every neuron (--max-per-layer 0) costs
    a few chunk-sized temporaries instead of several copies of the layer's activations.
    """
    b, t, _ = act.shape
    k = idx.shape[1]
    invalid = (torch.arange(t, device=act.device)[None, :] >= n_tokens[:, None])[:, :, None]  # [batch, pos, 1]
    out = torch.empty(b, k, (t + 3) // 4, dtype=torch.uint8, device=act.device)
    for lo in range(0, k, chunk):
        cols = idx[:, lo : lo + chunk]  # [batch, C]
        act_c = act.gather(2, cols[:, None, :].expand(b, t, cols.shape[1]))  # [batch, pos, C]
        codes = band_codes(act_c, sel).masked_fill_(invalid, 0).transpose(1, 2)  # [batch, C, pos]
        out[:, lo : lo + chunk] = pack_codes(codes)
    return out


def compact(layers: list[dict[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Stack a stage's per-layer outputs and keep only the kept rows, on the device.

    Returns ``rows`` (M kept rows: ``layer_offset`` and ``row`` index the stage's layer and the
    batch row, plus ROW_FIELDS and, from a gated MLP, GATED_FIELDS) and ``per_prompt`` ([L, B] arrays of PROMPT_FIELDS). The
    ``nonzero`` here is the stage's one host synchronisation per micro-batch.
    """
    kept = torch.stack([layer["kept"] for layer in layers])  # [L, B, K]
    where = kept.nonzero()  # [M, 3]: layer offset, batch row, slot
    rows = {"layer_offset": where[:, 0].to(torch.int16), "row": where[:, 1].to(torch.int32)}
    for name in (*ROW_FIELDS, *(f for f in GATED_FIELDS if f in layers[0])):
        stacked = torch.stack([layer[name] for layer in layers])  # [L, B, K, ...]
        rows[name] = stacked[where[:, 0], where[:, 1], where[:, 2]]
    per_prompt = {name: torch.stack([layer[name] for layer in layers]) for name in PROMPT_FIELDS}
    return rows, per_prompt
