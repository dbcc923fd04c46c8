"""workers.consistency: a checkpoint that does not match itself is one line before anything starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.cli import main

BROKEN = {
    "config not JSON": ("config.json", "{", "config.json is not valid JSON (Expecting property name"),
    "config a list": ("config.json", "[1, 2]", "config.json is a JSON list, not an object"),
    "tokenizer not JSON": ("tokenizer.json", '{"version": ', "tokenizer.json is not valid JSON"),
    "negative size": ({"n_layer": -1}, None, "config.json: n_layer is -1, not a positive whole number"),
    "a size that is a bool": ({"n_head": True}, None, "config.json: n_head is True, not a positive whole number"),
    "n_head not dividing n_embd": ({"n_head": 3}, None, "n_embd 128 is not a multiple of n_head 3"),
    "rotary wider than a head": ({"rotary_dim": 64}, None, "rotary_dim 64 is wider than a head (128 / 4 = 32)"),
    "n_embd not the weights'": (
        {"n_embd": 256},
        None,
        "tensor transformer.wte.weight in ",
    ),
    "vocab smaller than the embedding": (
        {"vocab_size": 200},
        None,
        "is [257, 128], but config.json's sizes make it [200, 128]",
    ),
    "a terabyte of weights": ({"n_embd": 1 << 30, "n_inner": 1 << 32}, None, "but config.json's sizes make it"),
    "not a family neuroscan scans": (
        {"model_type": "bert"},
        None,
        "is a 'bert' model, which neuroscan does not scan: pass a checkpoint of a supported model_type: gptj (GPT-J), "
        "gpt_neox (GPT-NeoX), llama (Llama), mistral (Mistral), qwen2 (Qwen2), gpt2 (GPT-2)",
    ),
    "a context of a terabyte": ({"n_positions": 10**12}, None, "n_positions 1,000,000,000,000 is over 1,048,576"),
    "more layers than the weights": ({"n_layer": 30}, None, "has no tensors of block 28 (transformer.h.28.*)"),
    "fewer layers than the weights": ({"n_layer": 20}, None, "hold 28 blocks, but config.json says n_layer 20"),
}


def _broken_copy(tiny_model: Path, tmp_path: Path, change, text) -> Path:
    """The embedded checkpoint's small files copied, its weights linked, one file changed."""
    model = tmp_path / "model"
    model.mkdir()
    for f in tiny_model.iterdir():
        if f.suffix == ".safetensors":
            (model / f.name).symlink_to(f)
        else:
            (model / f.name).write_bytes(f.read_bytes())
    if isinstance(change, dict):
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**config, **change}))
    else:
        (model / change).write_text(text)
    return model


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_checkpoint_that_does_not_match_itself_is_one_line_before_anything_starts(tiny_model, tmp_path, capsys, case):
    change, text, line = BROKEN[case]
    model = _broken_copy(tiny_model, tmp_path, change, text)
    out = tmp_path / "out"
    assert main(["scan", "seed", "--model", str(model), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("neuroscan: error: ") and err.count("\n") == 1 and line in err, err
    assert "restore" in err or "save the tokenizer" in err or "pass a checkpoint of a supported" in err
    assert not out.exists()


def test_the_checkpoints_the_project_builds_pass(tiny_model, other_model):
    from workers.checkpoint import check_checkpoint

    for model in (tiny_model, other_model):
        check_checkpoint(model)
