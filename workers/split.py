"""Out-of-memory errors: split the micro-batch in halves and retry, down to one prompt.

Each half drops the padding it does not need (a long prompt no longer widens its
neighbours); the halves' hidden states and band codes are padded back to the micro-batch's
width when they merge, so the next stage and the aggregator see the shapes of the whole
micro-batch (row indices shifted, rows regrouped by layer). A prompt that does not fit even alone raises `PromptTooLarge`; the driver stops
or skips it (``--on-error``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from neuroscan.errors import UserError
from neuroscan.messages import Hidden, MicroBatch, StageRows

Forward = Callable[[MicroBatch, Hidden | None], tuple[Hidden | None, StageRows]]


class PromptTooLarge(UserError):
    """One prompt alone does not fit in device memory."""

    def __init__(self, batch: MicroBatch):
        self.prompt_id = int(batch.prompt_ids[0])
        name = batch.ids[0] if batch.ids else str(self.prompt_id)
        super().__init__(
            f"prompt {name!r} ({int(batch.n_input[0])} tokens) does not fit in device memory even alone: "
            "shorten it, use more --stages, or pass --on-error skip"
        )

    def __reduce__(self):  # travels through Ray as itself
        return _rebuild, (type(self), str(self), self.prompt_id)


def _rebuild(cls, message: str, prompt_id: int):
    err = UserError.__new__(cls)
    UserError.__init__(err, message)
    err.prompt_id = prompt_id
    return err


def forward_splitting(forward: Forward, batch: MicroBatch, hidden: Hidden | None) -> tuple[Hidden | None, StageRows]:
    try:
        return forward(batch, hidden)
    except torch.OutOfMemoryError:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        n = len(batch.prompt_ids)
        if n == 1:
            raise PromptTooLarge(batch) from None
        halves = []
        for rows in (np.arange(n // 2), np.arange(n // 2, n)):
            part = batch.take(rows, trim=True)
            part_hidden = (
                None if hidden is None else Hidden(_take(hidden.data, rows, part.input_ids.shape[1]), hidden.dtype)
            )
            halves.append(forward_splitting(forward, part, part_hidden))
        return merge(*halves, offset=n // 2, width=batch.input_ids.shape[1])


def _take(data, rows: np.ndarray, width: int):
    """Rows ``rows`` of a [batch, pos, d_model] hidden state (numpy, or a tensor handed over
    directly), cut to ``width`` positions."""
    if isinstance(data, torch.Tensor):
        return data[torch.as_tensor(rows, device=data.device), :width]
    return data[rows, :width]


def _pad(array, width: int):
    """Zero-pad axis 1 to ``width`` (numpy, or a tensor handed over directly)."""
    if isinstance(array, torch.Tensor):
        return torch.nn.functional.pad(array, (0, 0) * (array.ndim - 2) + (0, width - array.shape[1]))
    pad = [(0, 0)] * array.ndim
    pad[1] = (0, width - array.shape[1])
    return np.pad(array, pad)


def merge(
    a: tuple[Hidden | None, StageRows], b: tuple[Hidden | None, StageRows], offset: int, width: int
) -> tuple[Hidden | None, StageRows]:
    """Outputs of two halves -> the output of the whole micro-batch of ``width`` positions."""
    (ha, ra), (hb, rb) = a, b
    for r in (ra, rb):
        r.rows["bands"] = _pad(r.rows["bands"], (width + 3) // 4)
    rows = {name: np.concatenate([ra.rows[name], rb.rows[name]]) for name in ra.rows}
    rows["row"][len(ra.rows["row"]) :] += offset
    order = np.argsort(rows["layer_offset"], kind="stable")  # regroup by layer, batch rows ascending
    rows = {name: array[order] for name, array in rows.items()}
    per_prompt = {name: np.concatenate([ra.per_prompt[name], rb.per_prompt[name]], axis=1) for name in ra.per_prompt}
    predictions = None
    if ra.predictions is not None:
        predictions = {name: np.concatenate([ra.predictions[name], rb.predictions[name]]) for name in ra.predictions}
    hidden = None
    if ha is not None:
        halves = [_pad(ha.data, width), _pad(hb.data, width)]
        hidden = Hidden(torch.cat(halves) if isinstance(ha.data, torch.Tensor) else np.concatenate(halves), ha.dtype)
    return hidden, StageRows(ra.batch_id, ra.start, rows, per_prompt, predictions)
