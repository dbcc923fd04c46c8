"""Stage rows to Arrow: the record batches of `neuroscan.schema`'s tables, one micro-batch at a time."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from neuroscan.corpus_columns import extra_array
from neuroscan.schema import ACTIVATIONS, LAYERS, PROMPTS


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


def activation_batches(
    rows: dict[str, np.ndarray], start: int, prompt_ids: np.ndarray, n_tokens: np.ndarray
) -> dict[int, pa.RecordBatch]:
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
            pa.array(np.full(hi - lo, layer[lo], dtype=np.int32)),
            *(
                pa.array(rows[name][lo:hi])
                for name in ("neuron", "max_act", "max_pos", "min_act", "min_pos", "n_above", "n_below")
            ),
            packed_bands(rows["bands"][lo:hi], n_tokens[batch_row]),
            *(
                pa.array(rows[name][lo:hi]) if name in rows else pa.nulls(hi - lo, pa.float32())
                for name in ("up_at_max", "up_at_min")
            ),
        ]
        out[int(layer[lo])] = pa.RecordBatch.from_arrays(columns, schema=ACTIVATIONS)
    return out


def layers_batch(
    per_prompt: dict[str, np.ndarray], start: int, prompt_ids: np.ndarray, n_tokens: np.ndarray
) -> pa.RecordBatch:
    """[layers, batch] per-prompt counts -> one row per (prompt, layer)."""
    n_layers, n_rows = per_prompt["n_kept"].shape
    columns = [
        pa.array(np.tile(prompt_ids, n_layers)),
        pa.array(np.repeat(np.arange(start, start + n_layers, dtype=np.int32), n_rows)),
        pa.array(np.tile(n_tokens.astype(np.int32), n_layers)),
        *(
            pa.array(per_prompt[name].reshape(-1))
            for name in (
                "n_selected",
                "n_kept",
                "n_above_any",
                "n_below_any",
                "mean_coverage",
                "red_coverage",
                "blue_coverage",
            )
        ),
    ]
    return pa.RecordBatch.from_arrays(columns, schema=LAYERS)


def prompts_batch(
    group, predictions: dict[str, np.ndarray], token_strings: list[str], schema: pa.Schema = PROMPTS
) -> pa.RecordBatch:
    """One row per prompt of a micro-batch (``group`` is its list of `neuroscan.messages.Tokenized`);
    ``schema``: the run's (`neuroscan.schema.prompts_schema`), with the corpus's extra columns."""
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
    for f in schema:
        if f.name not in columns:
            columns[f.name] = extra_array([t.prompt.extra.get(f.name) for t in group], f.type)
    return pa.RecordBatch.from_pydict(columns, schema=schema)
