"""A run's manifest as the driver starts it, for tests that build output directories by hand."""

from __future__ import annotations

import copy
import dataclasses

from neuroscan.manifest import BandEdges, Corpus, Manifest, ModelInfo, SelectionInfo
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
