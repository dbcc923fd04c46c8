"""The Arrow schemas of every table neuroscan writes, and the conversions into them.

This module is the one place the output contract (``shared/DESIGN.md``) lives in code.
Every file carries the schema version and the run's configuration in its schema metadata.
``layer`` is not stored in activation files: it comes from the ``layer=NN`` directory, which
readers infer as int32 (storing it too, with another type, makes ``pyarrow.dataset`` refuse
to merge the two).
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = 1

ACTIVATIONS = pa.schema(
    [
        ("prompt_id", pa.int64()),
        ("neuron", pa.int32()),
        ("max_act", pa.float32()),
        ("max_pos", pa.int16()),
        ("min_act", pa.float32()),
        ("min_pos", pa.int16()),
        ("n_above", pa.int16()),
        ("n_below", pa.int16()),
        ("bands", pa.binary()),  # 2 bits a token: token t in byte t // 4, bits 2 * (t % 4)
    ]
)

PROMPTS = pa.schema(
    [
        ("prompt_id", pa.int64()),
        ("id", pa.string()),
        ("family", pa.string()),
        ("variant", pa.string()),
        ("text", pa.string()),
        ("token_ids", pa.list_(pa.int32())),
        ("tokens", pa.list_(pa.string())),
        ("n_tokens", pa.int32()),
        ("expected", pa.string()),
        ("top_tokens", pa.list_(pa.string())),
        ("top_probs", pa.list_(pa.float32())),
        ("correct", pa.bool_()),  # null when the prompt has no expected answer
    ]
)

LAYERS = pa.schema(
    [
        ("prompt_id", pa.int64()),
        ("layer", pa.int32()),
        ("n_tokens", pa.int32()),
        ("n_selected", pa.int32()),
        ("n_kept", pa.int32()),
        ("n_above_any", pa.int32()),
        # Means over the kept neurons of the fraction of the prompt's tokens > high, > red, < low.
        ("mean_coverage", pa.float32()),
        ("red_coverage", pa.float32()),
        ("blue_coverage", pa.float32()),
    ]
)

NEURONS = pa.schema(
    [
        ("layer", pa.int32()),
        ("neuron", pa.int32()),
        ("n_prompts", pa.int64()),  # prompts on which the neuron was kept (selected and within the cap)
        ("n_red", pa.int64()),  # ... and its max was above the red edge
        ("max_act", pa.float32()),
        ("top_prompt_ids", pa.list_(pa.int64())),
        ("top_acts", pa.list_(pa.float32())),
        ("top_pos", pa.list_(pa.int16())),
    ]
)

TABLES = {"activations": ACTIVATIONS, "prompts": PROMPTS, "layers": LAYERS}
OUTPUT_DIRS = (*TABLES, "neurons", "neuron_parts")
"""Every directory of table files in an output directory: the per-part tables, ``neurons/``
(written at the end) and ``neuron_parts/`` (each part's delta of it, `aggregator.neurons`)."""


def with_run_metadata(schema: pa.Schema, run: dict) -> pa.Schema:
    return schema.with_metadata(
        {"neuroscan.schema_version": str(SCHEMA_VERSION), "neuroscan.run": json.dumps(run, sort_keys=True)}
    )


def packed_bands(bands: np.ndarray, n_tokens: np.ndarray) -> pa.Array:
    """Binary column from a padded [rows, width] uint8 matrix, row i cut to ceil(n_tokens[i] / 4) bytes.

    Always a copy, so the column never pins the caller's (object-store) buffer."""
    lengths = (n_tokens.astype(np.int64) + 3) // 4
    if (lengths == bands.shape[1]).all():  # every row fills the width: the bytes as they are
        data = np.array(bands, order="C", copy=True).reshape(-1)
    else:
        keep = np.arange(bands.shape[1])[None, :] < lengths[:, None]
        data = bands[keep]  # row-major: the rows' bytes, one after another (a copy)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.Array.from_buffers(pa.binary(), len(lengths), [None, pa.py_buffer(offsets), pa.py_buffer(data)])


def activation_batches(rows: dict[str, np.ndarray], start: int, prompt_ids: np.ndarray, n_tokens: np.ndarray) -> dict[int, pa.RecordBatch]:
    """Split a stage's kept rows (grouped by layer, as compaction leaves them) into one batch per layer."""
    layer = rows["layer_offset"].astype(np.int64) + start
    bounds = np.flatnonzero(np.diff(layer)) + 1
    out = {}
    for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(layer)]):
        if hi == lo:
            continue
        batch_row = rows["row"][lo:hi]
        columns = [
            pa.array(prompt_ids[batch_row]),
            *(pa.array(rows[name][lo:hi]) for name in ("neuron", "max_act", "max_pos", "min_act", "min_pos", "n_above", "n_below")),
            packed_bands(rows["bands"][lo:hi], n_tokens[batch_row]),
        ]
        out[int(layer[lo])] = pa.RecordBatch.from_arrays(columns, schema=ACTIVATIONS)
    return out


def layers_batch(per_prompt: dict[str, np.ndarray], start: int, prompt_ids: np.ndarray, n_tokens: np.ndarray) -> pa.RecordBatch:
    """[layers, batch] per-prompt counts -> one row per (prompt, layer)."""
    n_layers, n_rows = per_prompt["n_kept"].shape
    columns = [
        pa.array(np.tile(prompt_ids, n_layers)),
        pa.array(np.repeat(np.arange(start, start + n_layers, dtype=np.int32), n_rows)),
        pa.array(np.tile(n_tokens.astype(np.int32), n_layers)),
        *(pa.array(per_prompt[name].reshape(-1)) for name in ("n_selected", "n_kept", "n_above_any", "mean_coverage", "red_coverage", "blue_coverage")),
    ]
    return pa.RecordBatch.from_arrays(columns, schema=LAYERS)


def prompts_batch(group, predictions: dict[str, np.ndarray], token_strings: list[str]) -> pa.RecordBatch:
    """One row per prompt of a micro-batch (``group`` is its list of `prompts.batching.Tokenized`)."""
    correct = predictions["correct"]
    columns = {
        "prompt_id": [t.prompt.prompt_id for t in group],
        "id": [t.prompt.id for t in group],
        "family": [t.prompt.family for t in group],
        "variant": [t.prompt.variant for t in group],
        "text": [t.prompt.text for t in group],
        "token_ids": [t.token_ids for t in group],
        "tokens": [[token_strings[i] for i in t.token_ids] for t in group],
        "n_tokens": [len(t.token_ids) for t in group],
        "expected": [t.prompt.expected for t in group],
        "top_tokens": [[token_strings[i] for i in row] for row in predictions["top_ids"].tolist()],
        "top_probs": predictions["top_probs"].tolist(),
        "correct": [None if c < 0 else bool(c) for c in correct.tolist()],
    }
    return pa.RecordBatch.from_pydict(columns, schema=PROMPTS)
