"""A run's manifest as the driver starts it, for tests that build output directories by hand."""

from __future__ import annotations

import copy
import dataclasses

from neuroscan.manifest import BandEdges, Corpus, LayerCheck, Manifest, ModelInfo, SelectionInfo, Verification
from neuroscan.schema import SCHEMA_VERSION

HEADER = Manifest(
    schema_version=SCHEMA_VERSION,
    model=ModelInfo(id="m", path="", dtype="float32"),
    selection=SelectionInfo(high=3.0, low=0.0, max_per_layer=500),
    bands=BandEdges(low=0.0, high=3.0, red=3.5),
    stages=2,
    replicas=1,
    partition=[[0, 2], [2, 3]],
    device="cpu",
    handoff="store",
    batch_tokens=8192,
    top_k=20,
    format="parquet",
    truncate=False,
    corpus=Corpus(source="seed", sha256=None),
    versions={},
    started_at="",
)


def header(**changes) -> Manifest:
    """`HEADER` with ``changes``, a deep copy (its lists are its own)."""
    return dataclasses.replace(copy.deepcopy(HEADER), **changes)


def verification(off: int = 0) -> Verification:
    """A fidelity check of two layers; ``off`` pairs of layer 1's 100 past the tolerance."""
    layer = LayerCheck(
        pairs=100, kept_agreement=0.99, selected=120, selected_fp32=121, flips=1, max_diff=0.01, min_diff=0.0, off=0
    )
    return Verification(
        prompts=[0, 4, 7],
        seed=0,
        device="cpu",
        atol=0.05,
        rtol=0.02,
        max_off=0.01,
        passed=off <= 1,
        seconds=0.5,
        layers={"0": layer, "1": dataclasses.replace(layer, off=off, max_diff=2.5)},
    )
