"""Small finished scans built by the aggregator itself (no model, no Ray), for tests of what
reads a scan's directory."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from aggregator.aggregator import Aggregator
from neuroscan.messages import Prompt, StageRows, Tokenized
from tests.manifests import HEADER
from tests.unit.test_aggregator import _group, _stage_rows

LENGTHS = [5, 3]


def finished_run(out: Path, batches: int = 4, rows_per_part: int = 12) -> Path:
    """A complete scan in ``out``: ``batches`` micro-batches of two prompts over three layers,
    a part every ``rows_per_part`` activation rows."""
    out.mkdir(parents=True, exist_ok=True)
    agg = Aggregator(str(out), HEADER, [chr(i) for i in range(256)], rows_per_part)
    for b in range(batches):
        ids = [2 * b, 2 * b + 1]
        agg.add(_group(ids, LENGTHS), _stage_rows(b, 0, 2, LENGTHS, last=False), _stage_rows(b, 2, 1, LENGTHS))
    agg.finish({"seconds": 1.0})
    agg.close()
    return out


def random_micro_batch(
    batch_id: int, rng: np.random.Generator, size: int, layers: int, neurons: np.ndarray, tokens: int, families: int
) -> tuple[list[Tokenized], StageRows]:
    """One micro-batch of ``size`` prompts of ``tokens`` tokens over ``layers`` layers, as a
    last stage sends it: ``neurons`` ([layers * size * rows], ascending within each (layer,
    prompt)) kept, with random statistics and bands; prompt i is of family ``f{i % families}``."""
    ids = range(batch_id * size, (batch_id + 1) * size)
    group = [Tokenized(Prompt(i, f"p{i}", "x" * tokens, family=f"f{i % families}"), [65] * tokens, []) for i in ids]
    m = len(neurons)
    rows = m // (layers * size)
    stats = {
        "layer_offset": np.repeat(np.arange(layers), size * rows).astype(np.int16),
        "row": np.tile(np.repeat(np.arange(size), rows), layers).astype(np.int32),
        "neuron": neurons.astype(np.int32),
        "max_act": rng.uniform(0, 8, m).astype(np.float32),
        "max_pos": rng.integers(0, tokens, m).astype(np.int16),
        "min_act": rng.uniform(-1, 0, m).astype(np.float32),
        "min_pos": rng.integers(0, tokens, m).astype(np.int16),
        "n_above": rng.integers(0, tokens, m).astype(np.int16),
        "n_below": rng.integers(0, tokens, m).astype(np.int16),
        "bands": rng.integers(0, 256, (m, tokens // 4)).astype(np.uint8),
    }
    counts = ("n_selected", "n_kept", "n_above_any", "n_below_any")
    per_prompt = {k: np.full((layers, size), rows, np.int32) for k in counts}
    coverages = ("mean_coverage", "red_coverage", "blue_coverage")
    per_prompt |= {k: rng.uniform(0, 1, (layers, size)).astype(np.float32) for k in coverages}
    predictions = {
        "top_ids": np.zeros((size, 5), np.int32),
        "top_probs": np.full((size, 5), 0.2, np.float32),
        "correct": np.full(size, -1, np.int8),
    }
    return group, StageRows(batch_id, 0, stats, per_prompt, predictions)
