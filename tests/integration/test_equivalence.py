"""The rows a user gets do not depend on stages, replicas, batch size or padding.

Every scan here runs the real pipeline (local Ray, stage actors, aggregator) and is compared
with a plain per-prompt forward pass (tests/reference.py).
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from cluster import driver
from cluster.driver import run_scan
from neuroscan.config import ScanConfig, Selection
from prompts import batching
from tests.conftest import CORPUS
from tests.reference import assert_scan_matches, reference_scan

TEXTS = [row["text"] for row in CORPUS]


@pytest.fixture(scope="module")
def tiny_reference(tiny_model):
    return reference_scan(tiny_model, TEXTS)


@pytest.fixture(scope="module")
def other_reference(other_model):
    return reference_scan(other_model, TEXTS)


def scan(tmp_path, corpus, **kwargs):
    cfg = ScanConfig(prompts=str(corpus), out=str(tmp_path / "out"), quiet=True, **kwargs)
    return run_scan(cfg).to_dict(), tmp_path / "out"


@pytest.mark.parametrize(
    "stages, replicas, batch_tokens, stream",
    [(1, 1, 8192, False), (2, 1, 300, False), (3, 1, 1000, True), (2, 2, 700, False)],
)
def test_embedded_model_matches_per_prompt_forward(
    ray_session, tmp_path, monkeypatch, corpus, tiny_reference, stages, replicas, batch_tokens, stream
):
    if stream:  # as in a large corpus: the first chunks kept from the plan, the rest read again, ahead
        monkeypatch.setattr(batching, "CHUNK", 2)
        monkeypatch.setattr(driver, "KEEP_PROMPTS", 4)
        p = driver.plan(ScanConfig(prompts=str(corpus), out=str(tmp_path / "out"), batch_tokens=batch_tokens))
        assert (p.kept_chunks, p.n_chunks) == (2, 5)
    manifest, out = scan(tmp_path, corpus, stages=stages, replicas=replicas, batch_tokens=batch_tokens)
    assert manifest["status"] == "complete"
    assert manifest["totals"]["prompts"] == len(CORPUS)
    checked = assert_scan_matches(out, tiny_reference, Selection())
    assert checked == manifest["totals"]["activation_rows"] > 0


@pytest.mark.parametrize(
    "stages, batch_tokens, selection",
    [
        (1, 64, Selection(max_per_layer=0)),
        (3, 4096, Selection(high=1.0, low=-0.1, red=2.0, max_per_layer=20)),
    ],
)
def test_other_shape_matches_per_prompt_forward(
    ray_session, tmp_path, corpus, other_model, other_reference, stages, batch_tokens, selection
):
    manifest, out = scan(
        tmp_path,
        corpus,
        model=str(other_model),
        stages=stages,
        batch_tokens=batch_tokens,
        selection=selection,
        format="arrow",
    )
    checked = assert_scan_matches(out, other_reference, selection)
    assert checked == manifest["totals"]["activation_rows"] > 0
    if selection.max_per_layer == 0:  # nothing capped: every selected neuron is a row
        layers = ds.dataset(out / "layers", format="arrow").to_table()
        assert layers["n_kept"].to_pylist() == layers["n_selected"].to_pylist()


def test_a_directory_of_shards_matches_per_prompt_forward(ray_session, tmp_path, tiny_reference):
    """A dataset's shards (compressed or not, beside its card) scan as the one file would."""
    shards = tmp_path / "shards"
    shards.mkdir()
    for i, (name, compression) in enumerate([("00.jsonl", None), ("01.jsonl.gz", "gzip"), ("02.jsonl.zst", "zstd")]):
        with pa.output_stream(str(shards / name), compression=compression) as f:
            f.write("".join(json.dumps(row) + "\n" for row in CORPUS[i * 3 : (i + 1) * 3]).encode())
    (shards / "README.md").write_text("# the dataset's card\n")
    manifest, out = scan(tmp_path, shards, stages=2, batch_tokens=500)
    assert manifest["totals"]["prompts"] == len(CORPUS)
    checked = assert_scan_matches(out, tiny_reference, Selection())
    assert checked == manifest["totals"]["activation_rows"] > 0


def test_prompts_table_matches_per_prompt_forward(ray_session, tmp_path, corpus, tiny_model, tiny_reference):
    manifest, out = scan(tmp_path, corpus, stages=2, batch_tokens=500)
    prompts = ds.dataset(out / "prompts").to_table().sort_by("prompt_id").to_pylist()
    assert [p["id"] for p in prompts] == [row.get("id", str(i)) for i, row in enumerate(CORPUS)]
    for p in prompts:
        ref = tiny_reference[p["prompt_id"]]
        assert p["token_ids"] == ref["token_ids"]
        assert p["n_tokens"] == len(ref["token_ids"])
        assert len(p["tokens"]) == p["n_tokens"]
        if p["text"].isascii():  # byte-level tokens of ASCII text spell the text back
            assert "".join(p["tokens"]) == p["text"]
        ref_probs = ref["probs"][ref["top_ids"]]
        assert max(abs(a - b) for a, b in zip(p["top_probs"], ref_probs)) < 1e-5
        assert p["top_probs"] == sorted(p["top_probs"], reverse=True)
        assert (p["correct"] is None) == (p["expected"] is None)
