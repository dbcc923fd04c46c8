"""The on-device reduction of one layer's MLP activations: pure tensor functions.

For each (prompt, neuron), over the prompt's own tokens only (no padding, no appended answer
tokens): the max and its first position, the min and its first position, how many tokens are
above ``high`` and below ``low``. A neuron is *selected* when ``max > high or min < low``.
At most ``max_per_layer`` selected neurons are kept per (prompt, layer): the most extreme
first, by ``score = max(max_act - high, low - min_act)`` (how far past its threshold the
neuron goes), ties to the lower neuron index. Kept rows carry 2-bit band codes per token
(0 grey, 1 blue < low, 2 orange in (high, red], 3 red > red), four tokens a byte, token t
in byte t // 4 at bits 2 * (t % 4).

Everything here keeps fixed shapes ((B, K) with K the cap), so no step needs the host to
look at a value: the stage compacts all its layers at once, once per micro-batch.
"""

from __future__ import annotations

import torch

from cluster.config import Selection

ROW_FIELDS = ("neuron", "max_act", "max_pos", "min_act", "min_pos", "n_above", "n_below", "bands")
PROMPT_FIELDS = ("n_selected", "n_kept", "n_above_any", "mean_coverage", "red_coverage", "blue_coverage")


def band_codes(act: torch.Tensor, sel: Selection) -> torch.Tensor:
    """2-bit band code of every activation, as uint8, same shape as ``act``."""
    code = (act < sel.low).to(torch.uint8)
    code.masked_fill_(act > sel.high, 2)
    return code.masked_fill_(act > sel.red, 3)


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """Pack 2-bit codes along the last dim, four a byte: (..., T) -> (..., ceil(T / 4)), all in uint8."""
    t = codes.shape[-1]
    pad = (-t) % 4
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    quads = codes.reshape(*codes.shape[:-1], -1, 4)  # (..., T/4, 4)
    return quads[..., 0] | (quads[..., 1] << 2) | (quads[..., 2] << 4) | (quads[..., 3] << 6)


def reduce_layer(act: torch.Tensor, valid: torch.Tensor, sel: Selection) -> dict[str, torch.Tensor]:
    """Reduce one layer's activations to fixed-shape candidate rows.

    act:   [batch, pos, d_mlp] activations (any float dtype)
    valid: [batch, pos] bool, True on the prompt's own tokens (prompts start at position 0)

    Returns (B = batch, K = cap or d_mlp, W = ceil(pos / 4)):
      kept [B, K] bool, neuron [B, K] int32 (ascending among kept rows), max_act/min_act [B, K]
      float32, max_pos/min_pos/n_above/n_below [B, K] int16, bands [B, K, W] uint8, and per
      prompt n_selected/n_kept/n_above_any [B] int32 and, as [B] float32 means over the kept
      neurons of a fraction of the prompt's tokens: mean_coverage (above ``high``),
      red_coverage (above ``red``) and blue_coverage (below ``low``).
    """
    b, t, n = act.shape
    invalid = ~valid[:, :, None]  # [batch, pos, 1]
    hi = act.masked_fill(invalid, float("-inf"))
    max_act, max_pos = hi.max(dim=1)  # [batch, d_mlp]; first position on ties
    n_above = (hi > sel.high).sum(dim=1)
    del hi
    lo = act.masked_fill(invalid, float("inf"))
    min_act, min_pos = lo.min(dim=1)
    n_below = (lo < sel.low).sum(dim=1)
    del lo
    max_act, min_act = max_act.float(), min_act.float()

    selected = (max_act > sel.high) | (min_act < sel.low)  # [batch, d_mlp]
    score = torch.maximum(max_act - sel.high, sel.low - min_act).masked_fill(~selected, float("-inf"))
    k = n if sel.max_per_layer == 0 else min(sel.max_per_layer, n)
    ranked = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :k]  # [batch, K]
    ranked_kept = score.gather(1, ranked) > float("-inf")
    # Kept neurons in ascending index order, the dropped slots (sentinel n) last.
    neuron = torch.sort(torch.where(ranked_kept, ranked, n), dim=1).values
    kept = neuron < n
    idx = neuron.clamp(max=n - 1)  # [batch, K]

    bands, n_red = packed_bands(act, idx, invalid, sel)
    n_tokens = valid.sum(dim=1).clamp(min=1)  # [batch]
    n_above_k, n_below_k = n_above.gather(1, idx), n_below.gather(1, idx)
    n_kept = kept.sum(dim=1)
    per_token = (n_kept * n_tokens).clamp(min=1).float()  # [batch]

    def coverage(counts: torch.Tensor) -> torch.Tensor:  # [batch, K] token counts -> [batch]
        return (counts * kept).sum(dim=1).float() / per_token

    return {
        "kept": kept,
        "neuron": idx.to(torch.int32),
        "max_act": max_act.gather(1, idx),
        "max_pos": max_pos.gather(1, idx).to(torch.int16),
        "min_act": min_act.gather(1, idx),
        "min_pos": min_pos.gather(1, idx).to(torch.int16),
        "n_above": n_above_k.to(torch.int16),
        "n_below": n_below_k.to(torch.int16),
        "bands": bands,
        "n_selected": selected.sum(dim=1).to(torch.int32),
        "n_kept": n_kept.to(torch.int32),
        "n_above_any": (max_act > sel.high).sum(dim=1).to(torch.int32),
        "mean_coverage": coverage(n_above_k),
        "red_coverage": coverage(n_red),
        "blue_coverage": coverage(n_below_k),
    }


def packed_bands(act: torch.Tensor, idx: torch.Tensor, invalid: torch.Tensor, sel: Selection, chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Band codes of the neurons ``idx`` [batch, K], packed: [batch, K, ceil(pos / 4)] uint8,
    and how many of the prompt's tokens are red for each: [batch, K] int32.

    Done ``chunk`` neurons at a time, so that keeping every neuron (--max-per-layer 0) costs
    a few chunk-sized temporaries instead of several copies of the layer's activations.
    """
    b, t, _ = act.shape
    k = idx.shape[1]
    out = torch.empty(b, k, (t + 3) // 4, dtype=torch.uint8, device=act.device)
    n_red = torch.empty(b, k, dtype=torch.int32, device=act.device)
    for lo in range(0, k, chunk):
        cols = idx[:, lo : lo + chunk]  # [batch, C]
        act_c = act.gather(2, cols[:, None, :].expand(b, t, cols.shape[1]))  # [batch, pos, C]
        codes = band_codes(act_c, sel).masked_fill_(invalid, 0).transpose(1, 2)  # [batch, C, pos]
        out[:, lo : lo + chunk] = pack_codes(codes)
        n_red[:, lo : lo + chunk] = (codes == 3).sum(dim=2)
    return out, n_red


def compact(layers: list[dict[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Stack a stage's per-layer outputs and keep only the kept rows, on the device.

    Returns ``rows`` (M kept rows: ``layer_offset`` and ``row`` index the stage's layer and the
    batch row, plus ROW_FIELDS) and ``per_prompt`` ([L, B] arrays of PROMPT_FIELDS). The
    ``nonzero`` here is the stage's one host synchronisation per micro-batch.
    """
    kept = torch.stack([layer["kept"] for layer in layers])  # [L, B, K]
    where = kept.nonzero()  # [M, 3]: layer offset, batch row, slot
    rows = {"layer_offset": where[:, 0].to(torch.int16), "row": where[:, 1].to(torch.int32)}
    for name in ROW_FIELDS:
        stacked = torch.stack([layer[name] for layer in layers])  # [L, B, K, ...]
        rows[name] = stacked[where[:, 0], where[:, 1], where[:, 2]]
    per_prompt = {name: torch.stack([layer[name] for layer in layers]) for name in PROMPT_FIELDS}
    return rows, per_prompt
