"""``--resume --repair``: a run whose committed files no longer match its manifest, made
whole again by dropping what is damaged, so that the resumed run scans it again.

A part with any damaged file (missing, another size, other bytes than its sha256) is
dropped whole: its entry leaves ``manifest.parts`` and its files are deleted, so its
micro-batches are no longer committed and the resumed run scans them again. What the part
added to the manifest's running sums (``totals``, ``counters``) is recorded nowhere on its
own and its files cannot be trusted, so the sums are counted again from the tables of the
parts that remain (`recount`); the prompts skipped in its micro-batches leave ``skipped``
(the rescan skips them again). A complete run goes back to running without ``neurons/`` and
the empty layers' files: the resumed run's finish writes them again, its merge rebuilt from
the remaining parts' ``neuron_parts/`` deltas and the new parts'. Damage to only those
files drops no part.

The manifest is replaced once, atomically, before any file is deleted: a crash in between
leaves files no part lists, which the resumed run's aggregator removes.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from aggregator.aggregator import summarize
from neuroscan.manifest import RUNNING, Counters, Manifest, Totals, write_manifest

LAYER_COUNTS = ("n_selected", "n_kept", "n_above_any", "n_below_any")
"""The ``layers/`` columns summed into ``counters.layers`` after the prompt count, in its order."""


def drop_damaged(out: Path, manifest: Manifest, damage: Mapping[str, str], batch_of: Mapping[int, int]) -> str:
    """Drop from the run in ``out`` (``manifest``, changed in place and written) every part
    with a file in ``damage`` (path -> what is wrong, `neuroscan.manifest.file_damage`), and
    the finish's files; ``batch_of`` maps each prompt the run skipped to its micro-batch.
    Returns one line that says what was dropped."""
    dropped = [part for part in manifest.parts if any(f.path in damage for f in part.files)]
    finish = [*manifest.empty_layers, *([manifest.neurons] if manifest.neurons else [])]
    gone = {b for part in dropped for b in part.batches}
    numbers = [part.part for part in dropped]
    manifest.parts = [part for part in manifest.parts if part.part not in numbers]
    manifest.totals, manifest.counters = recount(out, manifest)
    manifest.summary = summarize(manifest.counters)
    manifest.skipped = [s for s in manifest.skipped if batch_of.get(s["prompt_id"]) not in gone]
    manifest.status, manifest.neurons, manifest.empty_layers = RUNNING, None, []
    write_manifest(out, manifest)
    for f in [f for part in dropped for f in part.files] + finish:
        (out / f.path).unlink(missing_ok=True)
    in_parts = [damage[f.path] for part in dropped for f in part.files if f.path in damage]
    first, more = (in_parts or list(damage.values()))[0], len(damage) - 1
    why = first + (f"; and {more} more damaged file{'s' * (more > 1)}" if more else "")
    if not dropped:
        return f"--repair: {why}; no part dropped, writing neurons/ and the empty layers' files again"
    return (
        f"--repair: dropped part{'s' * (len(dropped) > 1)} {', '.join(map(str, numbers))} ({why}), "
        f"rescanning {'its' if len(dropped) == 1 else 'their'} {len(gone):,} micro-batch{'es' * (len(gone) != 1)}"
    )


def recount(out: Path, manifest: Manifest) -> tuple[Totals, Counters]:
    """The running sums of the run's committed parts (`Aggregator._fold_counts`), counted
    again from their tables. Each is a sum of integers over rows these tables hold, so the
    count is exact whatever parts the rows came in: ``prompts/`` has a row per scanned prompt
    (its tokens, family, variant and whether its answer was correct: null when it has none),
    ``layers/`` a row per (prompt, layer) with that prompt's counts, and the manifest lists
    each activations file's rows."""
    totals, counters = Totals(), Counters()
    totals.activation_rows = sum(f.rows for f in manifest.files("activations/"))
    prompts = _read(out, manifest, "prompts/", ["n_tokens", "family", "variant", "correct"])
    if prompts is not None:
        totals.prompts = prompts.num_rows
        totals.tokens = int(pc.sum(prompts["n_tokens"]).as_py() or 0)
        answered = prompts.filter(pc.is_valid(prompts["correct"]))
        correct = pc.cast(answered["correct"], pa.int64())
        for by in ("family", "variant"):
            named = pc.fill_null(pc.not_equal(answered[by], ""), False)
            value = pc.if_else(named, answered[by], "(none)")  # as the aggregator counts a missing one
            groups = pa.table({"value": value, "correct": correct}).group_by("value")
            for row in groups.aggregate([("correct", "sum"), ("correct", "count")]).to_pylist():
                counters.accuracy[by][row["value"]] = [row["correct_sum"], row["correct_count"]]
    layers = _read(out, manifest, "layers/", ["layer", *LAYER_COUNTS])
    if layers is not None:
        sums = layers.group_by("layer").aggregate([("layer", "count"), *((name, "sum") for name in LAYER_COUNTS)])
        for row in sorted(sums.to_pylist(), key=lambda row: row["layer"]):
            counters.layers[str(row["layer"])] = [row["layer_count"], *(row[f"{name}_sum"] for name in LAYER_COUNTS)]
    return totals, counters


def _read(out: Path, manifest: Manifest, prefix: str, columns: list[str]) -> pa.Table | None:
    """These columns of the committed parts' files under ``prefix``; None when there is none."""
    files = [str(out / f.path) for f in manifest.files(prefix)]
    return ds.dataset(files, format=manifest.format).to_table(columns=columns) if files else None
