"""The messages that cross process boundaries: plain numpy containers, cheap to ship.

The driver reads `Prompt` rows and sends `MicroBatch` to every stage of a pipeline; a stage
hands `Hidden` to the next and `StageRows` to the aggregator, which also receives the
micro-batch's `Tokenized` prompts. None of them holds a torch tensor (except `Hidden` inside
a stage that hands over directly), so the aggregator and the driver never need torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from neuroscan.config import Selection


@dataclass(frozen=True)
class Prompt:
    """One row of a corpus, as read and checked by `prompts.readers`."""

    prompt_id: int
    """The 0-based position among the corpus's prompts."""
    id: str
    """The user's id, or ``str(prompt_id)``."""
    text: str
    family: str | None = None
    variant: str | None = None
    expected: str | None = None
    extra: dict[str, object] = field(default_factory=dict)
    """The corpus's other fields (`neuroscan.corpus_columns`), carried into ``prompts/``."""


@dataclass(frozen=True)
class Tokenized:
    """A prompt and its tokens, as packed into a micro-batch."""

    prompt: Prompt
    token_ids: list[int]
    """The prompt's tokens (after --truncate, if it applied)."""
    answer_ids: list[int]
    """The expected answer tokenised as a continuation; empty without ``expected``."""

    @property
    def n_input(self) -> int:
        return len(self.token_ids) + len(self.answer_ids)


@dataclass(frozen=True)
class MicroBatch:
    """What every stage of a pipeline receives for one forward pass (numpy, cheap to ship)."""

    batch_id: int
    prompt_ids: np.ndarray  # [batch] int64
    input_ids: np.ndarray  # [batch, pos] int32, prompt + answer tokens, right-padded
    n_tokens: np.ndarray  # [batch] int32, the prompt's own tokens
    n_input: np.ndarray  # [batch] int32, prompt + answer tokens
    answer_ids: np.ndarray  # [batch, answer] int32, -1 past each answer's end
    ids: tuple[str, ...] = ()
    """The users' prompt ids, for error messages."""
    selection: Selection = field(default_factory=Selection)
    """The scan's thresholds, cap and bands: stages serve scans with different ones."""
    job: str = ""
    """The scan it belongs to (batch ids count from 0 in every scan)."""

    def take(self, rows: np.ndarray, trim: bool = False) -> MicroBatch:
        """The same micro-batch (same id) restricted to ``rows``; ``trim`` drops padding columns."""
        width = int(self.n_input[rows].max()) if trim else self.input_ids.shape[1]
        return MicroBatch(
            batch_id=self.batch_id,
            prompt_ids=self.prompt_ids[rows],
            input_ids=self.input_ids[rows, :width],
            n_tokens=self.n_tokens[rows],
            n_input=self.n_input[rows],
            answer_ids=self.answer_ids[rows],
            ids=tuple(self.ids[i] for i in rows) if self.ids else (),
            selection=self.selection,
            job=self.job,
        )


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
    """[layers, batch] arrays: n_selected, n_kept, n_above_any, n_below_any, the coverages."""
    predictions: dict[str, np.ndarray] | None = None
    """Last stage only: top_ids/top_probs [batch, 5] after the prompt; correct [batch] int8 (-1 = no answer)."""
