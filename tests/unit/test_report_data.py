"""The report's pure readers (no browser): the family shares a neuron page shows."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from report.data import family_frequency


def test_family_frequency_is_the_share_of_each_familys_prompts_that_kept_the_neuron():
    rng = np.random.default_rng(3)
    ids = np.arange(0, 200, 2)  # sorted prompt ids, not 0..n-1
    family = np.array(rng.choice(["days", "colors", "(none)", "letters"], len(ids)))
    size = dict(Counter(family.tolist()))
    pick = rng.integers(0, len(ids), 300)
    rows = pa.table({"prompt_id": ids[pick], "neuron": rng.integers(0, 6, 300).astype(np.int32)})
    rows = pa.Table.from_pylist(
        list({(r["prompt_id"], r["neuron"]): r for r in rows.to_pylist()}.values())
    )  # one row a (prompt, neuron)
    expected: dict[int, Counter] = {}
    for r in rows.to_pylist():
        expected.setdefault(r["neuron"], Counter())[family[np.searchsorted(ids, r["prompt_id"])]] += 1
    got = family_frequency(rows, ids, family, size)
    assert set(got) == set(expected)
    for neuron, counts in expected.items():
        assert list(got[neuron]) == sorted(counts)  # families in name order
        assert got[neuron] == pytest.approx({f: c / size[f] for f, c in counts.items()})
