"""The Arrow schemas of every table neuroscan writes.

This module is the one place the output contract lives in code; `aggregator.convert` fills
these schemas from what the stages send, and `results.run` reads files written with them.
Every file carries the schema version and the run's configuration in its schema metadata.

``layer`` is an int32 column inside every file, so that every reader (pyarrow, pandas,
Polars, DuckDB, Hugging Face ``datasets``) sees the same integer with no options. Activation
files stay one directory per layer, ``activations/layer_NN/``, named without ``=`` so that no
reader takes the directory for a hive partition key (those are read as strings or int32 and
dropped by some readers); a reader still skips other layers' files by their row-group
statistics. Schema 1 kept ``layer`` only in ``activations/layer=NN/`` directory names
(`results.run` reads both).
"""

from __future__ import annotations

import json

import pyarrow as pa

SCHEMA_VERSION = 3
"""2: ``layer`` inside activation files, under ``layer_NN/``; ``n_below_any`` in layers/.
3: ``up_at_max``/``up_at_min`` in activations/ (null except for gated MLPs)."""

ACTIVATIONS = pa.schema(
    [
        ("prompt_id", pa.int64()),
        ("layer", pa.int32()),
        ("neuron", pa.int32()),
        ("max_act", pa.float32()),
        ("max_pos", pa.int16()),
        ("min_act", pa.float32()),
        ("min_pos", pa.int16()),
        ("n_above", pa.int16()),
        ("n_below", pa.int16()),
        ("bands", pa.binary()),  # 2 bits a token: token t in byte t // 4, bits 2 * (t % 4)
        # Gated MLPs (Llama, Mistral, Qwen2: act = act_fn(gate) * up): up's value at max_pos and
        # min_pos, so a sign can be read as the gate's or the up's; null for other families.
        ("up_at_max", pa.float32()),
        ("up_at_min", pa.float32()),
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


def prompts_schema(extra: dict[str, str]) -> pa.Schema:
    """A run's ``prompts/``: `PROMPTS`, then the corpus's extra columns (name -> Arrow type
    name, as `neuroscan.corpus_columns` decided them for the whole corpus)."""
    return pa.schema([*PROMPTS, *(pa.field(name, pa.type_for_alias(kind)) for name, kind in extra.items())])


LAYERS = pa.schema(
    [
        ("prompt_id", pa.int64()),
        ("layer", pa.int32()),
        ("n_tokens", pa.int32()),
        ("n_selected", pa.int32()),
        ("n_kept", pa.int32()),
        ("n_above_any", pa.int32()),  # neurons selected by the red rule (max > high)
        ("n_below_any", pa.int32()),  # neurons selected by the blue rule (min < low)
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


def layer_dir(layer: int, schema_version: int = SCHEMA_VERSION) -> str:
    """The directory of one layer's activation files, relative to the output directory."""
    return f"activations/layer_{layer:02d}" if schema_version >= 2 else f"activations/layer={layer:02d}"


TABLES = {"activations": ACTIVATIONS, "prompts": PROMPTS, "layers": LAYERS}
OUTPUT_DIRS = (*TABLES, "neurons", "neuron_parts")
"""Every directory of table files in an output directory: the per-part tables, ``neurons/``
(written at the end) and ``neuron_parts/`` (each part's delta of it, `aggregator.neurons`)."""


def with_run_metadata(schema: pa.Schema, run: dict) -> pa.Schema:
    return schema.with_metadata(
        {"neuroscan.schema_version": str(SCHEMA_VERSION), "neuroscan.run": json.dumps(run, sort_keys=True)}
    )
