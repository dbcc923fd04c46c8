"""compare on constructed output directories: the separating neuron tops the list; a corpus
column against the rest has a known answer, with q-values."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aggregator.aggregator import Aggregator
from cluster.cli import main
from neuroscan.corpus_columns import ColumnTypes
from neuroscan.errors import UserError
from neuroscan.manifest import Corpus, Part, PartFile, write_manifest
from neuroscan.messages import StageRows, Tokenized
from neuroscan.schema import ACTIVATIONS, LAYERS, PROMPTS
from prompts.readers import read_prompts
from results.compare import compare
from tests.conftest import fill
from tests.manifests import header


@pytest.fixture
def run_dir(tmp_path):
    """20 'days' and 30 'months' prompts; neuron (3, 7) fires red on every days prompt only."""
    families = ["days"] * 20 + ["months"] * 30
    prompts = [
        {
            "prompt_id": i,
            "id": str(i),
            "family": f,
            "variant": "icl",
            "text": "t",
            "token_ids": [1],
            "tokens": ["t"],
            "n_tokens": 1,
            "expected": None,
            "top_tokens": [],
            "top_probs": [],
            "correct": None,
        }
        for i, f in enumerate(families)
    ]
    (tmp_path / "prompts").mkdir()
    pq.write_table(pa.Table.from_pylist(prompts, schema=PROMPTS), tmp_path / "prompts" / "part-00001.parquet")
    rng = np.random.default_rng(0)
    rows = {layer: [] for layer in (0, 3)}
    for pid, family in enumerate(families):
        for layer in (0, 3):
            for neuron in rng.choice(64, size=10, replace=False):
                if (layer, neuron) != (3, 7):
                    rows[layer].append((pid, int(neuron), float(rng.uniform(0, 5))))
        if family == "days":
            rows[3].append((pid, 7, 4.2))
    for layer, items in rows.items():
        table = pa.table(
            {
                "prompt_id": [r[0] for r in items],
                "layer": [layer] * len(items),
                "neuron": [r[1] for r in items],
                "max_act": [r[2] for r in items],
                "max_pos": [0] * len(items),
                "min_act": [0.0] * len(items),
                "min_pos": [0] * len(items),
                "n_above": [1] * len(items),
                "n_below": [0] * len(items),
                "bands": [b"\x03"] * len(items),
                "up_at_max": [None] * len(items),
                "up_at_min": [None] * len(items),
            },
            schema=ACTIVATIONS,
        )
        (tmp_path / "activations" / f"layer_{layer:02d}").mkdir(parents=True)
        pq.write_table(table, tmp_path / "activations" / f"layer_{layer:02d}" / "part-00001.parquet")
    files = [
        PartFile(
            str(f.relative_to(tmp_path)),
            pq.read_metadata(f).num_rows,
            f.stat().st_size,
            hashlib.sha256(f.read_bytes()).hexdigest(),
        )
        for f in sorted(tmp_path.rglob("*.parquet"))
    ]
    write_manifest(tmp_path, header(partition=[[0, 4]], parts=[Part(1, [0], files)]))
    return tmp_path


def test_only_committed_parts_are_read(run_dir, tmp_path, capsys):
    """A killed scan leaves a part half-written, which its manifest does not list: compare reads
    what was committed, as the report does."""
    before = compare(run_dir, "family", "days", "months")
    (run_dir / "activations" / "layer_03" / "part-00002.parquet").write_bytes(b"PAR1 half a file")
    (run_dir / "prompts" / "part-00002.parquet").write_bytes(b"PAR1")
    assert compare(run_dir, "family", "days", "months").equals(before)
    (run_dir / "manifest.json").write_text('{"status": ')  # edited by hand, or a disk that lost it
    out = tmp_path / "cmp.parquet"
    assert main(["compare", str(run_dir), "--by", "family", "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"neuroscan: error: {run_dir / 'manifest.json'} is not valid JSON (Expecting value): something other than "
        "neuroscan wrote it (neuroscan replaces it whole); restore it, or scan again with --overwrite\n"
    )
    assert not out.exists()


def test_separating_neuron_tops_the_list(run_dir):
    table = compare(run_dir, "family", "days", "months")
    top = table.slice(0, 1).to_pylist()[0]
    assert (top["layer"], top["neuron"]) == (3, 7)
    assert top["a_frac"] == 1.0 and top["b_frac"] == 0.0 and top["diff"] == 1.0
    assert top["a_red_frac"] == 1.0 and top["red_diff"] == 1.0
    assert top["z"] == pytest.approx(np.sqrt(50), rel=1e-9)  # pooled p = 0.4: 1 / sqrt(0.24 * (1/20 + 1/30))
    diffs = np.abs(table["diff"].to_numpy())
    assert (diffs[:-1] >= diffs[1:]).all()
    swapped = compare(run_dir, "family", "months", "days").slice(0, 1).to_pylist()[0]
    assert (swapped["layer"], swapped["neuron"], swapped["diff"]) == (3, 7, -1.0)


def test_groups_default_and_errors(run_dir, tmp_path, capsys):
    assert compare(run_dir, "family").schema.metadata[b"a"] == b"days"  # exactly two groups
    with pytest.raises(
        UserError, match=r"this run has 1 variant value\(s\) \['icl'\], compare needs two: .*--variants icl,shuffled"
    ):
        compare(run_dir, "variant")
    assert compare(run_dir, "family", b="days").schema.metadata[b"a"] == b"months"  # the other of the two
    assert compare(run_dir, "family", a="months").schema.metadata[b"b"] == b"days"
    with pytest.raises(UserError, match=r"--b 'weeks' is not a family of this run: use one of \['days', 'months'\]"):
        compare(run_dir, "family", "days", "weeks")
    with pytest.raises(UserError, match="--a and --b are both 'days': name two different family values"):
        compare(run_dir, "family", "days", "days")
    out = tmp_path / "cmp.parquet"
    assert main(["compare", str(run_dir), "--by", "family", "--out", str(out)]) == 0
    assert pq.read_table(out).num_rows > 1
    assert "A = days (20 prompts)" in capsys.readouterr().out
    assert main(["compare", str(tmp_path / "nope"), "--by", "family", "--out", str(out)]) == 2
    blocker = tmp_path / "a-file"
    blocker.write_text("mine")
    capsys.readouterr()
    assert main(["compare", str(run_dir), "--by", "family", "--out", str(blocker / "c.parquet")]) == 2
    assert (
        capsys.readouterr().err
        == f"neuroscan: error: --out {blocker / 'c.parquet'}: cannot create {blocker} (File exists): choose a writable place\n"
    )


def test_a_reader_that_leaves_early_gets_no_traceback(run_dir, tmp_path):
    """`neuroscan compare ... | head -1`: head exits after one line and the pipe closes."""
    read, write = os.pipe()
    os.close(read)  # the reader already left
    out = tmp_path / "cmp.parquet"
    result = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "compare", str(run_dir), "--by", "family", "--out", str(out)],
        stdout=write,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        timeout=120,
    )
    os.close(write)
    assert result.returncode == 141 and result.stderr == ""
    assert pq.read_table(out).num_rows > 1  # written before the summary was printed


def test_a_full_disk_while_compare_writes_is_one_line_and_leaves_no_file(tmp_path, monkeypatch):
    import errno
    import os

    import pyarrow as pa
    import pytest

    from neuroscan.errors import UserError
    from results import compare

    def full(table, out_dir, rel_stem, fmt):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(compare, "write_table", full)
    out = tmp_path / "c.parquet"
    with pytest.raises(UserError, match=f"writing {out} failed \\(No space left on device\\): fix the disk"):
        compare.write_compare(pa.table({"x": [1]}), out)
    assert list(tmp_path.iterdir()) == []


def test_compare_onto_a_full_disk_is_one_line_and_keeps_the_earlier_table(run_dir, tmpfs, capsys):
    """A real tmpfs, full: the write stops in one line, the table an earlier compare wrote there
    stays as it was and no temporary file is left."""
    disk = tmpfs("1m")
    out = disk / "cmp.parquet"
    assert main(["compare", str(run_dir), "--by", "family", "--out", str(out)]) == 0
    earlier = out.read_bytes()
    capsys.readouterr()
    fill(disk)
    assert main(["compare", str(run_dir), "--by", "family", "--sort", "z", "--out", str(out)]) == 2
    got = capsys.readouterr()
    assert got.out == "" and got.err.count("\n") == 1
    assert got.err.startswith(f"neuroscan: error: writing {out} failed (") and "No space left on device" in got.err
    assert got.err.endswith("): fix the disk (space, permissions), or give another --out\n")
    assert out.read_bytes() == earlier
    assert sorted(p.name for p in disk.iterdir()) == ["ballast", "cmp.parquet"]


def test_bh_q_values_by_hand():
    """q_(i) = min over j >= i of m p_(j) / j, in the order the p-values came in."""
    from results.compare import bh_q, two_sided_p

    p = np.array([0.01, 0.04, 0.03, 0.005, 0.5, 0.9])
    # ascending: 0.005 0.01 0.03 0.04 0.5 0.9 -> 6p/rank: 0.03 0.03 0.06 0.06 0.6 0.9
    assert bh_q(p) == pytest.approx([0.03, 0.06, 0.06, 0.03, 0.6, 0.9], rel=1e-12)
    # 3p/rank = 0.03, 0.0165, 0.5: the smallest p takes the smaller q of the one above it
    assert bh_q(np.array([0.01, 0.011, 0.5])) == pytest.approx([0.0165, 0.0165, 0.5], rel=1e-12)
    assert bh_q(np.array([0.02, 0.5, 0.02])) == pytest.approx([0.03, 0.5, 0.03], rel=1e-12)  # ties: one q
    assert bh_q(np.array([0.6, 0.9, 1.0])).tolist() == [1.0, 1.0, 1.0]  # 3p/rank = 1.8, 1.35, 1: at most 1
    assert bh_q(np.array([])).tolist() == []
    assert two_sided_p(np.array([0.0, 1.959963984540054, -1.959963984540054, 40.0])) == pytest.approx(
        [1.0, 0.05, 0.05, 0.0], abs=1e-12
    )


TOPICS = ["math"] * 6 + ["history"] * 4 + ["art"] * 4 + [None] * 2
"""The corpus of `topic_run`: prompts 14 and 15 have no topic."""
KEPT = {
    (1, 5): set(range(6)),  # every math prompt, nothing else
    (1, 9): set(range(16)),  # every prompt
    (0, 2): {0, 1, 2, 6, 7, 10, 11},  # half of math, half of the rest
    (0, 7): {0, 1, 2, 3, 4, 8, 12},  # 5 of 6 math, 2 of 8 others
    (0, 4): set(range(6, 10)),  # history only
    (1, 3): {14, 15},  # only the prompts without a topic: in neither group
}


def _stage(batch_id: int, prompt_ids: list[int], n_layers: int = 2) -> StageRows:
    """The one stage of a micro-batch: a red row for each (layer, neuron) of `KEPT` that holds the prompt."""
    rows = sorted(
        (layer, r, neuron) for (layer, neuron), ids in KEPT.items() for r, pid in enumerate(prompt_ids) if pid in ids
    )
    m, b = len(rows), len(prompt_ids)
    kept = {
        "layer_offset": np.array([x[0] for x in rows], np.int16),
        "row": np.array([x[1] for x in rows], np.int32),
        "neuron": np.array([x[2] for x in rows], np.int32),
        "max_act": np.full(m, 4.0, np.float32),
        "max_pos": np.zeros(m, np.int16),
        "min_act": np.full(m, 0.5, np.float32),
        "min_pos": np.zeros(m, np.int16),
        "n_above": np.ones(m, np.int16),
        "n_below": np.zeros(m, np.int16),
        "bands": np.full((m, 1), 0xFF, np.uint8),
    }
    per_prompt = {
        f.name: np.zeros((n_layers, b), f.type.to_pandas_dtype())
        for f in LAYERS
        if f.name not in ("prompt_id", "layer", "n_tokens")
    }
    predictions = {
        "top_ids": np.zeros((b, 5), np.int32),
        "top_probs": np.full((b, 5), 0.2, np.float32),
        "correct": np.full(b, -1, np.int8),
    }
    return StageRows(batch_id, 0, kept, per_prompt, predictions)


@pytest.fixture
def topic_run(tmp_path):
    """A scan of a JSONL corpus with extra columns, written by the aggregator (no model): four
    micro-batches of four prompts, a part each. ``level`` is null in the first two parts."""
    corpus = tmp_path / "c.jsonl"
    rows = [
        {"text": f"p{i}", "topic": t, "level": i if i >= 8 else None, "year": 2000 + i, "source": "gen"}
        for i, t in enumerate(TOPICS)
    ]
    corpus.write_text("".join(json.dumps(row) + "\n" for row in rows))
    prompts = [p for chunk in read_prompts(str(corpus)) for p in chunk]
    types = ColumnTypes()
    for p in prompts:
        types.see(p.extra)
    out = tmp_path / "run"
    out.mkdir()
    run_header = header(partition=[[0, 2]], stages=1, corpus=Corpus(str(corpus), None, types.types()))
    agg = Aggregator(str(out), run_header, [chr(i) for i in range(256)], rows_per_part=1)
    for b in range(4):
        group = [Tokenized(p, [65, 66], []) for p in prompts[4 * b : 4 * b + 4]]
        agg.add(group, _stage(b, [t.prompt.prompt_id for t in group]))
    agg.finish({})
    agg.close()
    return out


def test_extra_columns_reach_prompts_with_one_type_in_every_part(topic_run):
    import pandas as pd
    import pyarrow.dataset as ds

    parts = sorted((topic_run / "prompts").iterdir())
    assert len(parts) == 4
    schemas = {pq.read_schema(f).remove_metadata() for f in parts}
    assert len(schemas) == 1
    (one,) = schemas
    assert one.names == [*PROMPTS.names, "topic", "level", "year", "source"]
    assert [one.field(n).type for n in ("topic", "level", "year")] == [pa.string(), pa.int64(), pa.int64()]
    table = ds.dataset(topic_run / "prompts").to_table().sort_by("prompt_id")
    assert table["topic"].to_pylist() == TOPICS and table["level"].to_pylist() == [None] * 8 + list(range(8, 16))
    frame = pd.read_parquet(topic_run / "prompts").sort_values("prompt_id")
    assert frame["year"].dtype == "int64" and frame["year"].tolist() == list(range(2000, 2016))
    assert frame["level"].dropna().tolist() == list(range(8, 16))  # pandas reads an int column with nulls as floats


def _q_by_definition(p: list[float]) -> list[float]:
    """min over the p-values at least as large of m * p_j / rank_j: Benjamini-Hochberg, written out."""
    ranked = sorted(p)
    m = len(p)
    return [min(1.0, min(m * ranked[j] / (j + 1) for j in range(m) if ranked[j] >= x)) for x in p]


def test_one_group_against_the_rest_has_a_known_answer(topic_run, tmp_path, capsys):
    table = compare(topic_run, "topic", "math", "rest")
    meta = table.schema.metadata
    assert (meta[b"b"], meta[b"n_a"], meta[b"n_b"], meta[b"n_tested"]) == (b"rest", b"6", b"8", b"5")
    rows = {(r["layer"], r["neuron"]): r for r in table.to_pylist()}
    assert set(rows) == set(KEPT) - {(1, 3)}  # kept only on prompts without a topic: not tested
    top = table.slice(0, 1).to_pylist()[0]
    assert (top["layer"], top["neuron"], top["a_frac"], top["b_frac"], top["diff"]) == (1, 5, 1.0, 0.0, 1.0)
    assert top["z"] == pytest.approx(1 / math.sqrt(6 / 14 * 8 / 14 * (1 / 6 + 1 / 8)), rel=1e-12)
    assert top["q"] == min(r["q"] for r in rows.values()) < 0.01
    for equal in ((1, 9), (0, 2)):  # as often in A as in the rest
        assert (rows[equal]["diff"], rows[equal]["z"], rows[equal]["p"], rows[equal]["q"]) == (0.0, 0.0, 1.0, 1.0)
    assert rows[(0, 4)]["a_kept"] == 0 and rows[(0, 4)]["b_frac"] == 0.5 and rows[(0, 4)]["diff"] == -0.5
    p = table["p"].to_pylist()
    assert p == pytest.approx([math.erfc(abs(z) / math.sqrt(2)) for z in table["z"].to_pylist()], rel=1e-12)
    assert table["q"].to_pylist() == pytest.approx(_q_by_definition(p), rel=1e-12)
    by_q = compare(topic_run, "topic", "math", "rest", sort="q", top=3)
    assert [(r["layer"], r["neuron"]) for r in by_q.to_pylist()] == [(1, 5), (0, 7), (0, 4)]
    assert by_q["q"].to_pylist() == [rows[k]["q"] for k in ((1, 5), (0, 7), (0, 4))]  # q over all 5, not 3
    by_z = compare(topic_run, "topic", "history", "rest", sort="z")
    assert [(r["layer"], r["neuron"]) for r in by_z.slice(0, 1).to_pylist()] == [(0, 4)]
    out = tmp_path / "cmp.parquet"
    argv = ["compare", str(topic_run), "--by", "topic", "--a", "math", "--b", "rest", "--sort", "q", "--top", "2"]
    assert main([*argv, "--out", str(out)]) == 0
    assert pq.read_table(out).num_rows == 2
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"A = math (6 prompts), B = rest (8 prompts); wrote 2 of 5 neurons tested, by q, to {out}"
    assert len(printed) == 4 and printed[2].split()[:2] == ["1", "5"]


def test_compare_by_a_column_that_cannot_group_is_one_line(topic_run, capsys, tmp_path):
    listed = "prompt_id, id, family, variant, text, n_tokens, expected, correct, topic, level, year, source"
    with pytest.raises(UserError, match=rf"^--by 'topc' is not a column of prompts/: use one of {listed}$"):
        compare(topic_run, "topc")
    with pytest.raises(UserError, match=r"^--by 'tokens' holds lists, not one value a prompt: use one of prompt_id, "):
        compare(topic_run, "tokens")
    with pytest.raises(
        UserError,
        match=r"^--b rest: every prompt of this run with a source has 'gen', so the rest is empty: scan prompts "
        "with other source values too, or compare by another column$",
    ):
        compare(topic_run, "source", "gen", "rest")
    with pytest.raises(
        UserError, match=r"^--b rest compares group A with every other topic: name A with --a, e.g. --a art$"
    ):
        compare(topic_run, "topic", b="rest")
    with pytest.raises(
        UserError, match=r"^--by topic has 3 groups \['art', 'history', 'math'\]: name the other with --b, or --b rest$"
    ):
        compare(topic_run, "topic", "math")
    with pytest.raises(
        UserError,
        match=r"^--by source: this run has 1 source value\(s\) \['gen'\], compare needs two: scan prompts with two source values$",
    ):
        compare(topic_run, "source")
    assert compare(topic_run, "year", "2003", "rest").schema.metadata[b"n_b"] == b"15"  # integers, as text
    out = tmp_path / "c.parquet"
    assert main(["compare", str(topic_run), "--by", "topc", "--out", str(out)]) == 2
    assert (
        capsys.readouterr().err == f"neuroscan: error: --by 'topc' is not a column of prompts/: use one of {listed}\n"
    )
    assert (
        main(
            ["compare", str(topic_run), "--by", "topic", "--a", "math", "--b", "rest", "--top", "0", "--out", str(out)]
        )
        == 2
    )
    assert capsys.readouterr().err == "neuroscan: error: --top 0 must be at least 1\n"
    assert not out.exists()
