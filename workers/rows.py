"""What stages send: plain numpy containers, so the aggregator never needs torch."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Hidden:
    """The residual stream between stages, as numpy (bfloat16 travels as its int16 bits), or,
    inside a stage that hands it over directly (`workers.handoff`), the device tensor."""

    data: np.ndarray  # [batch, pos, d_model]; a torch.Tensor with --handoff direct
    dtype: str


@dataclass
class StageRows:
    """What a stage sends to the aggregator for one micro-batch (numpy arrays)."""

    batch_id: int
    start: int
    """The stage's first layer: ``rows["layer_offset"]`` and per_prompt's first axis count from it."""
    rows: dict[str, np.ndarray]
    """M kept rows: layer_offset, row (batch row), neuron, stats, bands [M, ceil(pos / 4)]."""
    per_prompt: dict[str, np.ndarray]
    """[layers, batch] arrays: n_selected, n_kept, n_above_any, mean_coverage."""
    predictions: dict[str, np.ndarray] | None = None
    """Last stage only: top_ids/top_probs [batch, 5] after the prompt; correct [batch] int8 (-1 = no answer)."""
