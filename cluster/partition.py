"""Split a model's blocks into contiguous pipeline stages."""

from __future__ import annotations

from neuroscan.errors import UserError


def partition_layers(n_layers: int, n_stages: int) -> list[tuple[int, int]]:
    """Return ``[(start, stop), ...]``: stage i owns blocks ``start <= layer < stop``.

    Blocks are spread as evenly as possible; when they do not divide evenly the earlier
    stages take one more, because the last stage also carries ``ln_f`` and ``lm_head``.
    """
    if not 1 <= n_stages <= n_layers:
        raise UserError(
            f"--stages {n_stages} is not possible: the model has {n_layers} layers, "
            f"so use between 1 and {n_layers} stages"
        )
    base, extra = divmod(n_layers, n_stages)
    bounds, start = [], 0
    for i in range(n_stages):
        stop = start + base + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds
