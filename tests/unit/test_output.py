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


def test_resume_refuses_a_run_whose_committed_part_was_rewritten(tmp_path):
    """A part rewritten as valid data of the same size is found by its sha256 before anything
    is scanned (resuming over it completed with the altered rows)."""
    import pytest

    from cluster.output import prepare_output
    from neuroscan.errors import UserError
    from neuroscan.manifest import read_manifest
    from tests.manifests import HEADER
    from tests.runs import finished_run
    from tests.unit.test_manifest import _flip_a_byte

    out = finished_run(tmp_path / "run")
    manifest = read_manifest(out)
    assert prepare_output(out, overwrite=False, resume=True, header=HEADER) == manifest
    layer = manifest.files("activations/")[0].path
    _flip_a_byte(out / layer)
    with pytest.raises(UserError, match=f"is damaged: {layer} holds other bytes.*--resume --repair.*--overwrite"):
        prepare_output(out, overwrite=False, resume=True, header=HEADER)


def test_resume_refuses_other_weights_at_the_same_path_but_not_a_run_written_before_fingerprints(tmp_path):
    import dataclasses

    import pytest

    from cluster.output import prepare_output
    from neuroscan.errors import UserError
    from neuroscan.manifest import write_manifest
    from tests.manifests import header

    def model(fp):
        return dataclasses.replace(header().model, path="/models/m", fingerprint=fp)

    out = tmp_path / "run"
    out.mkdir()
    write_manifest(out, header(model=model("aaaa")))
    with pytest.raises(UserError, match="the weights at --model /models/m are not the ones the run was scanned with"):
        prepare_output(out, overwrite=False, resume=True, header=header(model=model("bbbb")))
    assert prepare_output(out, overwrite=False, resume=True, header=header(model=model("aaaa")))
    write_manifest(out, header(model=model(None)))  # written before runs recorded one
    assert prepare_output(out, overwrite=False, resume=True, header=header(model=model("bbbb")))
