"""Decoding the ``bands`` column: each kept row's 2-bit code per token of its prompt.

Token t's code is in byte t // 4 at bits 2 * (t % 4): 0 grey, 1 blue (act < low), 2 orange
(high < act <= red), 3 red (act > red). ``decode`` reads one value; ``decode_many`` a whole
column at once with numpy (no Python loop over rows).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

NAMES = ("grey", "blue", "orange", "red")
"""A code's band: ``NAMES[code]``."""
SHIFTS = np.array([0, 2, 4, 6], dtype=np.uint8)
CHUNK = 1 << 22
"""Codes decoded at a time by `decode_many` (its temporaries are a few times this in bytes)."""


def decode(raw: bytes, n_tokens: int) -> np.ndarray:
    """One ``bands`` value -> [n_tokens] int8 codes."""
    data = np.frombuffer(raw, dtype=np.uint8)
    if len(data) * 4 < n_tokens:
        raise ValueError(f"bands holds {len(data) * 4} tokens, fewer than n_tokens={n_tokens}")
    return ((data[:, None] >> SHIFTS) & 3).reshape(-1)[:n_tokens].astype(np.int8)


def decode_many(bands, n_tokens) -> np.ndarray:
    """A ``bands`` column (pyarrow array or chunked array, or a list of bytes) and each row's
    token count -> [rows, max n_tokens] int8 codes, -1 past each row's own tokens."""
    if isinstance(bands, pa.ChunkedArray):
        bands = bands.combine_chunks()
    if not isinstance(bands, pa.Array):
        bands = pa.array(bands, type=pa.binary())
    bands = bands.cast(pa.binary())
    n = np.asarray(n_tokens, dtype=np.int64)  # [rows]
    if len(n) != len(bands):
        raise ValueError(f"{len(bands)} bands values but {len(n)} token counts")
    width = int(n.max()) if len(n) else 0
    offsets = np.frombuffer(bands.buffers()[1], dtype=np.int32)[bands.offset : bands.offset + len(bands) + 1]
    data = (
        np.frombuffer(bands.buffers()[2], dtype=np.uint8)
        if len(bands) and bands.buffers()[2]
        else np.zeros(1, np.uint8)
    )
    starts = offsets[:-1]  # [rows] where each value's bytes begin
    if ((offsets[1:] - starts) * 4 < n).any():
        raise ValueError("a bands value holds fewer tokens than its n_tokens")
    out = np.full((len(n), width), -1, dtype=np.int8)  # [rows, tokens]
    pos = np.arange(width)  # [tokens]
    shift = (2 * (pos % 4)).astype(np.uint8)
    step = max(1, CHUNK // max(width, 1))  # rows at a time: the temporaries stay small
    for lo in range(0, len(n), step):
        inside = pos[None, :] < n[lo : lo + step, None]  # [chunk, tokens]
        byte = np.where(inside, starts[lo : lo + step, None] + pos[None, :] // 4, 0)
        out[lo : lo + step][inside] = ((data[byte] >> shift) & 3)[inside]
    return out
