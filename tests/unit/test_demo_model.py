"""The demo model: committed, loaded by the ordinary checkpoint code, answers held-out prompts; its training is seeded."""

from __future__ import annotations

import shutil
from dataclasses import replace

import pytest
import torch

from prompts.generate import generate
from workers.checkpoint import DEMO_DIR, load_config, load_tokenizer, resolve_model
from workers.demo_model import Recipe, correct, encode, held_out, train, training_prompts
from workers.shard import ShardSpec, load_stage

ICL_FLOOR = 0.75
"""Share of the 78 held-out 3-shot prompts (6 a family) answered exactly: 67 (0.86) when committed; chance is about 0."""


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no directory named demo here
    return tmp_path


def test_demo_model_answers_held_out_prompts(elsewhere):
    source = resolve_model("demo")
    assert (source.id, source.path) == ("demo", str(DEMO_DIR))
    config = load_config(source.path)
    assert (config.n_layer, config.vocab_size) == (28, 257)
    stage = load_stage(source.path, config, ShardSpec(0, config.n_layer, config.n_layer), "cpu", torch.float32)

    def logits(ids: list[int]) -> torch.Tensor:
        x = torch.tensor([ids])  # [1, pos]
        with torch.no_grad():
            return stage.lm_head(stage(x, torch.ones_like(x), torch.arange(len(ids))[None]))[0]  # [pos, vocab]

    rows = [row for row in held_out(generate) if row["variant"] == "icl"]
    assert len(rows) == 78 and len({row["family"] for row in rows}) == 13
    hits = correct(logits, encode(load_tokenizer(source.path), rows))
    assert sum(hits) / len(hits) >= ICL_FLOOR


def test_a_directory_named_demo_wins(elsewhere, other_model):
    shutil.copytree(other_model, elsewhere / "demo")
    source = resolve_model("demo")
    assert source.path == str((elsewhere / "demo").resolve())


def test_training_is_deterministic_from_its_seed():
    recipe = Recipe(
        n_embd=32, n_inner=64, n_head=2, rotary_dim=8, n_layer=2, steps=3, warmup=1, batch_tokens=1024, prompts=300
    )
    rows = training_prompts(recipe, generate)
    assert not {row["text"] for row in rows} & {row["text"] for row in held_out(generate)}
    first, again = (train(recipe, generate, every=0).state_dict() for _ in range(2))
    assert all(torch.equal(first[name], again[name]) for name in first)
    other = train(replace(recipe, seed=1), generate, every=0).state_dict()
    assert not torch.equal(first["lm_head.weight"], other["lm_head.weight"])
