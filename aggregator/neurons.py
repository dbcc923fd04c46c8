"""``neurons/``: per (layer, neuron), how many prompts kept it, how many it fired red on, its
corpus max, and its top-k prompts by max activation (Neuroscope's max-activating examples).

Kept incrementally: each committed part carries a delta (``neuron_parts/part-N``, listed with
the part's other files): the same table over that part's rows alone. Counts add, maxima take
the max and top-k lists merge, so the whole table is the merge of the committed parts'
deltas; the run's end writes it to ``neurons/``. A resumed run merges the same committed
deltas and gets the same table. Ties go to the lower prompt id.

The merge reads each delta once and folds a layer's pending deltas into its ``LayerState``
in one sort once they hold ``FOLD_ROWS`` entries (not one sort of the whole state per part,
which made the end of a 64-micro-batch GPU run wait 9.7 s), the last folds of all layers in
parallel. Memory is one ``LayerState`` per layer (at most d_mlp x k entries each) plus at
most ``FOLD_ROWS`` pending entries per layer, whatever the corpus.
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

from aggregator import schema


def merge_top_k(state: dict[str, np.ndarray], neuron: np.ndarray, act: np.ndarray, prompt_id: np.ndarray, pos: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Fold candidate rows into the per-neuron top-k (flat arrays sorted by neuron, act desc, prompt id)."""
    neuron = np.concatenate([state["neuron"], neuron])
    act = np.concatenate([state["act"], act])
    prompt_id = np.concatenate([state["prompt_id"], prompt_id])
    pos = np.concatenate([state["pos"], pos])
    order = np.lexsort((prompt_id, -act, neuron))
    neuron, act, prompt_id, pos = neuron[order], act[order], prompt_id[order], pos[order]
    keep = rank_within(neuron) < k
    return {"neuron": neuron[keep], "act": act[keep], "prompt_id": prompt_id[keep], "pos": pos[keep]}


def rank_within(group: np.ndarray) -> np.ndarray:
    """Each element's rank among its equal neighbours in a sorted ``group`` array (0, 1, 2...)."""
    return np.arange(len(group)) - np.searchsorted(group, group, side="left")


def empty_state() -> dict[str, np.ndarray]:
    return {"neuron": np.zeros(0, np.int32), "act": np.zeros(0, np.float32), "prompt_id": np.zeros(0, np.int64), "pos": np.zeros(0, np.int16)}


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
        flat = {name: pc.list_flatten(table[col]).to_numpy() for name, col in (("act", "top_acts"), ("prompt_id", "top_prompt_ids"), ("pos", "top_pos"))}
        self.top = merge_top_k(self.top, np.repeat(neuron, lengths), flat["act"], flat["prompt_id"], flat["pos"], self.k)

    def table(self, layer: int) -> pa.Table:
        present = np.flatnonzero(self.n_prompts)
        # The top-k entries are sorted by neuron and every present neuron has at least one:
        # each neuron's list is one slice of the flat arrays, so the offsets are its starts.
        offsets = np.searchsorted(self.top["neuron"], present).astype(np.int32)
        offsets = pa.array(np.r_[offsets, len(self.top["neuron"])].astype(np.int32))
        lists = {name: pa.ListArray.from_arrays(offsets, pa.array(self.top[name])) for name in ("prompt_id", "act", "pos")}
        return pa.table(
            [
                np.full(len(present), layer, np.int32), present.astype(np.int32), self.n_prompts[present], self.n_red[present],
                self.top["act"][offsets.to_numpy()[:-1]], lists["prompt_id"], lists["act"], lists["pos"],
            ],
            schema=schema.NEURONS,
        )


def layer_delta(layer: int, rows: pa.Table, k: int, red: float) -> pa.Table:
    """The neurons table of one layer's activation rows in one part (an ACTIVATIONS table)."""
    state = LayerState(k)
    state.add_rows(rows["neuron"].to_numpy(), rows["max_act"].to_numpy(), rows["prompt_id"].to_numpy(), rows["max_pos"].to_numpy(), red)
    return state.table(layer)


FOLD_ROWS = 2_000_000
"""Top-k entries a layer's pending deltas may hold before they are folded into its state."""


def neurons_table(out: Path, manifest: dict, k: int) -> pa.Table:
    """The whole table: the merge of the deltas of the parts the manifest lists."""
    fmt = "arrow" if manifest.get("format") == "arrow" else "parquet"
    states: dict[int, LayerState] = {}
    pending: dict[int, list[pa.Table]] = defaultdict(list)
    pending_rows: dict[int, int] = defaultdict(int)

    def fold(layer: int) -> None:
        if pending[layer]:
            states.setdefault(layer, LayerState(k)).add_table(pa.concat_tables(pending.pop(layer)))
            pending_rows[layer] = 0

    for part in manifest["parts"]:
        for f in part["files"]:
            if f["path"].startswith("neuron_parts/"):
                delta = ds.dataset(str(out / f["path"]), format=fmt).to_table()
                layer = delta["layer"].to_numpy()
                for value in np.unique(layer):
                    rows = delta.filter(pa.array(layer == value))
                    pending[int(value)].append(rows)
                    pending_rows[int(value)] += int(pc.sum(pc.list_value_length(rows["top_acts"])).as_py() or 0)
                    if pending_rows[int(value)] >= FOLD_ROWS:
                        fold(int(value))
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # numpy's sorts release the GIL
        list(pool.map(fold, list(pending)))
    tables = [state.table(layer) for layer, state in sorted(states.items())]
    return pa.concat_tables(tables) if tables else schema.NEURONS.empty_table()
