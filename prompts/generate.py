"""In-context prompts of ordered sequences, in the two formats of the seed prompts.

Every family is a sequence with a definite next item. A prompt shows k examples of the
family (different windows or parameters) and asks for the next item of a new one; its
``expected`` answer is what follows the query in the examples' own format. Variants are
controls for contrastive analysis: ``icl`` (k examples and the query), ``zero_shot`` (the
query alone) and ``shuffled`` (examples whose items are shuffled, so the pattern breaks).
Generation is deterministic for a seed and every text is unique.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from neuroscan.config import Config, option
from neuroscan.errors import UserError, file_out

VARIANTS = ("icl", "zero_shot", "shuffled")
WORD_INTRO = "Based on the examples above, determine the pattern and the next word in the following sequence:"
NUMBER_INTRO = "Based on the examples above, determine the pattern and the next number in the following sequence:"


@dataclass(frozen=True)
class Family:
    name: str
    kind: str
    """"word" (the block format of seed prompt 1) or "number" (the numbered format of seed prompt 2)."""
    sample: Callable[[random.Random], tuple[list[str], str, str]]
    """rng -> (shown items, next item, pattern description)."""


def _words(items: str, pattern: str, cyclic: bool) -> Callable:
    seq = items.split()

    def sample(rng: random.Random):
        length = rng.randint(3, 4)
        if cyclic:
            start = rng.randrange(len(seq))
            window = [seq[(start + i) % len(seq)] for i in range(length + 1)]
        else:
            start = rng.randrange(len(seq) - length)
            window = seq[start : start + length + 1]
        return window[:-1], window[-1], pattern

    return sample


def _arithmetic(rng: random.Random):
    start, step, length = rng.randint(0, 60), rng.randint(2, 12), rng.randint(4, 5)
    values = [start + step * i for i in range(length + 1)]
    return [str(v) for v in values[:-1]], str(values[-1]), f"Increase by {step}"


def _geometric(rng: random.Random):
    start, ratio, length = rng.randint(1, 9), rng.randint(2, 4), 4
    values = [start * ratio**i for i in range(length + 1)]
    return [str(v) for v in values[:-1]], str(values[-1]), f"Multiply by {ratio}"


def _countdown(rng: random.Random):
    step, length = rng.randint(1, 5), rng.randint(4, 5)
    start = rng.randint(step * (length + 1), 100)
    values = [start - step * i for i in range(length + 1)]
    return [str(v) for v in values[:-1]], str(values[-1]), f"Decrease by {step}"


FAMILIES = {
    f.name: f
    for f in [
        Family(
            "colors",
            "word",
            _words("red orange yellow green blue indigo violet", "Colors of the rainbow in order", False),
        ),
        Family(
            "days",
            "word",
            _words("Monday Tuesday Wednesday Thursday Friday Saturday Sunday", "Days of the week in order", True),
        ),
        Family(
            "months",
            "word",
            _words(
                "January February March April May June July August September October November December",
                "Months of the year in order",
                True,
            ),
        ),
        Family(
            "number_words",
            "word",
            _words(
                "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen twenty",
                "Counting numbers in order",
                False,
            ),
        ),
        Family(
            "ordinals",
            "word",
            _words(
                "first second third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth",
                "Ordinal numbers in order",
                False,
            ),
        ),
        Family(
            "letters", "word", _words(" ".join("ABCDEFGHIJKLMNOPQRSTUVWXYZ"), "Letters of the alphabet in order", False)
        ),
        Family(
            "planets",
            "word",
            _words("Mercury Venus Earth Mars Jupiter Saturn Uranus Neptune", "Planets in order from the sun", False),
        ),
        Family("notes", "word", _words("do re mi fa sol la ti", "Notes of the scale in order", True)),
        Family("seasons", "word", _words("spring summer autumn winter", "Seasons of the year in order", True)),
        Family(
            "greek",
            "word",
            _words(
                "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu", "Greek letters in order", False
            ),
        ),
        Family("arithmetic", "number", _arithmetic),
        Family("geometric", "number", _geometric),
        Family("countdown", "number", _countdown),
    ]
}


def render(
    family: Family, shots: list[tuple[list[str], str, str]], query: tuple[list[str], str, str]
) -> tuple[str, str]:
    """(text, expected) in the family's seed format; no shots gives the query line alone."""
    items, answer, pattern = query
    if family.kind == "word":
        lines = [f'Sequence: "{", ".join(s)}" Pattern: {p} Next Word: "{a}"' for s, a, p in shots]
        query_line = f'Sequence: "{", ".join(items)}" Pattern: {pattern} Next Word:'
        expected, intro = f' "{answer}"', WORD_INTRO
    else:
        lines = [f"{i}. Sequence: {', '.join(s)} Pattern: {p} Next Number: {a}" for i, (s, a, p) in enumerate(shots, 1)]
        query_line = f"Sequence: {', '.join(items)} Pattern: {pattern} Next Number:"
        expected, intro = f" {answer}", NUMBER_INTRO
    return ("\n".join([*lines, intro, query_line]) if shots else query_line), expected


def _shuffled(rng: random.Random, example: tuple[list[str], str, str]) -> tuple[list[str], str, str]:
    items, answer, pattern = example
    mixed = items[:]
    while mixed == items:
        rng.shuffle(mixed)
    return mixed, answer, pattern


MAX_DRAWS = 1000
"""Draws in a row that bring no new example before a family counts as having no more to show."""


def _examples(family: Family, query: tuple, shots: int, variant: str, rng: random.Random) -> list[tuple]:
    """``shots`` different examples of ``family``, none showing the query's items."""
    examples, misses = [], 0
    while len(examples) < shots:
        example = family.sample(rng)
        if example[0] != query[0] and example not in examples:
            examples.append(example)
            misses = 0
        else:
            misses += 1
            if misses == MAX_DRAWS:
                raise UserError(
                    f"--shots {shots} is more than family {family.name} can show ({len(examples)} different examples "
                    f"besides the query): lower --shots or leave {family.name} out with --families"
                )
    return [_shuffled(rng, example) for example in examples] if variant == "shuffled" else examples


def generate(
    n: int, shots: int = 3, seed: int = 0, families: list[str] | None = None, variants: list[str] | None = None
) -> list[dict]:
    """``n`` unique prompts, dealt round-robin over (family, variant)."""
    names = families or list(FAMILIES)
    variants = variants or ["icl"]
    unknown = [f for f in names if f not in FAMILIES]
    if unknown:
        raise UserError(f"unknown families {unknown}: choose from {', '.join(FAMILIES)}")
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise UserError(f"unknown variants {bad}: choose from {', '.join(VARIANTS)}")
    if n < 1:
        raise UserError(f"--n {n} must be at least 1 prompt")
    if shots < 1:
        raise UserError(f"--shots {shots} must be at least 1 (for prompts without examples: --variants zero_shot)")
    rng = random.Random(seed)
    combos = [(FAMILIES[f], v) for f in names for v in variants]
    rows, seen, misses = [], set(), dict.fromkeys(range(len(combos)), 0)
    turn = 0
    while len(rows) < n:
        if not misses:
            raise UserError(
                f"only {len(rows)} unique prompts exist for these families and variants: lower --n or add families"
            )
        live = sorted(misses)
        index = live[turn % len(live)]
        turn += 1
        family, variant = combos[index]
        query = family.sample(rng)
        examples = [] if variant == "zero_shot" else _examples(family, query, shots, variant, rng)
        text, expected = render(family, examples, query)
        if text in seen:
            misses[index] += 1
            if misses[index] > 200:  # this (family, variant) has run out of new texts
                del misses[index]
            continue
        seen.add(text)
        misses[index] = 0
        rows.append(
            {
                "id": f"gen-{len(rows):06d}",
                "family": family.name,
                "variant": variant,
                "text": text,
                "expected": expected,
                "answer": query[1],
            }
        )
    return rows


def write_jsonl(rows: list[dict], out: Path) -> None:
    """Write atomically: a failed write leaves no partial file behind."""
    out = Path(out)
    file_out(out, "prompts.jsonl", ".jsonl")
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, out)


@dataclass(frozen=True, kw_only=True)
class GenerateConfig(Config):
    """``neuroscan prompts generate``: in-context sequence prompts as JSONL."""

    n: int = option(help="number of prompts", minimum=1, hint=" prompt")
    out: str = option(help="output .jsonl file", what="a .jsonl file")
    shots: int = option(
        3, "in-context examples per prompt", minimum=1, hint=" (for prompts without examples: --variants zero_shot)"
    )
    seed: int = option(0, "the same seed (and flags) gives the same prompts")
    families: tuple[str, ...] = option(tuple(FAMILIES), "comma-separated families", choices=tuple(FAMILIES))
    variants: tuple[str, ...] = option(("icl",), "comma-separated variants", choices=VARIANTS)
