"""Which neurons separate two groups of prompts: ``neuroscan compare DIR --by family|variant``.

Reads only the output tables (no model). For every (layer, neuron) it counts the prompts of
group A and of group B on which the neuron was kept (a row in ``activations/``) and on which
it fired red (``max_act > red``), and compares the two proportions with a two-proportion z
statistic (pooled variance). Rows are sorted by effect: the absolute difference in the kept
fraction, then |z|. Activations are read a record batch at a time, so memory stays bounded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from aggregator.writer import write_table
from neuroscan.config import GROUP_BY
from neuroscan.errors import UserError, file_out, one_of
from results.run import Run, open_run

COMPARE = pa.schema(
    [
        ("layer", pa.int32()),
        ("neuron", pa.int32()),
        ("a_kept", pa.int64()),
        ("b_kept", pa.int64()),
        ("a_frac", pa.float64()),
        ("b_frac", pa.float64()),
        ("diff", pa.float64()),
        ("z", pa.float64()),
        ("a_red_frac", pa.float64()),
        ("b_red_frac", pa.float64()),
        ("red_diff", pa.float64()),
    ]
)


def groups(run: Run, by: str, a: str | None, b: str | None) -> tuple[np.ndarray, str, str, int, int]:
    """prompt_id -> 0 (group A), 1 (group B) or -1, plus the group names and sizes."""
    one_of("--by", by, GROUP_BY)
    prompts = run.read("prompts", ["prompt_id", by])
    values = prompts[by].to_pylist()
    present = sorted({v for v in values if v is not None})
    a, b = _pick(by, present, a, b)
    ids = prompts["prompt_id"].to_numpy()
    code = np.full(int(ids.max()) + 1, -1, dtype=np.int8)
    code[ids] = [0 if v == a else 1 if v == b else -1 for v in values]
    return code, a, b, int((code == 0).sum()), int((code == 1).sum())


def _pick(by: str, present: list[str], a: str | None, b: str | None) -> tuple[str, str]:
    """Groups A and B: as given, or filled in where the run has exactly two values."""
    for flag, value in (("--a", a), ("--b", b)):
        if value is not None and value not in present:
            raise UserError(f"{flag} {value!r} is not a {by} of this run: use one of {present[:20]}")
    if len(present) < 2:
        fix = "--families days,months" if by == "family" else "--variants icl,shuffled"
        raise UserError(
            f"--by {by}: this run has {len(present)} {by} value(s) {present}, compare needs two: "
            f"scan a corpus with two, e.g. from `neuroscan prompts generate {fix}`"
        )
    if a is not None and a == b:
        raise UserError(f"--a and --b are both {a!r}: name two different {by} values")
    if a is None or b is None:
        if len(present) > 2:
            missing = " and ".join(flag for flag, value in (("--a", a), ("--b", b)) if value is None)
            raise UserError(
                f"--by {by} has {len(present)} groups {present[:10]}: name {'the other with ' if a or b else 'two with '}{missing}"
            )
        a = a or next(v for v in present if v != b)
        b = b or next(v for v in present if v != a)
    return a, b


def compare(out_dir: str | Path, by: str, a: str | None = None, b: str | None = None) -> pa.Table:
    run = open_run(out_dir, verify=True)  # committed parts only, each as written: a killed scan reads as far as it went
    code, a, b, n_a, n_b = groups(run, by, a, b)
    red = run.manifest.bands.red
    c = {name: np.zeros(0, dtype=np.int64) for name in ("a", "b", "a_red", "b_red")}
    for layer, batch in _activations(run):
        key = layer * (1 << 16) + batch["neuron"].to_numpy().astype(np.int64)  # neurons < 65,536
        group = code[batch["prompt_id"].to_numpy()]
        fired = batch["max_act"].to_numpy() > red
        for name, mask in (
            ("a", group == 0),
            ("b", group == 1),
            ("a_red", (group == 0) & fired),
            ("b_red", (group == 1) & fired),
        ):
            c[name] = _add(c[name], key[mask])
    size = max(len(v) for v in c.values())
    c = {name: np.pad(v, (0, size - len(v))) for name, v in c.items()}
    keys = np.flatnonzero((c["a"] + c["b"]) > 0)
    ka, kb = c["a"][keys], c["b"][keys]
    pa_, pb_ = ka / n_a, kb / n_b
    pooled = (ka + kb) / (n_a + n_b)
    se = np.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    z = np.divide(pa_ - pb_, se, out=np.zeros_like(se), where=se > 0)
    ra, rb = c["a_red"][keys] / n_a, c["b_red"][keys] / n_b
    order = np.lexsort((keys, -np.abs(z), -np.abs(pa_ - pb_)))
    table = pa.table(
        [
            (keys >> 16).astype(np.int32)[order],
            (keys & 0xFFFF).astype(np.int32)[order],
            ka[order],
            kb[order],
            pa_[order],
            pb_[order],
            (pa_ - pb_)[order],
            z[order],
            ra[order],
            rb[order],
            (ra - rb)[order],
        ],
        schema=COMPARE.with_metadata({"by": by, "a": a, "b": b, "n_a": str(n_a), "n_b": str(n_b)}),
    )
    return table


def _activations(run: Run):
    """(layer, record batch) over every committed activation row, a batch at a time."""
    for layer in range(run.n_layers):
        for batch in run.batches("activations", ["neuron", "prompt_id", "max_act"], layer):
            yield layer, batch


def _add(total: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Add a histogram of ``keys`` to ``total``, growing it as needed."""
    grown = np.bincount(keys, minlength=len(total))
    grown[: len(total)] += total
    return grown


def write_compare(table: pa.Table, out: Path) -> None:
    file_out(out, "compare.parquet", ".parquet")
    try:
        write_table(table, out.parent, out.stem, "parquet")
    except OSError as err:  # nothing half-written stays: the file is renamed into place once whole
        raise UserError(
            f"writing {out} failed ({err.strerror or err}): fix the disk (space, permissions), or give another --out"
        ) from None
