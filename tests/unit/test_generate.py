"""The in-context prompt generator: deterministic, unique, seed formats, right answers."""

from __future__ import annotations

import json
import re

import pytest

from cluster.cli import main
from neuroscan.errors import UserError
from prompts.generate import FAMILIES, NUMBER_INTRO, WORD_INTRO, generate
from prompts.seed import SEED_PROMPTS

WORD_SHOT = re.compile(r'^Sequence: "([^"]+)" Pattern: ([^"]+) Next Word: "([^"]+)"$')
WORD_QUERY = re.compile(r'^Sequence: "([^"]+)" Pattern: ([^"]+) Next Word:$')
NUMBER_SHOT = re.compile(r"^(\d+)\. Sequence: ([\d, ]+) Pattern: (.+) Next Number: (\d+)$")
NUMBER_QUERY = re.compile(r"^Sequence: ([\d, ]+) Pattern: (.+) Next Number:$")

# Written out independently of prompts/generate.py.
WORD_ORDER = {
    "colors": ("red orange yellow green blue indigo violet", False),
    "days": ("Monday Tuesday Wednesday Thursday Friday Saturday Sunday", True),
    "months": ("January February March April May June July August September October November December", True),
    "number_words": (
        "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen twenty",
        False,
    ),
    "ordinals": ("first second third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth", False),
    "letters": ("A B C D E F G H I J K L M N O P Q R S T U V W X Y Z", False),
    "planets": ("Mercury Venus Earth Mars Jupiter Saturn Uranus Neptune", False),
    "notes": ("do re mi fa sol la ti", True),
    "seasons": ("spring summer autumn winter", True),
    "greek": ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu", False),
}


def next_number(family: str, values: list[int]) -> int:
    if family == "arithmetic":
        return values[-1] + (values[1] - values[0])
    if family == "geometric":
        return values[-1] * (values[1] // values[0])
    return values[-1] - (values[0] - values[1])  # countdown


def test_seed_prompts_match_the_format_patterns():
    lines = SEED_PROMPTS[0]["text"].split("\n")
    assert all(WORD_SHOT.match(line) for line in lines[:3]) and lines[3] == WORD_INTRO and WORD_QUERY.match(lines[4])
    lines = SEED_PROMPTS[1]["text"].split("\n")
    assert (
        all(NUMBER_SHOT.match(line) for line in lines[:3]) and lines[3] == NUMBER_INTRO and NUMBER_QUERY.match(lines[4])
    )


def test_deterministic_and_unique():
    a = generate(10_000, seed=5, variants=["icl", "zero_shot", "shuffled"])
    assert a == generate(10_000, seed=5, variants=["icl", "zero_shot", "shuffled"])
    assert a != generate(10_000, seed=6, variants=["icl", "zero_shot", "shuffled"])
    assert len({r["text"] for r in a}) == 10_000 and len({r["id"] for r in a}) == 10_000
    assert {r["family"] for r in a} == set(FAMILIES) and len(FAMILIES) >= 12
    assert {r["variant"] for r in a} == {"icl", "zero_shot", "shuffled"}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_expected_answer_and_format_per_family(family):
    for row in generate(60, shots=3, seed=1, families=[family], variants=["icl"]):
        lines = row["text"].split("\n")
        assert len(lines) == 5 and not row["text"].endswith(" ")
        if family in WORD_ORDER:
            order, cyclic = WORD_ORDER[family]
            seq = order.split()
            assert lines[3] == WORD_INTRO
            shots = [WORD_SHOT.match(line) for line in lines[:3]]
            query = WORD_QUERY.match(lines[4])
            for items, answer in [(m.group(1).split(", "), m.group(3)) for m in shots] + [
                (query.group(1).split(", "), row["expected"][2:-1])
            ]:
                i = seq.index(items[0])
                window = [seq[(i + j) % len(seq)] if cyclic else seq[i + j] for j in range(len(items) + 1)]
                assert window == items + [answer], (items, answer)
            assert row["expected"] == f' "{row["answer"]}"'
        else:
            assert lines[3] == NUMBER_INTRO
            shots = [NUMBER_SHOT.match(line) for line in lines[:3]]
            assert [int(m.group(1)) for m in shots] == [1, 2, 3]
            query = NUMBER_QUERY.match(lines[4])
            for values, answer in [([int(v) for v in m.group(2).split(", ")], int(m.group(4))) for m in shots] + [
                ([int(v) for v in query.group(1).split(", ")], int(row["expected"]))
            ]:
                assert next_number(family, values) == answer, (values, answer)
                assert all(next_number(family, values[:k]) == values[k] for k in range(2, len(values)))
            assert row["expected"] == f" {row['answer']}"


def test_variants():
    zero = generate(14, families=["days"], variants=["zero_shot"])  # 7 starts x 2 lengths
    assert all(WORD_QUERY.match(r["text"]) for r in zero)
    shuffled = generate(20, families=["arithmetic"], variants=["shuffled"])
    for row in shuffled:
        for line in row["text"].split("\n")[:3]:
            values = [int(v) for v in NUMBER_SHOT.match(line).group(2).split(", ")]
            assert values != sorted(values)  # the examples' order is broken
        assert NUMBER_QUERY.match(row["text"].split("\n")[4])  # the query is intact


def test_errors():
    with pytest.raises(UserError, match="unknown families"):
        generate(5, families=["cars"])
    with pytest.raises(UserError, match="unknown variants"):
        generate(5, variants=["few_shot"])
    with pytest.raises(UserError, match="only .* unique prompts exist"):
        generate(500, families=["seasons"], variants=["zero_shot"])
    with pytest.raises(UserError, match=r"^--n 0 must be at least 1 prompt$"):
        generate(0)
    with pytest.raises(
        UserError, match=r"^--shots 0 must be at least 1 \(for prompts without examples: --variants zero_shot\)$"
    ):
        generate(5, shots=0)


@pytest.mark.parametrize("variant", ["icl", "shuffled"])
def test_a_family_shows_every_example_it_has_and_no_more(variant):
    """Colors (seven in order, windows of 3 or 4) has seven examples: six besides any query.
    Six shots use them all, each once; seven are refused in one line instead of drawing forever."""
    rows = generate(20, shots=6, families=["colors"], variants=[variant])
    for row in rows:
        shown = [line.split('"')[1] for line in row["text"].splitlines()[:6]]
        assert len({tuple(sorted(items.split(", "))) for items in shown}) == 6
    with pytest.raises(
        UserError,
        match="--shots 7 is more than family colors can show .6 different examples besides the query.: "
        "lower --shots or leave colors out with --families",
    ):
        generate(20, shots=7, families=["colors"], variants=[variant])


def test_cli_writes_jsonl_the_scan_reads(tmp_path, capsys):
    out = tmp_path / "p.jsonl"
    assert (
        main(["prompts", "generate", "--n", "40", "--out", str(out), "--shots", "2", "--variants", "icl,shuffled"]) == 0
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 40 and all(r["text"].count("\n") in (3, 0) for r in rows)
    from prompts.readers import read_prompts

    prompts = [p for chunk in read_prompts(str(out)) for p in chunk]
    assert [p.variant for p in prompts] == [r["variant"] for r in rows]
    assert main(["prompts", "generate", "--n", "4", "--out", str(tmp_path / "p.txt")]) == 2
    (tmp_path / "d.jsonl").mkdir()
    capsys.readouterr()
    assert main(["prompts", "generate", "--n", "4", "--out", str(tmp_path / "d.jsonl")]) == 2
    assert (
        capsys.readouterr().err
        == f"neuroscan: error: --out {tmp_path / 'd.jsonl'} is a directory: name the file to write, e.g. {tmp_path / 'd.jsonl' / 'prompts.jsonl'}\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "p.jsonl"]  # no temporary file left
