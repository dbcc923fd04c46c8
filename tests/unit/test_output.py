"""cluster.output: the corpus fingerprint --resume compares."""

from __future__ import annotations

from tests.unit.test_readers import _shards


def test_a_directory_corpus_fingerprint_covers_every_shard_and_nothing_else(tmp_path):
    from cluster.output import corpus_fingerprint

    rows = [{"text": f"prompt {i}"} for i in range(6)]
    shards = _shards(tmp_path / "d", rows, ["a.jsonl", "b.jsonl"])
    first = corpus_fingerprint(str(shards))
    assert first.source == str(shards.resolve()) and first.sha256
    (shards / "README.md").write_text("# edited\n")
    assert corpus_fingerprint(str(shards)) == first
    (shards / "b.jsonl").rename(shards / "0.jsonl")  # the same bytes, read first now
    assert corpus_fingerprint(str(shards)) != first
    (shards / "0.jsonl").rename(shards / "b.jsonl")
    assert corpus_fingerprint(str(shards)) == first
    with open(shards / "b.jsonl", "a") as f:
        f.write('{"text": "one more"}\n')
    assert corpus_fingerprint(str(shards)) != first
