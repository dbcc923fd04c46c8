"""prompts.readers: every corpus format reads the same prompts, and bad rows stop in one line."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from neuroscan.errors import UserError
from prompts.readers import read_prompts
from prompts.seed import SEED_PROMPTS

ROWS = [{"text": "alpha", "id": "a", "family": "f"}, {"text": "beta gamma"}, {"text": "delta", "expected": " x"}]


def _all(source, **kw):
    return [p for chunk in read_prompts(str(source), **kw) for p in chunk]


@pytest.fixture(params=["jsonl", "csv", "parquet"])
def corpus_file(request, tmp_path):
    return _write_rows(tmp_path, request.param)


def _write_rows(tmp_path, kind):
    path = tmp_path / f"c.{kind}"
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif kind == "csv":
        lines = ["text,id,family,expected"] + [
            f'"{r["text"]}",{r.get("id", "")},{r.get("family", "")},{r.get("expected", "")}' for r in ROWS
        ]
        path.write_text("\n".join(lines) + "\n")
    else:
        pq.write_table(
            pa.Table.from_pylist([{k: r.get(k) for k in ("text", "id", "family", "expected")} for r in ROWS]), path
        )
    return path


def test_readers_agree(corpus_file):
    prompts = _all(corpus_file)
    assert [p.prompt_id for p in prompts] == [0, 1, 2]
    assert [p.id for p in prompts] == ["a", "1", "2"]  # the user's id, else str(prompt_id)
    assert [p.text for p in prompts] == ["alpha", "beta gamma", "delta"]
    assert prompts[0].family == "f" and prompts[1].family is None
    assert prompts[2].expected == " x"


def _compress(path, compression):
    """``path`` compressed beside it as ``path.gz`` / ``.bz2`` / ``.zst``; the original is removed."""
    out = path.with_name(path.name + {"gzip": ".gz", "bz2": ".bz2", "zstd": ".zst"}[compression])
    with pa.output_stream(str(out), compression=compression) as f:
        f.write(path.read_bytes())
    path.unlink()
    return out


@pytest.mark.parametrize("compression", ["gzip", "bz2", "zstd"])
@pytest.mark.parametrize("kind", ["jsonl", "csv"])  # Parquet compresses inside the file
def test_compressed_line_corpora_read_as_the_plain_ones(tmp_path, kind, compression):
    plain = _write_rows(tmp_path, kind)
    expected = _all(plain)
    assert len(expected) == len(ROWS)
    assert _all(_compress(plain, compression)) == expected


def test_compressed_corpus_errors_name_the_line_and_the_damage(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(UserError, match=r"c\.jsonl\.zst:2: invalid JSON"):
        _all(_compress(path, "zstd"))
    path.write_text("".join(json.dumps({"text": f"prompt {i}"}) + "\n" for i in range(5000)))
    whole = _compress(path, "gzip").read_bytes()
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(whole[: len(whole) // 2])  # a download that stopped half-way
    with pytest.raises(
        UserError, match=r"cut\.jsonl\.gz: cannot decompress it as gzip at line \d+ \(.*\): check the file is whole"
    ):
        _all(cut)
    fake = tmp_path / "fake.txt.bz2"
    fake.write_text("plain text, not bz2\n")
    with pytest.raises(UserError, match="fake.txt.bz2: cannot decompress it as bz2 at line 1"):
        _all(fake)
    (tmp_path / "c.parquet.gz").write_bytes(whole)
    with pytest.raises(UserError, match=r"unknown type '\.parquet\.gz': .* \(JSONL, CSV and text may be compressed"):
        _all(tmp_path / "c.parquet.gz")


def test_text_file_skips_blank_lines_and_chunks(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("one\n\n  \ntwo\nthree\n")
    chunks = list(read_prompts(str(path), chunk=2))
    assert [[p.text for p in c] for c in chunks] == [["one", "two"], ["three"]]


def test_builtin_seed_prompts_are_verbatim():
    prompts = _all("seed")
    assert [p.expected for p in prompts] == [" mango", " 10"]
    assert prompts[0].text.endswith("Alphabetical order of fruit names Next Word:")
    assert prompts[1].text.startswith("1. Sequence: 1, 3, 5, 7 Pattern: Increase by 2 Next Number: 9\n")
    assert all(not p["text"].endswith(" ") for p in SEED_PROMPTS)


@pytest.mark.parametrize(
    "content, match",
    [
        ('{"text": "ok"}\n{"text": oops}\n', r"c\.jsonl:2: invalid JSON"),
        ('{"text": "ok"}\n\n', r"c\.jsonl:2: blank line"),
        ('{"id": "q"}\n', "prompt 'q' has no \"text\" field"),
        ('{"text": "   ", "id": "blank"}\n', "prompt 'blank' is empty or whitespace only"),
        ('{"text": "a", "id": 1}\n{"text": "b", "id": "1"}\n', "id '1' appears twice"),
        ("[1, 2]\n", "expected a JSON object"),
        ("", "holds no prompts"),
        ('{"id": "q", "prompt": "a"}\n', "prompt 'q' has no \"text\" field: rename 'prompt' to \"text\""),
        ('{"text": "a", "answer": 7}\n', "has 'answer' but no \"expected\" field, .*: rename 'answer' to \"expected\""),
        ('{"text": "a", "family": ["x"]}\n', "has a list for 'family': give one string"),
        (
            '{"text": "cut \\ud83d"}\n',
            r"c\.jsonl:1: prompt '0' has half a surrogate pair \('\\ud83d'\) in 'text', which is no character",
        ),
        ('{"text": "a", "expected": "\\udc00"}\n', r"has half a surrogate pair \('\\udc00'\) in 'expected'"),
    ],
)
def test_jsonl_errors_name_the_line_or_id(tmp_path, content, match):
    path = tmp_path / "c.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match=match):
        _all(path)


@pytest.mark.parametrize(
    "name, content",
    [("c.csv", "text,id\r\nhello,1\r\n"), ("c.jsonl", '{"text": "hello", "id": "1"}\n'), ("c.txt", "hello\r\n")],
)
def test_a_byte_order_mark_is_not_part_of_the_first_field(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + content.encode())  # Excel's "CSV UTF-8", Notepad
    assert [p.text for p in _all(path)] == ["hello"]


def test_a_whole_surrogate_pair_is_one_character(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "smile \\ud83d\\ude00"}\n')  # JSON's escape of an emoji
    assert [p.text for p in _all(path)] == ["smile \U0001f600"]


def test_non_utf8_line_is_named(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(UserError, match=r"c\.jsonl:2: the line is not valid UTF-8"):
        _all(path)


def test_unknown_and_missing_files(tmp_path):
    (tmp_path / "c.docx").write_text("x")
    with pytest.raises(UserError, match="unknown type '.docx'"):
        _all(tmp_path / "c.docx")
    with pytest.raises(UserError, match="does not exist"):
        _all(tmp_path / "missing.jsonl")
    with pytest.raises(UserError, match="does not exist"):
        _all("nonesuch")
    (tmp_path / "shards.jsonl").mkdir()
    with pytest.raises(UserError, match=r"shards\.jsonl is a directory with no corpus file in it \(\.csv, "):
        _all(tmp_path / "shards.jsonl")


def _shards(directory, rows, names):
    """``rows`` split over JSONL shards named ``names`` (compressed by their suffix), beside a
    README.md, a hidden file and a subdirectory that are not part of the corpus."""
    directory.mkdir()
    for i, name in enumerate(names):
        part = rows[i * len(rows) // len(names) : (i + 1) * len(rows) // len(names)]
        plain = directory / name.split(".jsonl")[0]
        plain = plain.with_name(plain.name + ".jsonl")
        plain.write_text("".join(json.dumps(r) + "\n" for r in part))
        if name.endswith((".gz", ".zst")):
            _compress(plain, "gzip" if name.endswith(".gz") else "zstd")
    (directory / "README.md").write_text("# a dataset card\n")
    (directory / ".hidden.jsonl").write_text("not json\n")
    (directory / "sub").mkdir()
    (directory / "sub" / "more.jsonl").write_text("not json either\n")
    return directory


def test_a_directory_of_shards_reads_as_one_corpus_in_name_order(tmp_path):
    rows = [{"text": f"prompt {i}", **({"id": f"p{i}"} if i % 3 else {})} for i in range(12)]
    whole = tmp_path / "whole.jsonl"
    whole.write_text("".join(json.dumps(r) + "\n" for r in rows))
    shards = _shards(
        tmp_path / "shards",
        rows,
        ["train-00000-of-00003.jsonl", "train-00001-of-00003.jsonl.gz", "train-00002-of-00003.jsonl.zst"],
    )
    got = _all(shards, chunk=5)
    assert got == _all(whole)  # ids and prompt_ids run on across the shards
    assert [p.id for p in got][:4] == ["0", "p1", "p2", "3"]


def test_directory_corpus_errors(tmp_path):
    rows = [{"text": "a", "id": "same"}, {"text": "b", "id": "other"}, {"text": "c", "id": "same"}]
    shards = _shards(tmp_path / "dup", rows, ["a.jsonl", "b.jsonl"])
    with pytest.raises(UserError, match=r"dup/b\.jsonl:2: id 'same' appears twice"):  # named by shard and line
        _all(shards)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.jsonl").write_text('{"text": "a"}\n')
    (mixed / "b.csv").write_text("text\nb\n")
    with pytest.raises(UserError, match=r"mixed mixes csv, jsonl files: keep one kind in the directory"):
        _all(mixed)
    only_card = tmp_path / "card"
    only_card.mkdir()
    (only_card / "README.md").write_text("x")
    (only_card / "data.parquet.gz").write_bytes(b"x")
    with pytest.raises(
        UserError, match=r"card is a directory with no corpus file in it .*give the directory that holds the shards"
    ):
        _all(only_card)


@pytest.mark.parametrize(
    "content, match",
    [
        (
            "prompt,id\nhello,1\n",
            r"c\.csv: no \"text\" column in the CSV header \['prompt', 'id'\]: rename 'prompt' to \"text\"",
        ),
        ("id,body\n1,hello\n", r"no \"text\" column .*: add \"text\""),
        ("", r"c\.csv is empty: give a header row"),
        (
            'id,text\n1,ok\n2,"multi\nline"\n3,"bad"x"\n',
            r"c\.csv:5: not valid CSV \(',' expected after '\"'\): quote fields",
        ),
        ('id,text\n1,"never closed\n', r"c\.csv:2: not valid CSV \(unexpected end of data\)"),
        ("text,answer\nhi,yes\n", r"c\.csv:2: prompt '0' has 'answer' but no \"expected\" field"),
    ],
)
def test_csv_errors_name_the_line_and_the_fix(tmp_path, content, match):
    path = tmp_path / "c.csv"
    path.write_text(content)
    with pytest.raises(UserError, match=match):
        _all(path)


def test_csv_reads_a_prompt_longer_than_csvs_default_field_limit(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text('id,text\nlong,"' + "word " * 40_000 + '"\nshort,fine\n')  # 200 KB field (csv's limit: 128 KiB)
    assert [len(p.text) for p in _all(path)] == [200_000, 4]


def test_parquet_answer_column_is_refused_only_without_expected(tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": ["a"], "answer": ["b"]}), path)
    with pytest.raises(UserError, match=r"c\.parquet row 0: prompt '0' has 'answer' but no \"expected\""):
        _all(path)
    pq.write_table(pa.table({"text": ["a"], "answer": ["b"], "expected": ["c"]}), path)
    assert [p.expected for p in _all(path)] == ["c"]


@pytest.mark.parametrize("link", ["dangling", "loop"])
def test_a_shard_that_cannot_be_opened_is_an_error_not_skipped(tmp_path, link):
    """A git-annex or hub-cache shard not yet fetched is a dangling link: scanning the rest
    would leave its prompts out without a word."""
    from prompts.readers import corpus_paths

    shards = _shards(tmp_path / "shards", [{"text": f"p{i}"} for i in range(4)], ["a.jsonl", "b.jsonl"])
    target = "../annex/objects/c.jsonl" if link == "dangling" else "c.jsonl"
    (shards / "c.jsonl").symlink_to(target)
    reason = "No such file or directory" if link == "dangling" else "Too many levels of symbolic links"
    with pytest.raises(
        UserError, match=f"shard c.jsonl of prompt corpus {shards} cannot be read \\({reason}; it is a link"
    ):
        corpus_paths(str(shards))
    (shards / "c.jsonl").unlink()
    (shards / "c.jsonl").symlink_to(shards / "a.jsonl")  # a link that resolves is read like a file
    assert [p.name for p in corpus_paths(str(shards))] == ["a.jsonl", "b.jsonl", "c.jsonl"]


def test_other_columns_are_kept_as_extra_fields(tmp_path):
    """JSONL keeps its types (lists and objects as JSON text), CSV has strings, Parquet its
    types; an empty value is null; an unnamed column (pandas' index) is left out."""
    import pandas as pd

    rows = [
        {"text": "a", "topic": "math", "level": 3, "tags": ["x", 1], "note": ""},
        {"text": "b", "answer": "kept", "expected": " y", "prompt": "also kept"},
    ]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [p.extra for p in _all(jsonl)] == [
        {"topic": "math", "level": 3, "tags": '["x", 1]', "note": None},
        {"answer": "kept", "prompt": "also kept"},
    ]
    csv = tmp_path / "c.csv"
    csv.write_text(",text,topic,level\n0,a,math,3\n1,b,,\n")  # pandas' to_csv, index included
    assert [p.extra for p in _all(csv)] == [{"topic": "math", "level": "3"}, {"topic": None, "level": None}]
    parquet = tmp_path / "c.parquet"
    pd.DataFrame({"text": ["a", "b"], "topic": ["math", None], "level": [3, 4]}, index=[7, 9]).to_parquet(parquet)
    assert "__index_level_0__" in pq.read_schema(parquet).names
    assert [p.extra for p in _all(parquet)] == [{"topic": "math", "level": 3}, {"topic": None, "level": 4}]
    text = tmp_path / "plain.txt"
    text.write_text("x\n")
    assert [p.extra for p in _all(text)] == [{}]  # plain text has no columns


@pytest.mark.parametrize(
    "row, match",
    [
        (
            {"text": "a", "tokens": ["a"]},
            r"c\.jsonl:1: prompt '0' has a column 'tokens', which neuroscan writes itself in prompts/ \(prompt_id, "
            r"token_ids, tokens, n_tokens, top_tokens, top_probs, correct\): rename it in the corpus, e.g. to 'corpus_tokens'",
        ),
        (
            {"text": "a", "id": "q", "correct": True},
            r"prompt 'q' has a column 'correct', which neuroscan writes itself",
        ),
        (
            {"text": "a", "id": "q", "layer": 3},
            r"prompt 'q' has a column 'layer', which neuroscan writes itself in activations/ and layers/ "
            r"\(layer, neuron, .*\): rename it in the corpus, e.g. to 'corpus_layer'",
        ),
        ({"text": "a", "topic": "cut \ud83d"}, r"has half a surrogate pair \('\\ud83d'\) in 'topic'"),
    ],
)
def test_an_extra_column_neuroscan_cannot_keep_is_one_line(tmp_path, row, match):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(UserError, match=match):
        _all(path)
