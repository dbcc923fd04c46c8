"""Out-of-memory splitting: halves merge back into the whole micro-batch's output."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import workers.stage as stage_module
from neuroscan.config import Selection
from neuroscan.messages import Prompt
from prompts.batching import make_batch, tokenize
from workers.checkpoint import load_config, load_tokenizer
from workers.shard import ShardSpec
from workers.split import PromptTooLarge
from workers.stage import Stage, StageSpec


def _batch(model):
    texts = ["alpha beta", "a much longer prompt than the others here", "x", "middle sized one", "yz", "last"]
    prompts = [Prompt(i, f"p{i}", t, expected=" q" if i % 2 else None) for i, t in enumerate(texts)]
    batch = make_batch(5, tokenize(prompts, load_tokenizer(model), 512, False), pad_id=256)
    return dataclasses.replace(batch, selection=Selection(max_per_layer=7))


def _run(model, batch):
    n = load_config(model).n_layer
    stages = [Stage(StageSpec(str(model), ShardSpec(a, b, n), "cpu", "float32")) for a, b in [(0, 2), (2, n)]]
    hidden, outs = None, []
    for s in stages:
        hidden, rows = s.forward(batch, hidden)  # setup happens on first use
        outs.append(rows)
    return outs


def _key(rows):
    r = rows.rows
    return sorted(zip(r["layer_offset"].tolist(), r["row"].tolist(), r["neuron"].tolist()))


def test_split_halves_equal_the_whole_batch(other_model, monkeypatch):
    batch = _batch(other_model)
    whole = _run(other_model, batch)
    monkeypatch.setattr(stage_module, "FAULT_OOM_TOKENS", batch.input_ids.shape[1] * 2)  # at most 2 rows fit
    split = _run(other_model, batch)
    for w, s in zip(whole, split):
        assert _key(w) == _key(s)
        assert s.rows["layer_offset"].tolist() == sorted(s.rows["layer_offset"].tolist())  # grouped by layer
        order_w = np.lexsort((w.rows["neuron"], w.rows["row"], w.rows["layer_offset"]))
        order_s = np.lexsort((s.rows["neuron"], s.rows["row"], s.rows["layer_offset"]))
        for name in ("max_act", "min_act", "bands", "n_above"):
            np.testing.assert_allclose(w.rows[name][order_w], s.rows[name][order_s], atol=1e-5)
        for name in w.per_prompt:
            np.testing.assert_allclose(w.per_prompt[name], s.per_prompt[name], atol=1e-5)
    np.testing.assert_allclose(whole[-1].predictions["top_probs"], split[-1].predictions["top_probs"], atol=1e-6)
    assert whole[-1].predictions["correct"].tolist() == split[-1].predictions["correct"].tolist()


def test_a_prompt_that_never_fits_is_named(other_model, monkeypatch):
    batch = _batch(other_model)
    monkeypatch.setattr(
        stage_module, "FAULT_OOM_TOKENS", batch.input_ids.shape[1] - 1
    )  # the longest row alone is too much
    with pytest.raises(
        PromptTooLarge, match=r"prompt 'p1' \(\d+ tokens\) does not fit in device memory even alone"
    ) as err:
        _run(other_model, batch)
    assert err.value.prompt_id == 1  # the one prompt longer than the limit; the others fit once split
