"""Which neurons separate two groups of prompts: ``neuroscan compare DIR --by COLUMN``.

The groups are the values of one column of ``prompts/``: ``family``, ``variant``, or any
column the corpus brought with it (``topic``...; `neuroscan.corpus_columns`), compared as
text (``true``, ``7``). Group B is a second value, or ``rest``: every other prompt that has
a value in that column (one group against the rest; a group itself named ``rest`` can only
be A). Prompts without a value are in neither group. Reads only the output tables (no model).

For every (layer, neuron) kept at least once in either group it counts the prompts of group
A and of group B on which the neuron was kept (a row in ``activations/``) and on which it
fired red (``max_act > red``), and compares the two kept fractions with a two-proportion z
statistic (pooled variance; 0 where both groups agree entirely). ``p`` is z's two-sided
p-value under the normal distribution, ``erfc(|z| / sqrt(2))``, and ``q`` its
Benjamini-Hochberg q-value over the m rows of the table (every neuron tested, before
``--top`` cuts the table): with the p-values in ascending order, q_(i) = min over j >= i of
m * p_(j) / j, at most 1. The rows with q <= alpha are a discovery set whose expected share
of false discoveries is at most alpha (for independent or positively dependent tests).

Rows are sorted by ``--sort``: ``diff`` (|diff|, then |z|; the default), ``z`` (|z|, then
|diff|), ``q`` (ascending, then |z|) or ``red_diff`` (|red_diff|, then |diff|); ties go to the
lower (layer, neuron). ``--top N`` keeps the first N. Activations are read a record batch at
a time, so memory stays bounded.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from aggregator.writer import write_table
from neuroscan.config import COMPARE_SORTS
from neuroscan.errors import UserError, file_out, one_of
from results.run import Run, open_run

REST = "rest"
"""``--b rest``: every prompt with a value of the column other than group A's."""

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
        ("p", pa.float64()),
        ("q", pa.float64()),
        ("a_red_frac", pa.float64()),
        ("b_red_frac", pa.float64()),
        ("red_diff", pa.float64()),
    ]
)


def group_values(run: Run, by: str) -> tuple[np.ndarray, list[str | None]]:
    """Every committed prompt's id and its value of column ``by`` as text (None: no value)."""
    with run.reading():
        columns = run.dataset("prompts").schema
    flat = [f.name for f in columns if not pa.types.is_nested(f.type) and not pa.types.is_binary(f.type)]
    if by not in flat:
        problem = "holds lists, not one value a prompt" if by in columns.names else "is not a column of prompts/"
        raise UserError(f"--by {by!r} {problem}: use one of {', '.join(flat)}")
    prompts = run.read("prompts", list(dict.fromkeys(["prompt_id", by])))
    return prompts["prompt_id"].to_numpy(), pc.cast(prompts[by], pa.string()).to_pylist()


def groups(run: Run, by: str, a: str | None, b: str | None) -> tuple[np.ndarray, str, str, int, int]:
    """prompt_id -> 0 (group A), 1 (group B) or -1, plus the group names and sizes."""
    ids, values = group_values(run, by)
    present = sorted({v for v in values if v is not None})
    a, b = _pick(by, present, a, b)
    code = np.full(int(ids.max()) + 1, -1, dtype=np.int8)
    if b == REST:
        code[ids] = [-1 if v is None else 0 if v == a else 1 for v in values]
    else:
        code[ids] = [0 if v == a else 1 if v == b else -1 for v in values]
    return code, a, b, int((code == 0).sum()), int((code == 1).sum())


def _pick(by: str, present: list[str], a: str | None, b: str | None) -> tuple[str, str]:
    """Groups A and B: as given, or filled in where the run has exactly two values."""
    for flag, value in (("--a", a), ("--b", b)):
        if value is not None and value not in present and not (flag == "--b" and value == REST):
            raise UserError(f"{flag} {value!r} is not a {by} of this run: use one of {present[:20]}")
    if b == REST:
        if a is None:
            example = f", e.g. --a {present[0]}" if present else ""
            raise UserError(f"--b rest compares group A with every other {by}: name A with --a{example}")
        if len(present) < 2:
            raise UserError(
                f"--b rest: every prompt of this run with a {by} has {a!r}, so the rest is empty: scan prompts "
                f"with other {by} values too, or compare by another column"
            )
        return a, REST
    if len(present) < 2:
        fix = {"family": "--families days,months", "variant": "--variants icl,shuffled"}.get(by)
        raise UserError(
            f"--by {by}: this run has {len(present)} {by} value(s) {present[:20]}, compare needs two: "
            + (
                f"scan a corpus with two, e.g. from `neuroscan prompts generate {fix}`"
                if fix
                else f"scan prompts with two {by} values"
            )
        )
    if a is not None and a == b:
        raise UserError(f"--a and --b are both {a!r}: name two different {by} values")
    if a is None or b is None:
        if len(present) > 2:
            missing = " and ".join(flag for flag, value in (("--a", a), ("--b", b)) if value is None)
            raise UserError(
                f"--by {by} has {len(present)} groups {present[:10]}: name {'the other with ' if a or b else 'two with '}{missing}"
                + (", or --b rest" if a else ", or one with --a and the rest with --b rest" if not b else "")
            )
        a = a or next(v for v in present if v != b)
        b = b or next(v for v in present if v != a)
    return a, b


def compare(
    out_dir: str | Path,
    by: str,
    a: str | None = None,
    b: str | None = None,
    sort: str = "diff",
    top: int | None = None,
) -> pa.Table:
    """The `COMPARE` table of group A against group B (see the module's docstring)."""
    one_of("--sort", sort, COMPARE_SORTS)
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
    p = two_sided_p(z)
    q = bh_q(p)
    ra, rb = c["a_red"][keys] / n_a, c["b_red"][keys] / n_b
    diff, red_diff = pa_ - pb_, ra - rb
    first, second = {
        "diff": (-np.abs(diff), -np.abs(z)),
        "z": (-np.abs(z), -np.abs(diff)),
        "q": (q, -np.abs(z)),
        "red_diff": (-np.abs(red_diff), -np.abs(diff)),
    }[sort]
    order = np.lexsort((keys, second, first))[:top]
    meta = {"by": by, "a": a, "b": b, "n_a": str(n_a), "n_b": str(n_b), "sort": sort, "n_tested": str(len(keys))}
    columns = [(keys >> 16).astype(np.int32), (keys & 0xFFFF).astype(np.int32), ka, kb, pa_, pb_, diff, z, p, q]
    columns += [ra, rb, red_diff]
    return pa.table([column[order] for column in columns], schema=COMPARE.with_metadata(meta))


def two_sided_p(z: np.ndarray) -> np.ndarray:
    """P(|Z| >= |z|) for a standard normal Z: ``erfc(|z| / sqrt(2))``."""
    return np.array([math.erfc(abs(v) / math.sqrt(2)) for v in z.tolist()], dtype=np.float64)


def bh_q(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg q-values of the p-values ``p`` (all the tests): m * p_(i) / i in
    ascending order of p, made monotone from the largest down, at most 1; returned in the
    order of ``p``."""
    m = len(p)
    order = np.argsort(p, kind="stable")
    scaled = p[order] * m / np.arange(1, m + 1)
    q = np.empty(m, dtype=np.float64)
    q[order] = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
    return q


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
