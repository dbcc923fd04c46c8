"""A prompt's coloured token strips at one layer, as HTML for Jupyter (``run.show``).

One strip per kept neuron: the prompt's tokens, each coloured by its band (grey, blue,
orange, red: the report's colours), the neuron's peak token outlined.
"""

from __future__ import annotations

import html

import numpy as np
import pyarrow as pa

from neuroscan.bands import NAMES

COLOURS = ("#e3e3e3", "#4a90d9", "#fc8d59", "#d7301f")
INK = ("#1d1d1d", "#ffffff", "#1d1d1d", "#ffffff")


class Strips:
    """``prompt`` (prompt_id, id, tokens), ``rows`` (its kept activation rows at ``layer``)
    and ``codes`` ([rows, tokens] band codes)."""

    def __init__(self, prompt: dict, layer: int, rows: pa.Table, codes: np.ndarray):
        self.prompt, self.layer, self.rows, self.codes = prompt, layer, rows, codes

    def __repr__(self) -> str:
        lines = [f"prompt {self.prompt['id']} (prompt_id {self.prompt['prompt_id']}), layer {self.layer}"]
        for row, codes in zip(self.rows.to_pylist(), self.codes):
            marks = "".join(".bor"[c] for c in codes if c >= 0)  # grey, blue, orange, red
            lines.append(f"  neuron {row['neuron']:6d}  max {row['max_act']:7.3f}  {marks}")
        return "\n".join(lines) if len(self.rows) else lines[0] + ": no neuron kept"

    def _repr_html_(self) -> str:
        tokens = self.prompt["tokens"]
        title = (
            f"<b>{html.escape(str(self.prompt['id']))}</b> (prompt_id {self.prompt['prompt_id']}), "
            f"layer {self.layer}: {len(self.rows)} kept neuron{'s' * (len(self.rows) != 1)}"
        )
        strips = []
        for row, codes in zip(self.rows.to_pylist(), self.codes):
            cells = "".join(
                f'<span title="{NAMES[c]}" style="background:{COLOURS[c]};color:{INK[c]};white-space:pre;'
                f'{"outline:2px solid #000;" if t == row["max_pos"] else ""}">{html.escape(tokens[t])}</span>'
                for t, c in enumerate(codes[: len(tokens)])
            )
            label = f"n{row['neuron']} max {row['max_act']:.2f}"
            strips.append(f'<div style="font-family:monospace;margin:2px 0"><code>{label}</code> {cells}</div>')
        return f"<div><p>{title}</p>{''.join(strips)}</div>"
