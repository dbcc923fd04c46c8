"""Tokenise prompts and pack them into length-bucketed, right-padded micro-batches.

A micro-batch row is the prompt's tokens followed by its expected answer's tokens (when it
has one), then padding. Because attention is causal, the answer tokens do not change any
activation on the prompt's tokens; they let the last stage check the answer by teacher
forcing in the same forward pass. Reductions only look at the prompt's own tokens.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Iterable, Iterator

import numpy as np

from neuroscan.errors import UserError
from neuroscan.messages import MicroBatch, Prompt, Tokenized
from prompts.readers import read_prompts

CHUNK = 4096
"""Prompts read, tokenised and length-bucketed together."""


def leading_tokens(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before every text (Llama's and Mistral's BOS), as
    its own ``add_special_tokens`` does; none for GPT-J, GPT-2, Pythia and Qwen2."""
    ids = tokenizer("x", verbose=False)["input_ids"]
    bare = tokenizer("x", add_special_tokens=False, verbose=False)["input_ids"]
    return list(ids[: len(ids) - len(bare)]) if ids[len(ids) - len(bare) :] == bare else []


def tokenize(prompts: list[Prompt], tokenizer, context: int, truncate: bool) -> list[Tokenized]:
    """Each prompt's tokens as the model's tokenizer gives them (its leading special tokens,
    `leading_tokens`, included), and its expected answer's tokens (none added)."""
    # verbose=False: transformers' "longer than the specified maximum" warning would print above
    # neuroscan's own line; the context is checked here, against the model's.
    lead = leading_tokens(tokenizer)
    ids = tokenizer([p.text for p in prompts], add_special_tokens=False, verbose=False)["input_ids"]
    with_answer = [p.expected for p in prompts if p.expected is not None]
    answers = iter(tokenizer(with_answer, add_special_tokens=False, verbose=False)["input_ids"] if with_answer else [])
    out = []
    for prompt, token_ids in zip(prompts, ids):
        answer = next(answers) if prompt.expected is not None else []
        if not token_ids:
            raise UserError(f"prompt {prompt.id!r} tokenises to zero tokens: give it some text the tokenizer keeps")
        if len(lead) + len(answer) >= context:
            first = f" (and the tokenizer puts {len(lead)} before the prompt)" if lead else ""
            raise UserError(
                f"prompt {prompt.id!r}: its expected answer has {len(answer)} tokens{first}, which leaves no room "
                f"for the prompt in the model's context of {context}: shorten it"
            )
        if len(lead) + len(token_ids) + len(answer) > context:
            if not truncate:
                raise UserError(
                    f"prompt {prompt.id!r} has {len(lead) + len(token_ids)} tokens (+{len(answer)} answer tokens), "
                    f"more than the model's context of {context}: shorten it or pass --truncate to keep its last tokens"
                )
            token_ids = token_ids[len(lead) + len(token_ids) + len(answer) - context :]
        out.append(Tokenized(prompt, [*lead, *token_ids], list(answer)))
    return out


PACKINGS = ("balanced", "longest-first")
"""How prompts are grouped into micro-batches (`pack`); the run's manifest records which, and
a resumed run packs its corpus the same way. ``longest-first`` is how runs were packed before
``balanced``."""

BATCH_COST = 1 / 16
"""What a micro-batch costs beyond its padded tokens, as a share of the budget: ``balanced``
packing makes one more micro-batch only where that saves more padding than this."""


def pack(items: list[Tokenized], batch_tokens: int, packing: str = "balanced") -> list[list[Tokenized]]:
    """Group prompts of similar length so that rows x longest row <= batch_tokens.

    Prompts are taken longest first and cut into consecutive groups; a prompt longer than the
    budget gets a micro-batch of its own. ``longest-first`` fills each group up to the budget
    before starting the next; ``balanced`` places the cuts where they waste least (the fewest
    padded tokens plus `BATCH_COST` a group, by dynamic programming), which matters most for a
    small corpus (the service bench's 40-prompt scans: 19 % fewer padded tokens than
    ``longest-first``; bench/RESULTS.md).
    """
    order = sorted(items, key=lambda t: (-t.n_input, t.prompt.prompt_id))
    cuts = _balanced(np.array([t.n_input for t in order]), batch_tokens) if packing == "balanced" else None
    if cuts is not None:
        return [order[a:b] for a, b in itertools.pairwise(cuts)]
    groups: list[list[Tokenized]] = []
    for item in order:
        if groups and (len(groups[-1]) + 1) * groups[-1][0].n_input <= batch_tokens:
            groups[-1].append(item)
        else:
            groups.append([item])
    return groups


def _balanced(lengths: np.ndarray, batch_tokens: int) -> list[int]:
    """Where to cut ``lengths`` (sorted longest first) into groups: the start of each group,
    then len(lengths). A group ``lengths[j:i]`` costs (i - j) * lengths[j] padded tokens plus
    a micro-batch's cost, and holds at most batch_tokens // lengths[j] prompts (one at least)."""
    n, cost = len(lengths), batch_tokens * BATCH_COST
    best = np.zeros(n + 1)
    start = np.zeros(n + 1, dtype=np.int64)
    for i in range(1, n + 1):
        lo = max(0, i - max(1, batch_tokens // int(lengths[i - 1])))
        j = np.arange(lo, i)
        fits = ((i - j) * lengths[j] <= batch_tokens) | (j == i - 1)
        j = j[fits]
        total = best[j] + (i - j) * lengths[j] + cost
        k = int(np.argmin(total))  # the first of equal costs: the longest group, deterministic
        best[i], start[i] = total[k], j[k]
    cuts = [n]
    while cuts[-1] > 0:
        cuts.append(int(start[cuts[-1]]))
    return cuts[::-1]


def make_batch(batch_id: int, group: list[Tokenized], pad_id: int) -> MicroBatch:
    width = max(t.n_input for t in group)
    answer_width = max(len(t.answer_ids) for t in group)
    input_ids = np.full((len(group), width), pad_id, dtype=np.int32)
    answer_ids = np.full((len(group), answer_width), -1, dtype=np.int32)
    for row, t in enumerate(group):
        input_ids[row, : t.n_input] = t.token_ids + t.answer_ids
        answer_ids[row, : len(t.answer_ids)] = t.answer_ids
    return MicroBatch(
        batch_id=batch_id,
        prompt_ids=np.array([t.prompt.prompt_id for t in group], dtype=np.int64),
        input_ids=input_ids,
        n_tokens=np.array([len(t.token_ids) for t in group], dtype=np.int32),
        n_input=np.array([t.n_input for t in group], dtype=np.int32),
        answer_ids=answer_ids,
        ids=tuple(t.prompt.id for t in group),
    )


def chunk_batches(
    source: str,
    tokenizer,
    context: int,
    batch_tokens: int,
    truncate: bool,
    chunk: int | None = None,
    skip: int = 0,
    first_id: int = 0,
    packing: str = "balanced",
) -> Iterator[list[tuple[MicroBatch, list[Tokenized]]]]:
    """The corpus's (micro-batch, its prompts) pairs, one list per chunk of ``chunk`` prompts
    (default CHUNK); lengths are bucketed within each chunk.

    Batch ids are consecutive and depend only on the corpus, the budget and ``packing`` (`pack`),
    so a resumed run plans the same micro-batches. ``skip`` chunks are read (their prompts keep their ids) but
    neither tokenised nor yielded, and ids go on from ``first_id``: how a run that already
    holds the first chunks' micro-batches (``first_id`` of them) streams the rest.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
    batch_id = first_id
    for i, prompts in enumerate(read_prompts(source, chunk=chunk or CHUNK)):
        if i < skip:
            continue
        groups = pack(tokenize(prompts, tokenizer, context, truncate), batch_tokens, packing)
        yield [(make_batch(batch_id + j, group, pad_id), group) for j, group in enumerate(groups)]
        batch_id += len(groups)


def micro_batches(
    source: str,
    tokenizer,
    context: int,
    batch_tokens: int,
    truncate: bool,
    chunk: int | None = None,
    packing: str = "balanced",
) -> Iterator[tuple[MicroBatch, list[Tokenized]]]:
    """Stream the corpus's (micro-batch, its prompts) pairs (see `chunk_batches`)."""
    for pairs in chunk_batches(source, tokenizer, context, batch_tokens, truncate, chunk, packing=packing):
        yield from pairs


_DONE = object()


class ReadAhead:
    """The items of ``chunks`` (an iterable of lists), with the next ``depth`` lists made on a
    background thread, from the moment it is created, while the caller works through the
    current one: the driver keeps submitting micro-batches while the next chunk is read and
    tokenised. An error on the thread is raised where its chunk would have come. ``close``
    (or leaving it as a context manager) stops the thread.
    """

    def __init__(self, chunks: Iterable[list], depth: int = 1):
        self._ready: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._produce, args=(chunks,), name="neuroscan-read-ahead", daemon=True)
        self.thread.start()

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._ready.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _produce(self, chunks: Iterable[list]) -> None:
        try:
            for chunk in chunks:
                self._put(chunk)
                if self._stop.is_set():
                    return
            self._put(_DONE)
        except BaseException as err:
            self._put(err)

    def __iter__(self) -> Iterator:
        while (chunk := self._ready.get()) is not _DONE:
            if isinstance(chunk, BaseException):
                raise chunk
            yield from chunk

    def close(self) -> None:
        self._stop.set()

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
