"""The merge of ``neurons/`` from the committed deltas on disk timed alone (CPU only; no model, no Ray).

    python -m bench.merge DIR [--parts 32] [--layers 8] [--prompts-per-part 64] [--kept 500]

Writes ``--parts`` part deltas shaped like a GPT-J-6B run's (16,384 neurons, ``--kept``
random neurons kept per prompt and layer, random max activations), once, under DIR, then
times `aggregator.neurons.neurons_table` over them: the merge of every committed delta read
back from disk, which a resumed run (or a restarted aggregator) does once. An uninterrupted
run merges the deltas in memory as its parts commit (`python -m bench.aggregate` times that
run's end). A diagnostic for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa

from aggregator.neurons import layer_delta, neurons_table
from aggregator.writer import write_table
from neuroscan.manifest import PartFile

D_MLP = 16_384


def write_deltas(out: Path, parts: int, layers: int, prompts: int, kept: int) -> list[PartFile]:
    rng = np.random.default_rng(0)
    listed = []
    for part in range(parts):
        deltas = []
        for layer in range(layers):
            neuron = np.concatenate([np.sort(rng.choice(D_MLP, kept, replace=False)) for _ in range(prompts)]).astype(
                np.int32
            )
            m = len(neuron)
            rows = pa.table(
                {
                    "prompt_id": np.repeat(np.arange(prompts) + part * prompts, kept).astype(np.int64),
                    "neuron": neuron,
                    "max_act": rng.normal(3, 1, m).astype(np.float32),
                    "max_pos": rng.integers(0, 256, m).astype(np.int16),
                }
            )
            deltas.append(layer_delta(layer, rows, k=20, red=3.5))
        f = write_table(pa.concat_tables(deltas), out, f"neuron_parts/part-{part:05d}", "parquet")
        listed.append(f)
    return listed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dir")
    parser.add_argument("--parts", type=int, default=32)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--prompts-per-part", type=int, default=64)
    parser.add_argument("--kept", type=int, default=500)
    args = parser.parse_args()
    out = Path(args.dir)
    shape = [args.parts, args.layers, args.prompts_per_part, args.kept]
    saved = out / "merge-deltas.json"
    if saved.exists() and json.loads(saved.read_text())["shape"] == shape:
        deltas = [PartFile(**f) for f in json.loads(saved.read_text())["deltas"]]
    else:
        deltas = write_deltas(out, *shape)
        saved.write_text(json.dumps({"shape": shape, "deltas": [asdict(f) for f in deltas]}))
    t0 = time.perf_counter()
    table = neurons_table(out, deltas, "parquet", k=20)
    print(
        f"{args.parts} parts x {args.layers} layers: neurons_table {time.perf_counter() - t0:.2f} s, {table.num_rows} rows"
    )


if __name__ == "__main__":
    main()
