"""The built-in ``seed`` corpus: the two in-context prompts of the original post, verbatim."""

from __future__ import annotations

SEED_PROMPTS = [
    {
        "id": "seed-fruit",
        "family": "seed",
        "text": (
            'Sequence: "red, green, blue" Pattern: Colors of the rainbow in order Next Word: "indigo"\n'
            'Sequence: "Monday, Tuesday, Wednesday" Pattern: Days of the week in order Next Word: "Thursday"\n'
            'Sequence: "one, two, three" Pattern: Counting numbers in order Next Word: "four"\n'
            "Based on the examples above, determine the pattern and the next word in the following sequence:\n"
            'Sequence: "apple, banana, cherry" Pattern: Alphabetical order of fruit names Next Word:'
        ),
        "expected": " mango",
    },
    {
        "id": "seed-numbers",
        "family": "seed",
        "text": (
            "1. Sequence: 1, 3, 5, 7 Pattern: Increase by 2 Next Number: 9\n"
            "2. Sequence: 10, 20, 30, 40 Pattern: Increase by 10 Next Number: 50\n"
            "3. Sequence: 5, 10, 15, 20 Pattern: Increase by 5 Next Number: 25\n"
            "Based on the examples above, determine the pattern and the next number in the following sequence:\n"
            "Sequence: 2, 4, 6, 8 Pattern: Increase by 2 Next Number:"
        ),
        "expected": " 10",
    },
]

BUILTIN = {"seed": SEED_PROMPTS}
"""Corpora addressed by name on the command line instead of a file path."""
