"""neurons/: the streamed top-k merge against a brute-force sort."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from aggregator.neurons import LayerState, empty_state, layer_delta, merge_top_k
from neuroscan.schema import ACTIVATIONS


def brute_force(neuron, act, prompt_id, pos, k):
    out = {}
    for n in np.unique(neuron):
        rows = sorted(zip(-act[neuron == n], prompt_id[neuron == n], pos[neuron == n]))[:k]
        out[int(n)] = ([p for _, p, _ in rows], [-a for a, _, _ in rows], [q for _, _, q in rows])
    return out


@pytest.mark.parametrize("k, chunks", [(1, 1), (3, 4), (5, 7), (50, 3)])
def test_merge_top_k_matches_brute_force(k, chunks):
    rng = np.random.default_rng(k)
    m = 600
    neuron = rng.integers(0, 40, m).astype(np.int32)
    act = np.round(rng.normal(size=m), 1).astype(np.float32)  # rounded: many ties
    prompt_id = rng.permutation(m).astype(np.int64)
    pos = rng.integers(0, 100, m).astype(np.int16)
    state = empty_state()
    for part in np.array_split(np.arange(m), chunks):
        state = merge_top_k(state, neuron[part], act[part], prompt_id[part], pos[part], k)
    want = brute_force(neuron, act, prompt_id, pos, k)
    for n, (pids, acts, poss) in want.items():
        sel = state["neuron"] == n
        assert state["prompt_id"][sel].tolist() == pids
        assert state["act"][sel].tolist() == pytest.approx(acts)
        assert state["pos"][sel].tolist() == poss


def test_merged_part_deltas_equal_one_pass_over_all_rows():
    rows = [(0, 1, 4.0, 2), (1, 1, 3.6, 0), (2, 1, 1.0, 5), (0, 2, -0.5, 1), (3, 1, 4.0, 7), (4, 2, 0.2, 3)]
    table = pa.table(
        {
            "prompt_id": [r[0] for r in rows],
            "layer": [3] * 6,
            "neuron": [r[1] for r in rows],
            "max_act": [r[2] for r in rows],
            "max_pos": [r[3] for r in rows],
            "min_act": [0.0] * 6,
            "min_pos": [0] * 6,
            "n_above": [0] * 6,
            "n_below": [0] * 6,
            "bands": [b""] * 6,
            "up_at_max": [None] * 6,
            "up_at_min": [None] * 6,
        },
        schema=ACTIVATIONS,
    )
    merged = LayerState(k=2)
    for part in (table.slice(0, 2), table.slice(2, 3), table.slice(5)):  # three committed parts
        merged.add_table(layer_delta(3, part, k=2, red=3.5))
    one_pass = LayerState(k=2)
    one_pass.add_rows(*(table[c].to_numpy() for c in ("neuron", "max_act", "prompt_id", "max_pos")), red=3.5)
    assert merged.table(3).equals(one_pass.table(3))
    got = {r["neuron"]: r for r in merged.table(3).to_pylist()}
    assert set(got) == {1, 2}
    assert got[1]["layer"] == 3 and got[1]["n_prompts"] == 4 and got[1]["n_red"] == 3 and got[1]["max_act"] == 4.0
    assert got[1]["top_prompt_ids"] == [0, 3] and got[1]["top_pos"] == [2, 7]  # tie at 4.0: lower prompt id first
    assert (
        got[2]["top_prompt_ids"] == [4, 0] and got[2]["top_acts"] == pytest.approx([0.2, -0.5]) and got[2]["n_red"] == 0
    )


@pytest.mark.parametrize("fold_rows", [1, 7, 10**9])
def test_neurons_table_from_part_files_equals_one_pass_however_often_it_folds(tmp_path, monkeypatch, fold_rows):
    """Folding a layer's pending deltas after every part, every few, or only at the end gives
    the same table as one pass over all rows (three layers, eight parts written as files)."""
    import numpy as np
    import pyarrow.compute as pc

    from aggregator import neurons
    from aggregator.writer import write_table

    monkeypatch.setattr(neurons, "FOLD_ROWS", fold_rows)
    rng = np.random.default_rng(fold_rows % 1000)
    parts, everything = [], {layer: [] for layer in range(3)}
    for part in range(8):
        acts = {}
        for layer in range(3):
            m = 40
            acts[layer] = pa.table(
                {
                    "prompt_id": rng.integers(0, 50, m) + 100 * part,
                    "neuron": rng.integers(0, 12, m).astype(np.int32),
                    "max_act": rng.choice([1.0, 3.0, 3.75, 4.0], m).astype(np.float32),  # ties across parts
                    "max_pos": rng.integers(0, 9, m).astype(np.int16),
                }
            )
            everything[layer].append(acts[layer])
        delta = pa.concat_tables([layer_delta(layer, rows, k=3, red=3.5) for layer, rows in acts.items()])
        f = write_table(delta, tmp_path, f"neuron_parts/part-{part:05d}", "parquet")
        parts.append(f)
    table = neurons.neurons_table(tmp_path, parts, "parquet", k=3)
    for layer in range(3):
        one_pass = LayerState(k=3)
        rows = pa.concat_tables(everything[layer])
        one_pass.add_rows(*(rows[c].to_numpy() for c in ("neuron", "max_act", "prompt_id", "max_pos")), red=3.5)
        mine = table.filter(pc.equal(table["layer"], layer))
        assert mine.equals(one_pass.table(layer))


@pytest.mark.parametrize("seed", range(6))
def test_top_order_is_lexsorts_order(seed):
    """One keyed sort gives the order of lexsort((prompt_id, -act, neuron)), ties, signed zeros,
    infinities, denormals and NaN included."""
    from aggregator.neurons import top_order

    rng = np.random.default_rng(seed)
    m = 2000
    neuron = rng.integers(0, 30, m).astype(np.int32)
    special = np.array([0.0, -0.0, 1.5, -1.5, np.inf, -np.inf, np.nan, 1e-40, -1e-40], np.float32)
    act = np.where(rng.random(m) < 0.5, rng.choice(special, m), rng.normal(size=m).astype(np.float16)).astype(
        np.float32
    )
    prompt_id = rng.permutation(10 * m)[:m].astype(np.int64)
    assert (top_order(neuron, act, prompt_id) == np.lexsort((prompt_id, -act, neuron))).all()


def test_folds_are_spread_over_the_parts(monkeypatch):
    """After a part, one layer in FOLD_SPREAD is due (the fullest), and every layer at
    FOLD_ROWS entries: not every layer at once every few parts."""
    from aggregator import neurons

    monkeypatch.setattr(neurons, "FOLD_ROWS", 80)
    merge = neurons.NeuronsMerge(k=3)
    merge.pending_rows.update({layer: 20 + layer for layer in range(16)})  # 16 layers, each past FOLD_ROWS / 8
    assert merge.due() == [15, 14]
    merge.pending_rows.update({3: 80, 4: 5})
    assert merge.due() == [3, 15]
    merge.pending_rows.update({layer: 90 for layer in range(16)})
    assert sorted(merge.due()) == list(range(16))  # all at the cap: all due
    merge.pending_rows.update({layer: 9 for layer in range(16)})
    assert merge.due() == []  # under an eighth of the cap: nothing due
