"""neuroscan.schema: the output contract."""

from __future__ import annotations

import pyarrow as pa

from neuroscan.schema import ACTIVATIONS, LAYERS, NEURONS, layer_dir


def test_activation_schema_matches_contract():
    assert ACTIVATIONS.names == [
        "prompt_id",
        "layer",
        "neuron",
        "max_act",
        "max_pos",
        "min_act",
        "min_pos",
        "n_above",
        "n_below",
        "bands",
        "up_at_max",
        "up_at_min",
    ]


def test_layer_is_the_same_integer_in_every_table():
    assert {t.field("layer").type for t in (ACTIVATIONS, LAYERS, NEURONS)} == {pa.int32()}


def test_layer_directories_are_not_hive_keys_from_schema_2():
    assert layer_dir(7) == "activations/layer_07" and "=" not in layer_dir(27)
    assert layer_dir(7, schema_version=1) == "activations/layer=07"  # how schema 1 named them
