"""neuroscan.schema: the output contract."""

from __future__ import annotations

from neuroscan.schema import ACTIVATIONS


def test_activation_schema_matches_contract():
    assert ACTIVATIONS.names == [
        "prompt_id",
        "neuron",
        "max_act",
        "max_pos",
        "min_act",
        "min_pos",
        "n_above",
        "n_below",
        "bands",
    ]
    assert "layer" not in ACTIVATIONS.names  # it comes from layer=NN
