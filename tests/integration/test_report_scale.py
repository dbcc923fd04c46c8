"""The report's size stays bounded for 10,000 prompts: a fixed number of pages, each of a size
that does not grow with the corpus; data in chunks of a bounded size, at most ``--strips``
rows a (prompt, layer). Tables built by the aggregator itself, no model needed."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from aggregator.aggregator import Aggregator
from neuroscan.config import ReportConfig, ScanConfig
from neuroscan.manifest import ModelInfo, SelectionInfo
from neuroscan.messages import StageRows, Tokenized
from report import data
from report.site import build
from tests.manifests import header
from tests.runs import random_micro_batch

N_PROMPTS, BATCH, LAYERS, ROWS, TOKENS = 10_000, 250, 2, 48, 96
HEADER = header(
    model=ModelInfo(id="synthetic", path="", dtype="float16"),
    selection=SelectionInfo(high=3.0, low=0.0, max_per_layer=ROWS),
    stages=1,
    partition=[[0, LAYERS]],
)


def micro_batch(batch_id: int, rng: np.random.Generator) -> tuple[list[Tokenized], StageRows]:
    neurons = np.tile(np.sort(rng.choice(4096, ROWS, replace=False)), LAYERS * BATCH)
    return random_micro_batch(batch_id, rng, BATCH, LAYERS, neurons, TOKENS, families=7)


def test_ten_thousand_prompts_make_a_bounded_report(tmp_path):
    rng = np.random.default_rng(0)
    agg = Aggregator(str(tmp_path), HEADER, [chr(i) for i in range(256)], rows_per_part=200_000)
    for b in range(N_PROMPTS // BATCH):
        agg.add(*micro_batch(b, rng))
    agg.finish({"seconds": 1.0, "tokens_per_s": 1.0})
    options = ReportConfig(dir=str(tmp_path), strips=16, neurons_per_layer=20, chunk=200)
    index = build(options)

    site = index.parent
    pages = sorted(site.rglob("*.html"))
    assert len(pages) == 1 + LAYERS + LAYERS * options.neurons_per_layer  # not one page per prompt
    assert max(p.stat().st_size for p in pages) < 100_000
    chunks = sorted((site / "data").rglob("*.js"))
    assert len(chunks) == 2 + (LAYERS + 1) * (N_PROMPTS // options.chunk)  # config, index, prompt and layer chunks
    per_strip = 100 + TOKENS  # JSON numbers and base64 band codes
    assert max(c.stat().st_size for c in chunks) < options.chunk * options.strips * per_strip + 1_000_000
    strips = sum(len(v) for c in (site / "data").glob("layer-*/*.js") for v in _payload(c).values())
    assert strips == N_PROMPTS * LAYERS * options.strips


def test_strips_pick_firing_neurons_first_then_the_widest():
    rows = pa.table(
        {
            "prompt_id": [1, 1, 1, 1, 2, 2, 2],
            "neuron": [5, 3, 9, 7, 1, 2, 3],
            "n_above": [0, 2, 1, 0, 0, 0, 4],
            "n_below": [10, 1, 0, 9, 8, 8, 0],
        }
    )
    picked = data.strips(rows, np.array([1, 2]), np.array([10, 10]), 2).to_pydict()
    assert list(zip(picked["prompt_id"], picked["neuron"])) == [(1, 5), (1, 3), (2, 1), (2, 3)]
    assert picked["coverage"] == sorted(picked["coverage"][:2], reverse=True) + sorted(
        picked["coverage"][2:], reverse=True
    )


def _payload(path):
    import json

    text = path.read_text()
    return json.loads(text[text.index("] = ") + 4 : -2])


def test_a_layer_that_kept_nothing_still_gets_its_page(tmp_path):
    rng = np.random.default_rng(1)
    agg = Aggregator(str(tmp_path), HEADER, [chr(i) for i in range(256)], rows_per_part=ScanConfig.rows_per_part)
    group, rows = micro_batch(0, rng)
    first = rows.rows["layer_offset"] == 0
    rows.rows = {name: array[first] for name, array in rows.rows.items()}  # layer 1 kept no neuron
    agg.add(group, rows)
    agg.finish({"seconds": 1.0, "tokens_per_s": 1.0})
    site = build(ReportConfig(dir=str(tmp_path))).parent
    assert (site / "layers" / "01.html").exists()
    assert _payload(site / "data" / "layer-01" / "0000.js") == {}
    assert _payload(site / "data" / "layer-00" / "0000.js")
