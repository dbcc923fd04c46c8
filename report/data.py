"""What the report shows, read from a scan's output directory: pure functions over Arrow tables.

Only committed files (those the manifest lists) are read, one layer at a time, so memory is
one layer's kept rows whatever the corpus.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from aggregator.neurons import rank_within
from results.run import Run


def prompts(run: Run) -> pa.Table:
    """One row per prompt, in prompt-id order: prompt_id, id, family, variant, tokens, n_tokens, expected, correct."""
    table = run.read("prompts", ["prompt_id", "id", "family", "variant", "tokens", "n_tokens", "expected", "correct"])
    return table.sort_by("prompt_id")


def layer_spread(run: Run, columns: list[str]) -> dict[str, np.ndarray]:
    """Per layer, the 25th, 50th and 75th percentile across prompts of each column of layers/:
    {column: [n_layers, 3]}."""
    table = run.read("layers", ["layer", *columns])
    layer = table["layer"].to_numpy()
    out = {}
    for column in columns:
        values = table[column].to_numpy().astype(np.float64)
        out[column] = np.array(
            [
                np.percentile(values[layer == i], [25, 50, 75]) if (layer == i).any() else [np.nan] * 3
                for i in range(run.n_layers)
            ]
        )
    return out


def top_neurons(run: Run, per_layer: int) -> pa.Table:
    """Each layer's ``per_layer`` most often red neurons (then highest corpus max, lower index)."""
    neurons = run.neurons()
    order = np.lexsort(
        (
            neurons["neuron"].to_numpy(),
            -neurons["max_act"].to_numpy(),
            -neurons["n_red"].to_numpy(),
            neurons["layer"].to_numpy(),
        )
    )
    neurons = neurons.take(order)
    return neurons.filter(pa.array(rank_within(neurons["layer"].to_numpy()) < per_layer))


def strips(rows: pa.Table, ids: np.ndarray, lengths: np.ndarray, per_prompt: int) -> pa.Table:
    """A layer's kept rows cut to ``per_prompt`` a prompt (0: all), in display order: widest coverage first.

    coverage = (tokens above high + tokens below low) / prompt tokens. GELU is negative on every
    negative input, so the widest strips are almost all blue: half the strips (rounded up) go
    to the neurons that fire above ``high`` on most tokens, the rest to the widest of the
    others. Ties go to the lower neuron index. ``ids`` (sorted) and ``lengths``: every prompt's
    id and token count.
    """
    prompt_id = rows["prompt_id"].to_numpy()
    neuron = rows["neuron"].to_numpy()
    length = lengths[np.searchsorted(ids, prompt_id)].astype(np.float64)
    above = rows["n_above"].to_numpy().astype(np.float64)
    coverage = (above + rows["n_below"].to_numpy()) / np.maximum(length, 1)
    if per_prompt == 0:  # every kept neuron
        keep = np.lexsort((neuron, -coverage, prompt_id))
        return rows.take(pa.array(keep)).append_column("coverage", pa.array(coverage[keep], pa.float32()))
    firing = -(-per_prompt // 2)
    order = np.lexsort((neuron, -coverage, -above, prompt_id))
    first = np.zeros(len(order), bool)
    first[order] = (rank_within(prompt_id[order]) < firing) & (above[order] > 0)
    row_prompt = np.searchsorted(ids, prompt_id)  # each row's prompt, as an index into ids
    budget = per_prompt - np.bincount(row_prompt[first], minlength=len(ids))[row_prompt]
    rest = np.flatnonzero(~first)
    rest = rest[np.lexsort((neuron[rest], -coverage[rest], prompt_id[rest]))]
    second = rest[rank_within(prompt_id[rest]) < budget[rest]]
    keep = np.concatenate([np.flatnonzero(first), second])
    keep = keep[np.lexsort((neuron[keep], -coverage[keep], prompt_id[keep]))]
    return rows.take(pa.array(keep)).append_column("coverage", pa.array(coverage[keep], pa.float32()))


def family_frequency(
    rows: pa.Table, ids: np.ndarray, family: np.ndarray, family_size: dict[str, int]
) -> dict[int, dict[str, float]]:
    """For each neuron of ``rows`` (one layer's kept rows): per family, the fraction of that
    family's prompts on which the layer kept it. ``ids`` (sorted) and ``family``: every prompt's
    id and family name."""
    names = sorted(family_size)
    code = np.searchsorted(names, family)[np.searchsorted(ids, rows["prompt_id"].to_numpy())]  # each row's family
    pairs, counts = np.unique(rows["neuron"].to_numpy().astype(np.int64) * len(names) + code, return_counts=True)
    out: dict[int, dict[str, float]] = {}
    for pair, count in zip(pairs.tolist(), counts.tolist()):
        neuron, f = divmod(pair, len(names))
        out.setdefault(neuron, {})[names[f]] = count / family_size[names[f]]
    return out
