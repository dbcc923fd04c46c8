"""``neurons/``: per (layer, neuron), how many prompts kept it, how many it fired red on, its
corpus max, and its top-k prompts by max activation (Neuroscope's max-activating examples).

Kept incrementally: each committed part carries a delta (``neuron_parts/part-N``, listed with
the part's other files): the same table over that part's rows alone. Counts add, maxima take
the max and top-k lists merge, so the whole table is the merge of the committed parts'
deltas; the run's end writes it to ``neurons/``. Ties go to the lower prompt id.

`NeuronsMerge` holds the merge: per layer a `LayerState` and the deltas not yet folded into
it, folded in one sort once they hold enough entries (at most ``FOLD_ROWS``; not one sort of
the whole state per part), a few layers after each part. The aggregator adds each part's
deltas once the part is committed and folds on its committer thread, so the run's end folds
at most ``FOLD_ROWS`` entries a layer and reads nothing back, however long the run. A
resumed run rebuilds the same merge from the committed deltas on disk (`read_merge`) and
gets the same table. Memory is one ``LayerState`` per layer (at most d_mlp x k entries
each) plus at most ``FOLD_ROWS`` pending entries a layer.

Sorting by (neuron, activation descending, prompt id) is one stable sort of a 64-bit key
(`top_order`): the concatenated deltas are sorted runs, which a stable sort merges in about
linear time, where a three-key ``lexsort`` sorted everything three times (~5x slower).
"""

from __future__ import annotations

import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from neuroscan import schema
from neuroscan.manifest import PartFile


def merge_top_k(
    state: dict[str, np.ndarray], neuron: np.ndarray, act: np.ndarray, prompt_id: np.ndarray, pos: np.ndarray, k: int
) -> dict[str, np.ndarray]:
    """Fold candidate rows into the per-neuron top-k (flat arrays sorted by neuron, act desc, prompt id)."""
    neuron = np.concatenate([state["neuron"], neuron])
    act = np.concatenate([state["act"], act])
    prompt_id = np.concatenate([state["prompt_id"], prompt_id])
    pos = np.concatenate([state["pos"], pos])
    order = top_order(neuron, act, prompt_id)
    neuron, act, prompt_id, pos = neuron[order], act[order], prompt_id[order], pos[order]
    keep = rank_within(neuron) < k
    return {"neuron": neuron[keep], "act": act[keep], "prompt_id": prompt_id[keep], "pos": pos[keep]}


def top_order(neuron: np.ndarray, act: np.ndarray, prompt_id: np.ndarray) -> np.ndarray:
    """The order of rows by neuron, then activation descending, then prompt id: the order of
    ``np.lexsort((prompt_id, -act, neuron))`` (NaN last, -0.0 equal to 0.0), from one stable
    sort of the key (neuron, activation's bits) and a second sort of the rows whose key ties."""
    key = neuron.astype(np.uint64) << np.uint64(32) | descending_bits(act)
    order = np.argsort(key, kind="stable")
    ranked = key[order]
    tied = np.flatnonzero(ranked[1:] == ranked[:-1])
    if len(tied):  # equal (neuron, activation): order those rows by prompt id within each group
        members = np.union1d(tied, tied + 1)
        rows = order[members]
        order[members] = rows[np.lexsort((prompt_id[rows], ranked[members]))]
    return order


def descending_bits(act: np.ndarray) -> np.ndarray:
    """uint64 keys of float32 ``act`` that sort as the values do, descending (NaN last)."""
    bits = (act.astype(np.float32, copy=False) + np.float32(0)).view(np.uint32)  # -0.0 + 0.0 is 0.0
    ascending = np.where(bits >> np.uint32(31) != 0, ~bits, bits | np.uint32(1 << 31))
    return np.where(np.isnan(act), np.uint32(0xFFFFFFFF), ~ascending).astype(np.uint64)


def rank_within(group: np.ndarray) -> np.ndarray:
    """Each element's rank among its equal neighbours in a sorted ``group`` array (0, 1, 2...)."""
    return np.arange(len(group)) - np.searchsorted(group, group, side="left")


def empty_state() -> dict[str, np.ndarray]:
    return {
        "neuron": np.zeros(0, np.int32),
        "act": np.zeros(0, np.float32),
        "prompt_id": np.zeros(0, np.int64),
        "pos": np.zeros(0, np.int16),
    }


class LayerState:
    """Running counts and top-k of one layer's neurons (a neuron's max is the head of its top-k)."""

    def __init__(self, k: int):
        self.k = k
        self.n_prompts = np.zeros(0, np.int64)
        self.n_red = np.zeros(0, np.int64)
        self.top = empty_state()

    def _grow(self, size: int) -> None:
        pad = size - len(self.n_prompts)
        if pad > 0:
            self.n_prompts = np.pad(self.n_prompts, (0, pad))
            self.n_red = np.pad(self.n_red, (0, pad))

    def add_rows(self, neuron: np.ndarray, act: np.ndarray, prompt_id: np.ndarray, pos: np.ndarray, red: float) -> None:
        """Fold activation rows (one per kept (prompt, neuron)) in."""
        self._grow(int(neuron.max(initial=-1)) + 1)
        self.n_prompts += np.bincount(neuron, minlength=len(self.n_prompts))
        self.n_red += np.bincount(neuron[act > red], minlength=len(self.n_red))
        self.top = merge_top_k(self.top, neuron, act, prompt_id, pos, self.k)

    def add_table(self, table: pa.Table) -> None:
        """Fold another ``schema.NEURONS`` table of this layer in (a part's delta)."""
        neuron = table["neuron"].to_numpy()
        self._grow(int(neuron.max(initial=-1)) + 1)
        np.add.at(self.n_prompts, neuron, table["n_prompts"].to_numpy())
        np.add.at(self.n_red, neuron, table["n_red"].to_numpy())
        lengths = pc.list_value_length(table["top_acts"]).to_numpy()
        flat = {
            name: pc.list_flatten(table[col]).to_numpy()
            for name, col in (("act", "top_acts"), ("prompt_id", "top_prompt_ids"), ("pos", "top_pos"))
        }
        self.top = merge_top_k(
            self.top, np.repeat(neuron, lengths), flat["act"], flat["prompt_id"], flat["pos"], self.k
        )

    def table(self, layer: int) -> pa.Table:
        present = np.flatnonzero(self.n_prompts)
        # The top-k entries are sorted by neuron and every present neuron has at least one:
        # each neuron's list is one slice of the flat arrays, so the offsets are its starts.
        offsets = np.searchsorted(self.top["neuron"], present).astype(np.int32)
        offsets = pa.array(np.r_[offsets, len(self.top["neuron"])].astype(np.int32))
        lists = {
            name: pa.ListArray.from_arrays(offsets, pa.array(self.top[name])) for name in ("prompt_id", "act", "pos")
        }
        return pa.table(
            [
                np.full(len(present), layer, np.int32),
                present.astype(np.int32),
                self.n_prompts[present],
                self.n_red[present],
                self.top["act"][offsets.to_numpy()[:-1]],
                lists["prompt_id"],
                lists["act"],
                lists["pos"],
            ],
            schema=schema.NEURONS,
        )


def layer_delta(layer: int, rows: pa.Table, k: int, red: float) -> pa.Table:
    """The neurons table of one layer's activation rows in one part (an ACTIVATIONS table)."""
    state = LayerState(k)
    state.add_rows(
        rows["neuron"].to_numpy(),
        rows["max_act"].to_numpy(),
        rows["prompt_id"].to_numpy(),
        rows["max_pos"].to_numpy(),
        red,
    )
    return state.table(layer)


FOLD_ROWS = 1 << 18
"""Top-k entries a layer's pending deltas may hold before they are folded into its state."""
FOLD_SPREAD = 8
"""Layers folded after a part: one in FOLD_SPREAD (`NeuronsMerge.due`)."""


class NeuronsMerge:
    """The neurons table being built: per layer a `LayerState` and the deltas not yet in it."""

    def __init__(self, k: int):
        self.k = k
        self.states: dict[int, LayerState] = {}
        self.pending: dict[int, list[pa.Table]] = defaultdict(list)
        self.pending_rows: dict[int, int] = defaultdict(int)

    def add(self, layer: int, delta: pa.Table) -> None:
        """Queue one layer's delta (folded when `due`)."""
        self.pending[layer].append(delta)
        self.pending_rows[layer] += int(pc.sum(pc.list_value_length(delta["top_acts"])).as_py() or 0)

    def add_part(self, delta: pa.Table) -> None:
        """Queue a part's delta (any layers)."""
        layer = delta["layer"].to_numpy()
        for value in np.unique(layer):
            self.add(int(value), delta.filter(pa.array(layer == value)))

    def due(self) -> list[int]:
        """The layers to `fold` now: every layer holding ``FOLD_ROWS`` pending entries, and the
        fullest others holding an eighth of that, up to one layer in ``FOLD_SPREAD`` in all.
        Layers fill at the same pace; folding a few after each part, not all of them every
        few parts, keeps each part's commit about as long as the next (no stall of a second
        every eight parts for the driver to wait on)."""
        full = [layer for layer, n in self.pending_rows.items() if n >= FOLD_ROWS]
        room = -(-len(self.pending_rows) // FOLD_SPREAD) - len(full)
        filling = [layer for layer, n in self.pending_rows.items() if FOLD_ROWS // FOLD_SPREAD <= n < FOLD_ROWS]
        return full + sorted(filling, key=lambda layer: -self.pending_rows[layer])[: max(room, 0)]

    def fold(self, layer: int) -> None:
        """Fold ``layer``'s pending deltas into its state (layers may fold in parallel)."""
        if self.pending.get(layer):
            deltas = self.pending.pop(layer)
            self.pending_rows[layer] = 0
            self.states.setdefault(layer, LayerState(self.k)).add_table(pa.concat_tables(deltas))

    def table(self, pool: ThreadPoolExecutor | None = None) -> pa.Table:
        """The whole table so far (folds what is pending, every layer in parallel on ``pool``)."""
        layers = [layer for layer, deltas in self.pending.items() if deltas]
        if pool is None:
            with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as own:  # numpy's sorts release the GIL
                list(own.map(self.fold, layers))
        else:
            list(pool.map(self.fold, layers))
        tables = [state.table(layer) for layer, state in sorted(self.states.items())]
        return pa.concat_tables(tables) if tables else schema.NEURONS.empty_table()


def read_merge(out: Path, deltas: list[PartFile], fmt: str, k: int) -> NeuronsMerge:
    """The merge of the committed parts' deltas (``neuron_parts/`` files), read from disk."""
    merge = NeuronsMerge(k)
    for f in deltas:
        merge.add_part(ds.dataset(str(out / f.path), format=fmt).to_table())
        for layer in merge.due():
            merge.fold(layer)
    return merge


def neurons_table(out: Path, deltas: list[PartFile], fmt: str, k: int) -> pa.Table:
    """The whole table of the committed parts, from their deltas on disk."""
    return read_merge(out, deltas, fmt, k).table()
