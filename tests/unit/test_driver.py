"""cluster.driver: the plan keeps the corpus's first chunks; the run streams the rest."""

from __future__ import annotations

import dataclasses
import json

import pytest

from cluster import driver
from neuroscan.config import ScanConfig
from neuroscan.errors import UserError
from prompts import batching
from prompts.batching import (
    micro_batches,
)
from tests.unit.test_batching import pairs_rows
from workers.checkpoint import load_tokenizer


def test_plan_keeps_the_first_chunks_and_the_run_streams_the_rest(tiny_model, tmp_path, monkeypatch):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": "ab" * (i % 7 + 1)}) + "\n" for i in range(23)))
    cfg = ScanConfig(prompts=str(corpus), out=str(tmp_path / "out"), model=str(tiny_model), batch_tokens=40)
    monkeypatch.setattr(batching, "CHUNK", 5)  # 5 chunks
    whole = list(micro_batches(str(corpus), load_tokenizer(str(tiny_model)), 2048, 40, False))
    everything = driver.plan(cfg)
    assert (everything.kept_chunks, everything.n_chunks) == (5, 5) and pairs_rows(everything.kept) == pairs_rows(whole)
    monkeypatch.setattr(driver, "KEEP_PROMPTS", 12)  # the first two chunks fit, not three
    p = driver.plan(cfg)
    assert (p.kept_chunks, p.n_chunks) == (2, 5) and sum(len(b.prompt_ids) for b, _ in p.kept) == 10
    with driver.corpus_batches(cfg, p) as batches:
        assert pairs_rows(batches) == pairs_rows(whole)
    monkeypatch.setattr(driver, "KEEP_TOKENS", 0)  # nothing fits
    p = driver.plan(cfg)
    assert p.kept_chunks == 0 and p.kept == []
    with driver.corpus_batches(cfg, p) as batches:
        assert pairs_rows(batches) == pairs_rows(whole)
    assert not (tmp_path / "out").exists()  # planning writes nothing


def test_a_corpus_edited_while_the_run_reads_it_stops_the_run(tiny_model, tmp_path, monkeypatch):
    """The run reads a large corpus again after the plan: an edit in between would give other
    micro-batches than those planned (and than a resumed run would plan), so it stops, in one
    line, however far the read-ahead has got."""
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": "ab" * (i % 7 + 1)}) + "\n" for i in range(23)))
    cfg = ScanConfig(prompts=str(corpus), out=str(tmp_path / "out"), model=str(tiny_model), batch_tokens=40)
    monkeypatch.setattr(batching, "CHUNK", 5)
    monkeypatch.setattr(driver, "KEEP_PROMPTS", 5)  # one chunk kept, four read again
    p = driver.plan(cfg)
    driver.check_unchanged(str(corpus), p, "fix")  # untouched: nothing to say
    with driver.corpus_batches(cfg, p) as batches:
        first = next(batches)
        with open(corpus, "a") as f:
            f.write(json.dumps({"text": "one more"}) + "\n")
        with pytest.raises(
            UserError, match=r"c\.jsonl changed while neuroscan was reading it .*put it back and --resume"
        ):
            list(batches)
    assert first[0].batch_id == 0
    header = driver.manifest_header

    def edited_while_hashed(cfg, p):  # an edit between the plan's read and the checksum's
        with open(corpus, "a") as f:
            f.write(json.dumps({"text": "and another"}) + "\n")
        return header(cfg, p)

    monkeypatch.setattr(driver, "manifest_header", edited_while_hashed)
    with pytest.raises(UserError, match=r"changed while neuroscan was reading it .*start the scan again"):
        driver.run_scan(cfg)
    assert not (tmp_path / "out").exists()  # stopped before anything was written
    assert driver.plan(ScanConfig(prompts="seed", out=str(tmp_path / "o"), model=str(tiny_model))).stamp == ()


def test_the_header_records_the_weights_fingerprint_and_the_packing(tiny_model, tmp_path):
    from workers.checkpoint import fingerprint

    cfg = ScanConfig(prompts="seed", out=str(tmp_path / "o"), model=str(tiny_model))
    header = driver.manifest_header(cfg, driver.plan(cfg))
    assert header.model.fingerprint == fingerprint(tiny_model) and header.packing == "balanced"


def test_extra_columns_are_typed_from_the_whole_corpus(tiny_model, tmp_path, monkeypatch):
    """A column that is null in the first chunks and an integer later is an integer: every part
    of prompts/ gets the one schema the header records."""
    corpus = tmp_path / "c.jsonl"
    rows = [
        {"text": f"p{i}", "topic": ["math", "art"][i % 2], "level": i if i >= 15 else None, "score": [1, 2.5][i == 20]}
        for i in range(23)
    ]
    corpus.write_text("".join(json.dumps(row) + "\n" for row in rows))
    monkeypatch.setattr(batching, "CHUNK", 5)
    monkeypatch.setattr(driver, "KEEP_PROMPTS", 5)  # the later chunks are read again by the run
    cfg = ScanConfig(prompts=str(corpus), out=str(tmp_path / "out"), model=str(tiny_model), batch_tokens=40)
    p = driver.plan(cfg)
    assert p.columns == {"topic": "string", "level": "int64", "score": "float64"}
    assert driver.manifest_header(cfg, p).corpus.columns == p.columns
    seed = ScanConfig(prompts="seed", out=str(tmp_path / "o"), model=str(tiny_model))
    assert driver.manifest_header(seed, driver.plan(seed)).corpus.columns == {}


def test_with_repair_the_plan_finds_the_micro_batch_of_each_skipped_prompt(tiny_model, tmp_path, monkeypatch):
    """``--repair`` takes a dropped part's skipped prompts out of the manifest by their micro-batch,
    which only the plan knows (also for prompts past the chunks it keeps)."""
    from neuroscan.manifest import write_manifest
    from tests.manifests import header

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": "ab" * (i % 7 + 1)}) + "\n" for i in range(23)))
    out = tmp_path / "out"
    out.mkdir()
    skipped = [{"prompt_id": i, "id": str(i), "reason": "too large"} for i in (3, 21)]
    write_manifest(out, header(packing="balanced", skipped=skipped))
    cfg = ScanConfig(
        prompts=str(corpus), out=str(out), model=str(tiny_model), batch_tokens=40, resume=True, repair=True
    )
    monkeypatch.setattr(batching, "CHUNK", 5)
    monkeypatch.setattr(driver, "KEEP_PROMPTS", 5)  # prompt 21 is in a chunk read again during the run
    whole = list(micro_batches(str(corpus), load_tokenizer(str(tiny_model)), 2048, 40, False))
    want = {int(i): b.batch_id for b, _ in whole for i in b.prompt_ids if i in (3, 21)}
    assert driver.plan(cfg).skipped_batches == want and len(set(want.values())) == 2
    assert driver.plan(dataclasses.replace(cfg, repair=False)).skipped_batches == {}


def test_the_summary_ends_with_the_fidelity_check_when_the_run_had_one():
    from neuroscan.manifest import verification_line
    from tests.manifests import header, verification

    for check in (verification(), verification(off=40)):
        manifest = header(status="complete", verification=check)
        assert driver.summary_lines(manifest, "out")[-1] == verification_line(manifest)
    assert not any(line.startswith("fidelity") for line in driver.summary_lines(header(status="complete"), "out"))
