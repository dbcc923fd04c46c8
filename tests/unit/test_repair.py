"""aggregator.repair (no Ray): the running sums counted again from the tables, and a damaged
part dropped so that scanning its micro-batches again gives the undamaged run."""

from __future__ import annotations

import shutil

import numpy as np

from aggregator.aggregator import Aggregator, summarize
from aggregator.repair import drop_damaged, recount
from neuroscan.manifest import file_damage, read_manifest
from neuroscan.messages import Prompt, Tokenized
from tests.manifests import HEADER
from tests.same_output import assert_same_output
from tests.unit.test_aggregator import _stage_rows
from tests.unit.test_manifest import _flip_a_byte

TOKENS = [chr(i) for i in range(256)]
FAMILIES = ["a", "b", None, ""]  # a missing family and an empty one both count as "(none)"
SKIPPED = {5: 13}  # batch 5 also had prompt 13, skipped (--on-error skip)


def _batch(b: int):
    """Micro-batch ``b`` as the stages send it: three prompts over the three layers, layer 2
    keeping no row (an empty layer), every count and answer drawn from ``b``."""
    rng = np.random.default_rng(b)
    lengths = [int(n) for n in rng.integers(2, 9, 3)]
    group = []
    for i, n in enumerate(lengths):
        family, variant = FAMILIES[int(rng.integers(4))], ["v", None][int(rng.integers(2))]
        expected = None if rng.random() < 0.3 else " x"
        prompt = Prompt(3 * b + i, f"p{3 * b + i}", "t" * n, family=family, variant=variant, expected=expected)
        group.append(Tokenized(prompt, [65] * n, [66] if expected else []))
    first = _stage_rows(b, 0, 2, lengths, rows_per_layer=1 + b % 3, last=False)
    last = _stage_rows(b, 2, 1, lengths, rows_per_layer=0)
    for stage in (first, last):
        for name in ("n_selected", "n_kept", "n_above_any", "n_below_any"):
            stage.per_prompt[name] = rng.integers(0, 50, stage.per_prompt[name].shape).astype(np.int32)
    last.predictions["correct"] = np.array(
        [-1 if t.prompt.expected is None else rng.integers(2) for t in group], np.int8
    )
    return group, first, last


def _scan(out, batches, rows_per_part: int = 12) -> Aggregator:
    """The aggregator of a run in ``out`` (new or resumed) that got ``batches``."""
    out.mkdir(parents=True, exist_ok=True)
    agg = Aggregator(str(out), HEADER, TOKENS, rows_per_part)
    for b in batches:
        if b in SKIPPED:
            agg.skip(b, [{"prompt_id": SKIPPED[b], "id": f"p{SKIPPED[b]}", "reason": "too large"}], batch_done=False)
        agg.add(*_batch(b))
    return agg


def _finished(out, batches=range(9)):
    agg = _scan(out, batches)
    manifest = agg.finish({"seconds": 1.0})[1]
    agg.close()
    return manifest


def test_a_recount_of_a_run_equals_the_sums_its_parts_added(tmp_path):
    manifest = _finished(tmp_path / "run")
    assert len(manifest.parts) >= 4 and manifest.counters.accuracy["family"]["(none)"][1] > 0
    totals, counters = recount(tmp_path / "run", manifest)
    assert totals == manifest.totals and counters == manifest.counters
    assert summarize(counters) == manifest.summary
    kept = read_manifest(tmp_path / "run")
    kept.parts = kept.parts[1:]  # the sums of the parts that remain: those of a run of their batches alone
    alone = _finished(tmp_path / "alone", [b for part in kept.parts for b in part.batches])
    assert recount(tmp_path / "run", kept) == (alone.totals, alone.counters)


def test_a_dropped_part_scanned_again_gives_the_undamaged_run(tmp_path):
    whole = tmp_path / "whole"
    _finished(whole)
    out = tmp_path / "out"
    shutil.copytree(whole, out)
    manifest = read_manifest(out)
    middle = next(p for p in manifest.parts if 5 in p.batches)  # the part of the skipped prompt's batch
    assert middle.part < len(manifest.parts)  # a new part must not take the last part's number
    damaged = next(f.path for f in middle.files if f.path.startswith("prompts/"))
    _flip_a_byte(out / damaged)
    line = drop_damaged(out, manifest, file_damage(out, manifest, hashes=True), {13: 5})
    assert line == (
        f"--repair: dropped part {middle.part} ({damaged} holds other bytes than were written (its sha256 "
        f"differs)), rescanning its {len(middle.batches)} micro-batch{'es' * (len(middle.batches) > 1)}"
    )
    on_disk = read_manifest(out)
    assert on_disk == manifest and on_disk.status == "running"
    assert on_disk.neurons is None and on_disk.empty_layers == [] and on_disk.skipped == []
    assert not any((out / f.path).exists() for f in middle.files)
    assert not (out / "neurons").exists() or not list((out / "neurons").iterdir())
    assert file_damage(out, on_disk, hashes=True) == {}
    agg = _scan(out, [b for b in range(9) if b not in on_disk.committed_batches()])  # what the resumed run scans
    repaired = agg.finish({"seconds": 1.0})[1]
    agg.close()
    assert_same_output(out, whole)
    original = read_manifest(whole)
    assert repaired.counters == original.counters and repaired.skipped == original.skipped
    assert max(p.part for p in repaired.parts) > max(p.part for p in original.parts)


def test_damage_to_the_finish_alone_drops_no_part(tmp_path):
    whole = tmp_path / "whole"
    manifest = _finished(whole)
    out = tmp_path / "out"
    shutil.copytree(whole, out)
    empty = manifest.empty_layers[0].path
    _flip_a_byte(out / manifest.neurons.path)
    (out / empty).unlink()
    line = drop_damaged(out, manifest, file_damage(out, manifest, hashes=True), {13: 5})
    assert line == (
        f"--repair: {empty} is missing; and 1 more damaged file; no part dropped, "
        "writing neurons/ and the empty layers' files again"
    )
    assert read_manifest(out).parts == read_manifest(whole).parts and read_manifest(out).skipped
    agg = _scan(out, [])  # every batch is committed: the resumed run only finishes
    agg.finish({"seconds": 1.0})
    agg.close()
    assert_same_output(out, whole)
