"""The aggregator's pace alone (CPU only; no model, no Ray): how many micro-batches a second it takes.

    python -m bench.aggregate DIR [--batches 16] [--prompts 32] [--tokens 256] [--layers 28] [--kept 500]

Feeds `aggregator.aggregator.Aggregator` micro-batches shaped like a GPT-J-6B scan's (by
default run 6's: 32 prompts of 256 tokens, 28 layers x 500 kept neurons, 448,000 rows a
micro-batch), then finishes the run. Prints the time of ``add`` (what the driver's loop waits
on for each micro-batch), the whole rate including the parts' commits and the end-of-run
merge. In a Ray scan the aggregator is one actor: at more micro-batches a second than it
takes, it sets the pace. A diagnostic for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np

from aggregator.aggregator import Aggregator
from neuroscan.config import ScanConfig
from neuroscan.manifest import BandEdges, Corpus, Manifest, ModelInfo, SelectionInfo
from neuroscan.messages import Prompt, StageRows, Tokenized
from neuroscan.schema import SCHEMA_VERSION

D_MLP = 16_384


def header(n_layers: int) -> Manifest:
    """A run's manifest as the driver starts it, for ``n_layers`` layers on one stage."""
    return Manifest(
        schema_version=SCHEMA_VERSION,
        model=ModelInfo(id="bench", path="", dtype="float32"),
        selection=SelectionInfo(high=3.0, low=0.0, max_per_layer=500),
        bands=BandEdges(low=0.0, high=3.0, red=3.5),
        stages=1,
        replicas=1,
        partition=[[0, n_layers]],
        device="cpu",
        handoff="store",
        batch_tokens=8192,
        top_k=20,
        format="parquet",
        truncate=False,
        corpus=Corpus(source="bench", sha256=None),
        versions={},
        started_at="",
    )


BAND_POOL = 4096


def band_rows(rng, tokens: int) -> np.ndarray:
    """BAND_POOL packed band rows [BAND_POOL, ceil(tokens / 4)] uint8, mostly grey as a real
    scan's are (a kept neuron is blue on a tenth of the tokens, orange or red on a few), so
    that compression costs what it costs on real parts."""
    codes = rng.choice(4, size=(BAND_POOL, tokens), p=[0.85, 0.1, 0.03, 0.02]).astype(np.uint8)
    codes = np.pad(codes, ((0, 0), (0, -tokens % 4))).reshape(BAND_POOL, -1, 4)
    return codes[..., 0] | codes[..., 1] << 2 | codes[..., 2] << 4 | codes[..., 3] << 6


def micro_batch(batch_id: int, prompts: int, tokens: int, layers: int, kept: int, rng) -> tuple[list, StageRows]:
    """One micro-batch's prompts and the rows one stage holding every layer sends."""
    first = batch_id * prompts
    group = [Tokenized(Prompt(first + i, str(first + i), "t" * tokens), [65] * tokens, []) for i in range(prompts)]
    per_row = layers * prompts
    m = per_row * kept
    neuron = np.concatenate([np.sort(rng.choice(D_MLP, kept, replace=False)) for _ in range(per_row)]).astype(np.int32)
    rows = {
        "layer_offset": np.repeat(np.arange(layers), prompts * kept).astype(np.int16),
        "row": np.tile(np.repeat(np.arange(prompts), kept), layers).astype(np.int32),
        "neuron": neuron,
        "max_act": rng.normal(3, 1, m).astype(np.float32),
        "max_pos": rng.integers(0, tokens, m).astype(np.int16),
        "min_act": rng.normal(-0.1, 0.05, m).astype(np.float32),
        "min_pos": rng.integers(0, tokens, m).astype(np.int16),
        "n_above": rng.integers(0, 10, m).astype(np.int16),
        "n_below": rng.integers(0, tokens, m).astype(np.int16),
        "bands": band_rows(rng, tokens)[rng.integers(0, BAND_POOL, m)],
    }
    per_prompt = {
        name: np.full((layers, prompts), kept, np.int32)
        for name in ("n_selected", "n_kept", "n_above_any", "n_below_any")
    }
    for name in ("mean_coverage", "red_coverage", "blue_coverage"):
        per_prompt[name] = np.full((layers, prompts), 0.1, np.float32)
    predictions = {
        "top_ids": np.zeros((prompts, 5), np.int32),
        "top_probs": np.full((prompts, 5), 0.2, np.float32),
        "correct": np.full(prompts, -1, np.int8),
    }
    return group, StageRows(batch_id, 0, rows, per_prompt, predictions)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dir")
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--kept", type=int, default=500)
    args = parser.parse_args()
    out = Path(args.dir)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    made = [micro_batch(i, args.prompts, args.tokens, args.layers, args.kept, rng) for i in range(args.batches)]
    agg = Aggregator(
        str(out), header(args.layers), [chr(65 + i % 26) for i in range(256)], rows_per_part=ScanConfig.rows_per_part
    )
    adds = []
    t0 = time.perf_counter()
    for group, rows in made:
        t = time.perf_counter()
        agg.add(group, rows)
        adds.append(time.perf_counter() - t)
    fed = time.perf_counter() - t0
    agg.finish({})
    total = time.perf_counter() - t0
    m = len(made[0][1].rows["neuron"])
    print(
        f"{args.batches} micro-batches of {m:,} rows: add median {np.median(adds) * 1e3:.0f} ms, max {max(adds) * 1e3:.0f} ms; "
        f"fed in {fed:.2f} s ({args.batches / fed:.1f} a second); finished in {total:.2f} s "
        f"({args.batches / total:.1f} a second, end-of-run lag {total - fed:.2f} s)"
    )


if __name__ == "__main__":
    main()
