"""results.strips: a prompt's token strips as HTML for Jupyter, escaped."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from results.strips import Strips


def test_tokens_are_escaped_and_coloured_by_band():
    prompt = {"prompt_id": 3, "id": "<b>x</b>", "tokens": ["<script>", "&", '"q"']}
    rows = pa.table({"neuron": [7], "max_act": [4.5], "max_pos": [2]})
    page = Strips(prompt, 5, rows, np.array([[3, 1, 0]], dtype=np.int8))._repr_html_()
    assert "<script>" not in page and "&lt;script&gt;" in page and "&amp;" in page and "&quot;q&quot;" in page
    assert "&lt;b&gt;x&lt;/b&gt;" in page and "layer 5: 1 kept neuron" in page
    assert page.count('title="red"') == 1 and page.count('title="blue"') == 1 and page.count('title="grey"') == 1
    assert page.count("outline:2px solid") == 1  # the peak token
    assert "neuron      7" in repr(Strips(prompt, 5, rows, np.array([[3, 1, 0]], dtype=np.int8)))


def test_a_prompt_with_no_kept_neuron_says_so():
    prompt = {"prompt_id": 0, "id": "a", "tokens": ["a"]}
    empty = pa.table({"neuron": pa.array([], pa.int32()), "max_act": pa.array([], pa.float32()), "max_pos": []})
    strips = Strips(prompt, 1, empty, np.zeros((0, 1), np.int8))
    assert repr(strips).endswith("no neuron kept") and "0 kept neurons" in strips._repr_html_()
