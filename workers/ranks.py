"""The cap across tensor-parallel ranks: each rank's kept candidates merged into the whole layer's.

Under tensor parallelism (`--tensor-parallel T`) each rank of a stage holds a contiguous slice
of every layer's neurons and reduces only those. The per-(prompt, layer) cap must still be the
one `workers.reduce.pick_neurons` takes over the whole layer, and it is, from each rank's own
pick alone: a neuron among the ``k`` best of the layer is among the ``k`` best of its slice
(ties go to the lower index, and a slice's indices are in the layer's order), so each rank's
``k`` candidates, [batch, k] ranks and global indices, hold every kept neuron. Merging them
needs ``T x k`` values a prompt, never the activations.
"""

from __future__ import annotations

import torch

from workers.reduce import is_selected


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
