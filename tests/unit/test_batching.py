"""prompts.batching: tokenising, packing, micro-batch ids and read-ahead."""

from __future__ import annotations

import json

import pytest

from neuroscan.errors import UserError
from prompts.batching import (
    ReadAhead,
    chunk_batches,
    make_batch,
    micro_batches,
    pack,
    tokenize,
)
from prompts.readers import Prompt
from workers.tokenizer import byte_tokenizer


def _tok(text, pid=0, expected=None):
    return Prompt(prompt_id=pid, id=str(pid), text=text, expected=expected)


def test_tokenize_context_and_truncate():
    tok = byte_tokenizer()
    with pytest.raises(
        UserError, match="prompt '0' has 12 tokens \\(\\+2 answer tokens\\), more than the model's context of 10"
    ):
        tokenize([_tok("abcdefghijkl", expected="xy")], tok, context=10, truncate=False)
    [t] = tokenize([_tok("abcdefghijkl", expected="xy")], tok, context=10, truncate=True)
    assert bytes(t.token_ids).decode() == "efghijkl" and t.n_input == 10  # keeps the last tokens


def test_a_tokenizer_that_puts_a_bos_before_every_text_keeps_it_first():
    """Llama's and Mistral's tokenizers begin every text with a BOS token: prompts get it, as
    the model saw in training, answers do not, and truncation keeps it."""
    tok = byte_tokenizer(bos=True)
    [t, u] = tokenize([_tok("abc", expected="de"), _tok("abcdefghijkl", pid=1)], tok, context=8, truncate=True)
    assert t.token_ids == [256, *b"abc"] and t.answer_ids == list(b"de")
    assert u.token_ids == [256, *b"fghijkl"] and u.n_input == 8
    with pytest.raises(UserError, match="prompt '1' has 13 tokens"):
        tokenize([_tok("abcdefghijkl", pid=1)], tok, context=8, truncate=False)


def test_pack_respects_budget_and_length_order():
    tok = byte_tokenizer()
    items = tokenize([_tok("x" * n, pid=i) for i, n in enumerate([5, 50, 7, 48, 6, 200])], tok, 2048, False)
    groups = pack(items, batch_tokens=100)
    for g in groups:
        assert len(g) == 1 or len(g) * max(t.n_input for t in g) <= 100
    assert sorted(t.prompt.prompt_id for g in groups for t in g) == list(range(6))
    assert [t.prompt.prompt_id for t in groups[0]] == [5]  # over budget: alone


def test_make_batch_right_pads_prompt_then_answer():
    tok = byte_tokenizer()
    items = tokenize([_tok("abc", 0, expected="de"), _tok("a", 1)], tok, 2048, False)
    batch = make_batch(3, items, pad_id=256)
    assert batch.input_ids.tolist() == [[97, 98, 99, 100, 101], [97, 256, 256, 256, 256]]
    assert batch.n_tokens.tolist() == [3, 1] and batch.n_input.tolist() == [5, 1]
    assert batch.answer_ids.tolist() == [[100, 101], [-1, -1]]


def test_micro_batch_ids_are_deterministic():
    tok = byte_tokenizer()
    first = [(b.batch_id, b.prompt_ids.tolist()) for b, _ in micro_batches("seed", tok, 2048, 500, False)]
    again = [(b.batch_id, b.prompt_ids.tolist()) for b, _ in micro_batches("seed", tok, 2048, 500, False)]
    assert first == again == [(0, [0]), (1, [1])]


def pairs_rows(pairs):
    return [(b.batch_id, b.input_ids.tolist(), b.n_tokens.tolist(), [t.prompt.id for t in group]) for b, group in pairs]


def test_chunks_after_a_skip_continue_the_stream(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": "x" * (i % 5 + 1), "id": f"p{i}"}) + "\n" for i in range(11)))
    tok = byte_tokenizer()
    chunks = list(chunk_batches(str(corpus), tok, 2048, 8, False, chunk=3))
    assert len(chunks) == 4 and sum(len(c) for c in chunks) > 4
    held = sum(len(c) for c in chunks[:2])
    rest = list(chunk_batches(str(corpus), tok, 2048, 8, False, chunk=3, skip=2, first_id=held))
    assert pairs_rows(p for c in rest for p in c) == pairs_rows(p for c in chunks[2:] for p in c)


def test_read_ahead_keeps_order_raises_errors_where_they_happen_and_stops():
    assert list(ReadAhead(iter([[1, 2], [], [3]]))) == [1, 2, 3]

    def failing():
        yield [1]
        raise UserError("prompt 'x' is bad: fix it")

    got = []
    with pytest.raises(UserError, match="prompt 'x'"):
        for item in ReadAhead(failing()):
            got.append(item)
    assert got == [1]
    made = []

    def endless():
        while True:
            made.append(1)
            yield [len(made)]

    with ReadAhead(endless(), depth=1) as ahead:
        assert next(iter(ahead)) == 1
    # Closed: the thread, blocked on a full queue, sees the stop and ends (it would wait forever).
    ahead.thread.join(timeout=2)
    assert not ahead.thread.is_alive() and len(made) <= 3


def test_balanced_packing_wastes_less_padding_than_filling_each_group(tmp_path):
    """Forty prompts of mixed lengths (a small scan): the balanced cuts keep the budget and every
    prompt once, longest first, and waste less (padded tokens, and with a micro-batch's cost)."""
    import numpy as np

    from prompts.batching import BATCH_COST

    tok = byte_tokenizer()
    lengths = np.random.default_rng(0).integers(100, 600, 40)
    items = tokenize([_tok("x" * int(n), pid=i) for i, n in enumerate(lengths)], tok, 2048, False)
    padded = {}
    for packing in ("balanced", "longest-first"):
        groups = pack(items, 8192, packing)
        assert all(len(g) * g[0].n_input <= 8192 for g in groups)
        flat = [t for g in groups for t in g]
        assert sorted(t.prompt.prompt_id for t in flat) == list(range(40))
        assert [t.n_input for t in flat] == sorted(lengths.tolist(), reverse=True)
        padded[packing] = (sum(len(g) * g[0].n_input for g in groups), len(groups))
    cost = {k: tokens + n * 8192 * BATCH_COST for k, (tokens, n) in padded.items()}
    assert padded["balanced"][0] < padded["longest-first"][0] and cost["balanced"] < cost["longest-first"]


def test_a_run_resumes_with_the_packing_it_was_written_with(tmp_path):
    """A run written before balanced packing existed (its manifest has no ``packing``) is
    resumed longest first: the same batch ids hold the same prompts."""
    from cluster.output import run_packing
    from neuroscan.manifest import Manifest, write_manifest
    from tests.manifests import header

    old = header().to_dict()
    del old["packing"]
    (tmp_path / "old").mkdir()
    write_manifest(tmp_path / "old", Manifest.from_dict(old))
    assert run_packing(tmp_path / "old") == "longest-first"
    assert run_packing(tmp_path / "new") == "balanced"  # nothing there yet


def test_a_prompt_past_the_tokenizers_limit_prints_no_transformers_warning():
    """transformers warned "Token indices sequence length is longer than ..." above neuroscan's
    line. (In a process of its own: transformers binds its log handler to the stderr of the
    moment it is first imported, which under pytest is the collection's.)"""
    import subprocess
    import sys

    code = (
        "from prompts.batching import tokenize; from prompts.readers import Prompt; "
        "from workers.tokenizer import byte_tokenizer; "
        "[t] = tokenize([Prompt(0, '0', 'x' * 3000)], byte_tokenizer(), 2048, truncate=True); "
        "print(len(t.token_ids))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (result.stdout, result.stderr) == ("2048\n", "")
