"""The cap across tensor-parallel ranks: each rank's kept candidates merged into the whole layer's.

Under tensor parallelism (`--tensor-parallel T`) each rank of a stage holds a contiguous slice
of every layer's neurons and reduces only those. The per-(prompt, layer) cap must still be the
one `workers.reduce.pick_neurons` takes over the whole layer, and it is, from each rank's own
pick alone: a neuron among the ``k`` best of the layer is among the ``k`` best of its slice
(ties go to the lower index, and a slice's indices are in the layer's order), so each rank's
``k`` candidates, [batch, k] ranks and global indices, hold every kept neuron. Merging them
needs ``T x k`` values a prompt, never the activations.

`reduce_ranked` is `workers.reduce.reduce_layer` for a rank's slice: the candidates are
gathered from every rank of the group, each rank fills the kept rows of its own neurons, and a
sum over the ranks (every other rank adds zeros) gives each the whole layer's rows, bit for bit
those of `reduce_layer` on the whole layer's activations. Per layer that is one all-gather of
``T x B x (2k + 1)`` integers and two all-reduces of the kept rows (``B x k`` values a field and
their band codes), issued on the calling stream: no host synchronisation.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from neuroscan.config import Selection
from neuroscan.errors import UserError
from workers.fused import kept_rows_fused, pick_fused
from workers.reduce import (
    GATED_FIELDS,
    cap,
    is_selected,
    kept_rows,
    layer_rows,
    pick_neurons,
    scored,
    up_at_extremes,
)
from workers.thresholds import thresholds

GROUP_TIMEOUT_S = 600
"""How long a rank waits for the others of its group (to join it, in a collective, for its next
micro-batch) before it gives up: the ranks of a stage run the same micro-batches in step."""


class Turns:
    """A tensor-parallel rank's micro-batches, launched in the order the driver sent them.

    Every rank of a group gets each micro-batch with the same ``turn`` (0, 1, 2 ...). Ray may
    start a threaded actor's calls in any order, and the group's collectives pair up only when
    every rank runs them in the same order: each call waits for its turn (`take`) and passes it
    on once its collectives are queued (`pass_on`). A call waits at most ``timeout_s`` without
    any turn passing; once the group is broken (`fail`), every call raises its line.
    """

    def __init__(self, timeout_s: float = GROUP_TIMEOUT_S):
        self.timeout_s = timeout_s
        self.next = 0
        self.broken: str | None = None
        self.changed = threading.Condition()

    def take(self, turn: int) -> None:
        """Wait for ``turn``: `UserError` if the group is broken, `TimeoutError` if no turn
        passed for ``timeout_s``."""
        with self.changed:
            seen, deadline = self.next, time.monotonic() + self.timeout_s
            while self.broken is None and self.next != turn:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"micro-batch turn {turn} waited {self.timeout_s:.0f} s for turn {self.next}, which never came"
                    )
                self.changed.wait(left)
                if self.next != seen:  # the group goes on: wait again as long
                    seen, deadline = self.next, time.monotonic() + self.timeout_s
            if self.broken is not None:
                raise UserError(self.broken)

    def pass_on(self) -> None:
        with self.changed:
            self.next += 1
            self.changed.notify_all()

    def fail(self, line: str) -> str:
        """Mark the group broken (the first line stays); returns the line every call raises."""
        with self.changed:
            self.broken = self.broken or line
            self.changed.notify_all()
            return self.broken


@dataclass(frozen=True)
class Slice:
    """A rank's neurons of every layer: ``width`` of them from ``offset``, of ``total``."""

    offset: int
    width: int
    total: int


def merge_candidates(
    ranks: torch.Tensor, neurons: torch.Tensor, n_selected: torch.Tensor, k: int, n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's kept neurons from every rank's candidates.

    ranks, neurons: [T, batch, k] each rank's candidates (`pick_neurons` on its slice, indices
    made global; a slot left over holds index ``n`` and any rank); n_selected: [T, batch] each
    slice's selected count; k: the cap; n: the layer's width. Returns what `pick_neurons` gives
    on the whole layer: the kept indices ascending, then ``n`` in the slots left over, [batch, k]
    int64; and how many neurons are selected, [batch] int32. Fixed shapes, no host sync.
    """
    t, b, _ = ranks.shape
    rank = ranks.permute(1, 0, 2).reshape(b, -1)  # [batch, T * k]
    index = neurons.permute(1, 0, 2).reshape(b, -1).long()
    real = (index < n) & is_selected(rank)
    # The best first, ties to the lower index: by index, then (stably) by rank, descending.
    by_index = index.masked_fill(~real, n).argsort(dim=1, stable=True)
    rank_sorted = rank.gather(1, by_index).masked_fill(~real.gather(1, by_index), torch.iinfo(torch.int32).min)
    best = by_index.gather(1, rank_sorted.argsort(dim=1, descending=True, stable=True))[:, :k]  # [batch, k]
    kept = index.gather(1, best).masked_fill(~real.gather(1, best), n)
    return kept.sort(dim=1).values, n_selected.sum(dim=0).to(torch.int32)


SUMMED_FLOATS = ("max_act", "min_act", *GATED_FIELDS)
"""A kept row's float32 fields: summed over the ranks as their int32 bits."""
SUMMED_INTS = ("max_pos", "min_pos", "n_above", "n_below", "n_red")
"""A kept row's integer fields: summed over the ranks as int32."""


def reduce_ranked(
    act: torch.Tensor,
    n_tokens: torch.Tensor,
    sel: Selection,
    part: Slice,
    fused: bool = False,
    up: torch.Tensor | None = None,
    group=None,
) -> dict[str, torch.Tensor]:
    """`workers.reduce.reduce_layer` of the whole layer, from this rank's slice ``act``
    [batch, pos, part.width] (and ``up``'s) and the other ranks of ``group`` (the default: every
    rank) doing the same with theirs. Every rank returns the same rows."""
    b, n_local, n = act.shape[0], act.shape[2], part.total
    stats, rank = scored(act, n_tokens, sel, fused)
    high, low, _ = thresholds(sel, act.dtype)
    k = cap(sel, n)
    local, n_selected = (pick_fused if fused else pick_neurons)(rank, min(k, n_local))
    found = local < n_local
    candidates = torch.full((b, 2 * k + 1), n, dtype=torch.int64, device=act.device)
    width = local.shape[1]
    candidates[:, :width] = rank.gather(1, local.clamp(max=n_local - 1))
    candidates[:, k : k + width] = torch.where(found, local + part.offset, n)
    candidates[:, 2 * k] = n_selected
    everyone = [torch.empty_like(candidates) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, candidates, group=group)
    gathered = torch.stack(everyone)  # [T, batch, 2k + 1]
    kept_neurons, n_selected = merge_candidates(
        gathered[:, :, :k].to(torch.int32), gathered[:, :, k : 2 * k], gathered[:, :, 2 * k], k, n
    )
    kept = kept_neurons < n
    mine = kept & (kept_neurons >= part.offset) & (kept_neurons < part.offset + n_local)
    idx = (kept_neurons - part.offset).clamp(0, n_local - 1)
    picked = (kept_rows_fused if fused else kept_rows)(act, idx, n_tokens, stats, sel)
    if up is not None:
        picked.update(up_at_extremes(up, idx, picked))
    counts = {
        "n_above_any": (stats["max_act"] > high).sum(dim=1).to(torch.int32),
        "n_below_any": (stats["min_act"] < low).sum(dim=1).to(torch.int32),
    }
    whole, counts = _summed(picked, counts, mine, group)
    return layer_rows(kept, kept_neurons.clamp(max=n - 1), whole, {"n_selected": n_selected, **counts}, n_tokens)


def _summed(
    picked: dict[str, torch.Tensor], counts: dict[str, torch.Tensor], mine: torch.Tensor, group
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Every rank's kept rows in one: each rank's own slots (``mine``) and zeros elsewhere,
    summed over the group (float32 fields as their bits, which a sum with zeros keeps); and the
    per-prompt ``counts`` summed over the group."""
    floats = [name for name in SUMMED_FLOATS if name in picked]
    ints = torch.stack(
        [
            *(picked[name].view(torch.int32) for name in floats),
            *(picked[name].to(torch.int32) for name in SUMMED_INTS),
        ]
    ).masked_fill(~mine, 0)  # [fields, batch, K]
    per_prompt = torch.stack(list(counts.values()))  # [2, batch]
    flat = torch.cat([ints.flatten(), per_prompt.flatten()])
    bands = picked["bands"].masked_fill(~mine[:, :, None], 0)
    dist.all_reduce(flat, group=group)
    dist.all_reduce(bands, group=group)
    ints, per_prompt = flat[: ints.numel()].view_as(ints), flat[ints.numel() :].view_as(per_prompt)
    whole = {name: ints[i].view(torch.float32) for i, name in enumerate(floats)}
    for i, name in enumerate(SUMMED_INTS, start=len(floats)):
        whole[name] = ints[i].to(picked[name].dtype)
    whole["bands"] = bands
    return whole, dict(zip(counts, per_prompt))
