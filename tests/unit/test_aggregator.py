"""The aggregator (no Ray): schemas, parts, manifest, duplicate deliveries."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from aggregator.aggregator import Aggregator
from neuroscan.config import ScanConfig
from neuroscan.manifest import PartFile, read_manifest
from neuroscan.messages import Prompt, StageRows, Tokenized
from neuroscan.schema import ACTIVATIONS, SCHEMA_VERSION
from tests.manifests import HEADER


def _group(ids, lengths):
    return [
        Tokenized(Prompt(i, str(i), "t" * n, family="f", expected=" x"), [65] * n, [66]) for i, n in zip(ids, lengths)
    ]


def _stage_rows(batch_id, start, n_layers, lengths, rows_per_layer=2, last=True):
    b = len(lengths)
    m = n_layers * b * rows_per_layer
    layer_offset = np.repeat(np.arange(n_layers), b * rows_per_layer).astype(np.int16)
    row = np.tile(np.repeat(np.arange(b), rows_per_layer), n_layers).astype(np.int32)
    width = (max(lengths) + 3) // 4
    rows = {
        "layer_offset": layer_offset,
        "row": row,
        "neuron": np.tile(np.arange(rows_per_layer), n_layers * b).astype(np.int32),
        "max_act": np.full(m, 4.0, np.float32),
        "max_pos": np.zeros(m, np.int16),
        "min_act": np.full(m, -0.1, np.float32),
        "min_pos": np.zeros(m, np.int16),
        "n_above": np.ones(m, np.int16),
        "n_below": np.ones(m, np.int16),
        "bands": np.full((m, width), 0b11100100, np.uint8),
    }
    per_prompt = {
        k: np.full((n_layers, b), rows_per_layer, np.int32)
        for k in ("n_selected", "n_kept", "n_above_any", "n_below_any")
    }
    for name in ("mean_coverage", "red_coverage", "blue_coverage"):
        per_prompt[name] = np.full((n_layers, b), 0.5, np.float32)
    predictions = (
        {
            "top_ids": np.tile(np.arange(5, dtype=np.int32), (b, 1)),
            "top_probs": np.full((b, 5), 0.2, np.float32),
            "correct": np.array([1] + [0] * (b - 1), np.int8),
        }
        if last
        else None
    )
    return StageRows(batch_id, start, rows, per_prompt, predictions)


def test_parts_manifest_and_duplicates(tmp_path):
    tokens = [chr(i) for i in range(256)]
    agg = Aggregator(str(tmp_path), HEADER, tokens, rows_per_part=10)
    assert read_manifest(tmp_path).status == "running"
    lengths = [5, 3]
    for batch_id, ids in [(0, [0, 1]), (1, [2, 3]), (0, [0, 1])]:  # batch 0 delivered twice
        agg.add(
            _group(ids, lengths), _stage_rows(batch_id, 0, 2, lengths, last=False), _stage_rows(batch_id, 2, 1, lengths)
        )
    manifest = agg.finish({"seconds": 1.0})[1].to_dict()
    assert manifest["status"] == "complete"
    assert manifest["totals"]["prompts"] == 4
    committed = [b for part in manifest["parts"] for b in part["batches"]]
    assert sorted(committed) == [0, 1]  # each batch once
    for part in manifest["parts"]:
        for f in part["files"]:
            data = (tmp_path / f["path"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == f["sha256"] and len(data) == f["bytes"]
    table = ds.dataset(tmp_path / "activations").to_table()
    assert table.num_rows == manifest["totals"]["activation_rows"] == 2 * 3 * 2 * 2
    assert sorted(set(table["layer"].to_pylist())) == [0, 1, 2]
    assert table.schema.field("layer").type == pa.int32()
    assert table.schema.metadata[b"neuroscan.schema_version"] == str(SCHEMA_VERSION).encode()
    prompts = ds.dataset(tmp_path / "prompts").to_table().sort_by("prompt_id").to_pylist()
    assert [p["prompt_id"] for p in prompts] == [0, 1, 2, 3]
    assert prompts[0]["top_tokens"] == ["\x00", "\x01", "\x02", "\x03", "\x04"] and prompts[0]["correct"] is True
    layers = ds.dataset(tmp_path / "layers").to_table()
    assert layers.num_rows == 4 * 3
    assert manifest["summary"]["layers"]["0"]["mean_kept"] == 2
    assert manifest["summary"]["accuracy"]["family"]["f"] == {"correct": 2, "total": 4, "accuracy": 0.5}
    assert manifest["summary"]["accuracy"]["variant"]["(none)"]["total"] == 4
    assert not list(tmp_path.rglob("*.tmp"))


def test_bands_column_bytes_per_row(tmp_path):
    agg = Aggregator(str(tmp_path), HEADER, [chr(i) for i in range(256)], rows_per_part=ScanConfig.rows_per_part)
    agg.add(_group([0, 1], [9, 2]), _stage_rows(0, 0, 1, [9, 2]))
    agg.finish({})
    table = ds.dataset(tmp_path / "activations").to_table().to_pylist()
    assert {len(r["bands"]) for r in table if r["prompt_id"] == 0} == {3}
    assert {len(r["bands"]) for r in table if r["prompt_id"] == 1} == {1}


def test_disk_full_during_a_part_keeps_earlier_parts(tmp_path, monkeypatch):
    import errno

    import aggregator.writer as writer
    from neuroscan.errors import UserError

    agg = Aggregator(str(tmp_path), HEADER, [chr(i) for i in range(256)], rows_per_part=1)
    agg.add(_group([0, 1], [5, 3]), _stage_rows(0, 0, 3, [5, 3]))
    agg.wait()  # part 1 committed
    before = {p: p.read_bytes() for p in tmp_path.rglob("*.parquet")}
    calls = {"n": 0}
    real = writer.pq.write_table

    def full_disk(table, where, **kw):
        calls["n"] += 1
        if calls["n"] == 3:  # fail in the middle of part 2
            with open(where, "wb") as f:
                f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(table, where, **kw)

    monkeypatch.setattr(writer.pq, "write_table", full_disk)
    agg.add(_group([2, 3], [5, 3]), _stage_rows(1, 0, 3, [5, 3]))  # part 2 is written in the background...
    with pytest.raises(
        UserError, match=r"writing part 2 .* failed \(No space left on device\); parts 1-1 are intact: .*--resume"
    ):
        agg.add(_group([4, 5], [5, 3]), _stage_rows(2, 0, 3, [5, 3]))  # ... and its failure stops the next call
    manifest = read_manifest(tmp_path).to_dict()
    assert [p["part"] for p in manifest["parts"]] == [1]
    assert {p: p.read_bytes() for p in tmp_path.rglob("*.parquet")} == before  # part 1 intact, nothing of part 2
    assert not list(tmp_path.rglob("*.tmp"))


def test_restarted_aggregator_continues_the_manifest(tmp_path):
    tokens = [chr(i) for i in range(256)]
    first = Aggregator(str(tmp_path), HEADER, tokens, rows_per_part=1)
    first.add(_group([0, 1], [5, 3]), _stage_rows(0, 0, 3, [5, 3]))
    first.wait()
    (tmp_path / "layers" / "part-00002.parquet").write_bytes(b"half")  # a part cut short
    second = Aggregator(str(tmp_path), HEADER, tokens, rows_per_part=1)
    assert not (tmp_path / "layers" / "part-00002.parquet").exists()
    assert second.add(_group([0, 1], [5, 3]), _stage_rows(0, 0, 3, [5, 3]))[:2] == (0, 0)  # already committed
    second.add(_group([2, 3], [5, 3]), _stage_rows(1, 0, 3, [5, 3]))
    manifest = second.finish({})[1].to_dict()
    assert [p["batches"] for p in manifest["parts"]] == [[0], [1]]
    assert manifest["totals"]["prompts"] == 4 and manifest["summary"]["layers"]["0"]["mean_kept"] == 2


def test_a_duplicate_of_a_committed_batch_is_reported_committed(tmp_path):
    """So that the driver forgets it instead of resending it after every aggregator restart."""
    agg = Aggregator(str(tmp_path), HEADER, [chr(i) for i in range(256)], rows_per_part=10**6)
    lengths = [5, 3]
    rows = lambda b: (_group([2 * b, 2 * b + 1], lengths), _stage_rows(b, 0, 2, lengths))
    assert agg.add(*rows(0))[3] == []  # buffered, not committed
    assert agg.add(*rows(0))[:2] == (0, 0) and agg.add(*rows(0))[3] == []  # a duplicate, still only buffered
    agg.commit()
    assert agg.add(*rows(0))[:2] == (0, 0) and agg.add(*rows(0))[3] == [0]  # committed: the sender may forget it


def test_parts_are_written_off_the_callers_path(tmp_path, monkeypatch):
    """``add`` returns while its part is still being written; the part's batches are reported
    committed by the first call after the manifest lists them, once each."""
    import threading

    import aggregator.writer as writer

    gate = threading.Event()
    real = writer.pq.write_table

    def slow_disk(table, where, **kw):
        assert gate.wait(10)
        return real(table, where, **kw)

    monkeypatch.setattr(writer.pq, "write_table", slow_disk)
    agg = Aggregator(str(tmp_path), HEADER, [chr(i) for i in range(256)], rows_per_part=1)
    lengths = [5, 3]
    assert agg.add(_group([0, 1], lengths), _stage_rows(0, 0, 2, lengths))[3] == []  # returned with the part unwritten
    assert read_manifest(tmp_path).to_dict()["parts"] == []
    gate.set()
    agg.wait()
    assert [p["batches"] for p in read_manifest(tmp_path).to_dict()["parts"]] == [[0]]
    assert agg.add(_group([2, 3], lengths), _stage_rows(1, 0, 2, lengths))[3] == [0]  # reported by the next call
    agg.wait()
    assert agg.add(_group([2, 3], lengths), _stage_rows(1, 0, 2, lengths))[2:] == (
        agg.incarnation,
        [1],
    )  # a duplicate, now committed
    manifest = agg.finish({})[1].to_dict()
    assert [p["batches"] for p in manifest["parts"]] == [[0], [1]]
    assert manifest["totals"]["prompts"] == 4


def test_buffering_goes_on_while_a_part_is_written(tmp_path, monkeypatch):
    """Batches that arrive while part N is written go to part N + 1, never into part N."""
    import threading

    import aggregator.writer as writer

    gate = threading.Event()
    real = writer.pq.write_table
    monkeypatch.setattr(writer.pq, "write_table", lambda t, w, **kw: (gate.wait(10), real(t, w, **kw))[1])
    agg = Aggregator(str(tmp_path), HEADER, [chr(i) for i in range(256)], rows_per_part=12)
    lengths = [5, 3]
    for b in range(2):  # 8 rows each: the second crosses 12 and starts part 1
        agg.add(_group([2 * b, 2 * b + 1], lengths), _stage_rows(b, 0, 2, lengths))
    agg.add(_group([4, 5], lengths), _stage_rows(2, 0, 2, lengths))  # buffered while part 1 is written
    gate.set()
    manifest = agg.finish({})[1].to_dict()
    assert [p["batches"] for p in manifest["parts"]] == [[0, 1], [2]]
    table = ds.dataset(tmp_path / "activations").to_table()
    assert sorted(set(table["prompt_id"].to_pylist())) == [0, 1, 2, 3, 4, 5]
    assert table.num_rows == manifest["totals"]["activation_rows"] == 3 * 8


def _one_pass_neurons(out, k: int) -> pa.Table:
    """neurons/ recomputed from the activation rows on disk in one pass (no deltas)."""
    from aggregator.neurons import LayerState

    acts = ds.dataset(out / "activations").to_table()
    tables = []
    for layer in sorted(set(acts["layer"].to_pylist())):
        rows = acts.filter(pa.compute.equal(acts["layer"], layer))
        state = LayerState(k)
        state.add_rows(
            *(rows[c].to_numpy() for c in ("neuron", "max_act", "prompt_id", "max_pos")), red=HEADER.bands.red
        )
        tables.append(state.table(layer))
    return pa.concat_tables(tables)


def _random_acts(stage: StageRows, rng) -> StageRows:
    """fp16-valued activations: ties within and across micro-batches, as a real scan has."""
    stage.rows["max_act"] = rng.normal(3, 1, len(stage.rows["max_act"])).astype(np.float16).astype(np.float32)
    stage.rows["neuron"] = rng.integers(0, 6, len(stage.rows["neuron"])).astype(np.int32)
    return stage


@pytest.mark.parametrize("fold_rows", [1, 10**9])
def test_neurons_merged_in_memory_equal_one_pass_and_the_deltas_on_disk(tmp_path, monkeypatch, fold_rows):
    """The neurons table written at the end (deltas merged as parts commit, folded during the
    run or only at the end, and after a restart rebuilt from the committed deltas) equals one
    pass over every activation row, and the merge of the committed deltas read back."""
    from aggregator import neurons

    monkeypatch.setattr(neurons, "FOLD_ROWS", fold_rows)
    rng = np.random.default_rng(fold_rows)
    tokens, lengths = [chr(i) for i in range(256)], [6, 4, 5]
    header = dataclasses.replace(HEADER, top_k=3)
    first = Aggregator(str(tmp_path), header, tokens, rows_per_part=20)
    for b in range(4):
        ids = [3 * b, 3 * b + 1, 3 * b + 2]
        first.add(_group(ids, lengths), _random_acts(_stage_rows(b, 0, 2, lengths, rows_per_layer=4), rng))
    first.wait()
    second = Aggregator(str(tmp_path), header, tokens, rows_per_part=20)  # restarted: rebuilds the merge from disk
    for b in range(4, 9):
        ids = [3 * b, 3 * b + 1, 3 * b + 2]
        second.add(_group(ids, lengths), _random_acts(_stage_rows(b, 0, 2, lengths, rows_per_layer=4), rng))
    manifest = second.finish({})[1].to_dict()
    assert len(manifest["parts"]) >= 4
    written = ds.dataset(tmp_path / manifest["neurons"]["path"]).to_table().replace_schema_metadata(None)
    assert written.equals(_one_pass_neurons(tmp_path, k=3))
    assert written.equals(
        neurons.neurons_table(
            tmp_path,
            [PartFile(**f) for p in manifest["parts"] for f in p["files"] if f["path"].startswith("neuron_parts/")],
            "parquet",
            k=3,
        )
    )
    assert second.finish({})[1].neurons.sha256 == manifest["neurons"]["sha256"]  # a retried finish writes the same


def test_every_layer_has_a_directory_and_a_run_that_keeps_nothing_reads_as_an_empty_table(tmp_path):
    import duckdb

    lengths = [5, 3]
    (tmp_path / "some").mkdir(), (tmp_path / "none").mkdir()  # as prepare_output leaves them
    agg = Aggregator(
        str(tmp_path / "some"), HEADER, [chr(i) for i in range(256)], rows_per_part=ScanConfig.rows_per_part
    )
    agg.add(
        _group([0, 1], lengths),
        _stage_rows(0, 0, 1, lengths, last=False),
        _stage_rows(0, 1, 2, lengths, rows_per_layer=0),
    )
    manifest = agg.finish({})[1].to_dict()
    assert [f["path"] for f in manifest["empty_layers"]] == [
        "activations/layer_01/part-00000.parquet",
        "activations/layer_02/part-00000.parquet",
    ]
    table = ds.dataset(tmp_path / "some" / "activations").to_table()
    assert table.num_rows == 2 * 2 and set(table["layer"].to_pylist()) == {0}
    assert ds.dataset(tmp_path / "some" / "activations" / "layer_02").to_table().num_rows == 0

    agg = Aggregator(
        str(tmp_path / "none"), HEADER, [chr(i) for i in range(256)], rows_per_part=ScanConfig.rows_per_part
    )
    agg.add(
        _group([0, 1], lengths),
        _stage_rows(0, 0, 2, lengths, rows_per_layer=0, last=False),
        _stage_rows(0, 2, 1, lengths, rows_per_layer=0),
    )
    manifest = agg.finish({})[1].to_dict()
    assert manifest["totals"]["activation_rows"] == 0 and len(manifest["empty_layers"]) == 3
    for f in manifest["empty_layers"]:
        data = (tmp_path / "none" / f["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == f["sha256"] and f["rows"] == 0
    table = ds.dataset(tmp_path / "none" / "activations").to_table()
    assert table.num_rows == 0 and table.schema.field("layer").type == pa.int32()
    assert table.schema.names == ACTIVATIONS.names
    query = f"SELECT count(*) FROM read_parquet('{tmp_path / 'none'}/activations/*/*.parquet') WHERE layer = 2"
    assert duckdb.sql(query).fetchall() == [(0,)]


def test_a_full_disk_while_neurons_is_written_is_one_line_and_resume_finishes(tmp_path, monkeypatch):
    import errno
    import os

    from aggregator import aggregator as module
    from neuroscan.errors import UserError

    tokens = [chr(i) for i in range(256)]
    agg = Aggregator(str(tmp_path), HEADER, tokens, rows_per_part=10**6)
    agg.add(_group([0, 1], [5, 3]), _stage_rows(0, 0, 3, [5, 3]))
    real = module.write_table

    def full(table, out, rel, fmt):
        if rel.startswith("neurons/"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(table, out, rel, fmt)

    monkeypatch.setattr(module, "write_table", full)
    with pytest.raises(
        UserError, match="writing neurons/ to .* failed \\(No space left on device\\); every part is committed"
    ):
        agg.finish({})
    on_disk = read_manifest(tmp_path)
    assert on_disk.status == "running" and on_disk.neurons is None and len(on_disk.parts) == 1
    monkeypatch.setattr(module, "write_table", real)
    resumed = Aggregator(str(tmp_path), HEADER, tokens, rows_per_part=10**6).finish({})[1]
    assert resumed.status == "complete" and resumed.neurons is not None and resumed.totals.prompts == 2


def test_after_a_part_fails_to_be_written_no_other_part_is_started(tmp_path, monkeypatch):
    """A scan stopping on a full disk is killed once its calls in flight have landed; a part
    started by one of those calls would be cut in the middle (half-written files left)."""
    import errno
    import os

    from aggregator import aggregator as module
    from neuroscan.errors import UserError

    writes = []

    def full(table, out, rel, fmt):
        writes.append(rel)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(module, "write_table", full)
    agg = Aggregator(str(tmp_path), HEADER, [chr(i) for i in range(256)], rows_per_part=1)
    agg.add(_group([0, 1], [5, 3]), _stage_rows(0, 0, 3, [5, 3]))  # its part is written in the background
    with pytest.raises(UserError, match="writing part 1 .*No space left on device"):
        agg.wait()
    tried = len(writes)
    for batch in (1, 2):
        with pytest.raises(UserError, match="writing part 1 .*No space left on device"):
            agg.add(_group([2 * batch, 2 * batch + 1], [5, 3]), _stage_rows(batch, 0, 3, [5, 3]))
    with pytest.raises(UserError, match="writing part 1"):
        agg.finish({})
    assert len(writes) == tried and read_manifest(tmp_path).parts == []
