"""Checkpoints: written in HF layout, each stage reads only its own tensors, bad ones refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import workers.checkpoint as checkpoint
from neuroscan.config import MODEL_PRESETS
from neuroscan.errors import UserError
from tests.unit.test_stage import one_batch
from workers.embedded import preset_config, write_checkpoint
from workers.shard import ShardSpec, load_stage
from workers.stage import Stage, StageSpec


@pytest.mark.parametrize("start, stop", [(0, 2), (2, 4), (4, 5), (0, 5)])
def test_stage_reads_only_its_own_tensors(other_model, read_log, start, stop):
    config = checkpoint.load_config(other_model)
    load_stage(str(other_model), config, ShardSpec(start, stop, config.n_layer), "cpu", torch.float32)
    layers = {int(n.split(".")[2]) for n in read_log if n.startswith("transformer.h.")}
    assert layers == set(range(start, stop))
    assert ("transformer.wte.weight" in read_log) == (start == 0)
    assert ("lm_head.weight" in read_log) == (stop == config.n_layer)
    assert ("transformer.ln_f.weight" in read_log) == (stop == config.n_layer)
    assert len(read_log) == len(set(read_log))  # nothing read twice


def test_stage_ignores_other_layers_bytes(other_model, tmp_path):
    """Corrupt every tensor of blocks outside the stage: its output must not change."""
    config = checkpoint.load_config(other_model)
    broken = tmp_path / "broken"
    shutil.copytree(other_model, broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())["weight_map"]
    for file in set(index.values()):
        tensors = load_file(broken / file)
        for name in tensors:
            if name.startswith(("transformer.h.0.", "transformer.h.1.", "transformer.h.4.", "lm_head")):
                tensors[name] = torch.full_like(tensors[name], float("nan"))
        save_file(tensors, broken / file, metadata={"format": "pt"})
    outs = []
    for path in (other_model, broken):
        stage = Stage(StageSpec(str(path), ShardSpec(2, 4, config.n_layer), "cpu", "float32"))
        stage.setup()
        batch, hidden = one_batch(config.n_embd)
        outs.append(stage.forward(batch, hidden))
    assert (outs[0][0].data == outs[1][0].data).all()
    assert (outs[0][1].rows["max_act"] == outs[1][1].rows["max_act"]).all()


def test_sharded_checkpoint_layout(other_model):
    index = json.loads((other_model / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 1 and all((other_model / f).exists() for f in files)
    assert all(f.startswith("model-") and f.endswith(f"-of-{len(files):05d}.safetensors") for f in files)
    assert (other_model / "config.json").exists() and (other_model / "tokenizer.json").exists()


def test_embedded_model_has_gptj_depth_and_all_four_bands(tiny_model):
    from transformers import AutoTokenizer, GPTJForCausalLM

    model = GPTJForCausalLM.from_pretrained(tiny_model).eval()
    assert model.config.n_layer == 28 and model.config.n_inner == 512 and model.config.n_positions == 2048
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    assert len(tokenizer) == 257 and tokenizer.eos_token == "<|endoftext|>"
    acts = []
    hooks = [b.mlp.act.register_forward_hook(lambda m, i, o: acts.append(o)) for b in model.transformer.h]
    with torch.no_grad():
        model(torch.tensor([tokenizer("The quick brown fox jumps over the lazy dog.")["input_ids"]]))
    for h in hooks:
        h.remove()
    a = torch.cat(acts)
    fractions = [
        (a > 3.5).float().mean(),
        ((a > 3) & (a <= 3.5)).float().mean(),
        ((a >= 0) & (a <= 3)).float().mean(),
        (a < 0).float().mean(),
    ]
    assert all(f > 0.005 for f in fractions), fractions


def test_gptj_6b_preset_is_gptj_6b_shaped():
    config = preset_config("gptj-6b")
    assert (config.n_layer, config.n_embd, config.n_head, config.rotary_dim, config.vocab_size) == (
        28,
        4096,
        16,
        64,
        50400,
    )
    assert (config.n_inner or 4 * config.n_embd) == 16384
    assert MODEL_PRESETS["gptj-6b"]["dtype"] == "float16"


def test_missing_and_broken_checkpoints_are_refused(other_model, tmp_path, monkeypatch):
    monkeypatch.setattr(
        "huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub")
    )  # an empty cache, wherever this runs
    with pytest.raises(UserError, match="does not exist"):
        checkpoint.resolve_model(str(tmp_path / "nope"))
    with pytest.raises(
        UserError,
        match=r"EleutherAI/gpt-j-6b is neither a local directory nor in the Hugging Face cache: download it first \(`hf download EleutherAI/gpt-j-6b`",
    ):
        checkpoint.resolve_model("EleutherAI/gpt-j-6b")  # the CLI of huggingface_hub >= 1.0 is `hf`
    no_tok = tmp_path / "no_tok"
    shutil.copytree(other_model, no_tok)
    (no_tok / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="no tokenizer files"):
        checkpoint.resolve_model(str(no_tok))
    single = write_checkpoint(
        preset_config("tiny", n_layer=2, n_embd=32, n_head=2, rotary_dim=4, n_inner=64), tmp_path / "single"
    )
    data = (single / "model.safetensors").read_bytes()
    (single / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated or corrupted"):
        checkpoint.read_tensors(single, ["lm_head.weight"])


def test_truncated_weights_are_refused_before_loading(tmp_path):
    path = write_checkpoint(
        preset_config("tiny", n_layer=2, n_embd=32, n_head=2, rotary_dim=4, n_inner=64), tmp_path / "m"
    )
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(
        UserError, match=r"model\.safetensors \(Error while deserializing header.*truncated or corrupted"
    ):
        checkpoint.resolve_model(str(path))


def test_missing_shard_is_refused(other_model, tmp_path):
    broken = tmp_path / "m"
    shutil.copytree(other_model, broken)
    next(broken.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(UserError, match="listed in the index is missing"):
        checkpoint.resolve_model(str(broken))


def test_a_hub_id_resolves_to_its_snapshot_in_the_local_cache(other_model, tmp_path, monkeypatch):
    """`hf download org/name` lays a checkpoint out as the hub cache does; --model org/name finds it."""
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--org--tiny-gptj"
    revision = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(other_model, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    source = checkpoint.resolve_model("org/tiny-gptj")
    assert (source.id, source.revision) == ("org/tiny-gptj", revision)
    assert source.path == str((repo / "snapshots" / revision).resolve())
    assert checkpoint.load_config(source.path).n_layer == checkpoint.load_config(other_model).n_layer


def test_the_fingerprint_changes_with_the_weights_or_the_config_not_with_a_copy(tiny_model, other_model, tmp_path):
    """What --resume compares: new weights of the same shapes and size at the same path (the
    case that mixed two models in one run) change it; a copy of the same files does not."""
    copy = shutil.copytree(tiny_model, tmp_path / "copy")
    assert checkpoint.fingerprint(copy) == checkpoint.fingerprint(tiny_model)
    assert checkpoint.fingerprint(other_model) != checkpoint.fingerprint(tiny_model)  # shards and an index
    before = checkpoint.fingerprint(copy)
    tensors = load_file(copy / "model.safetensors")
    size = (copy / "model.safetensors").stat().st_size
    with checkpoint.safe_open(copy / "model.safetensors", "pt") as f:
        metadata = f.metadata()
    retrained = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in tensors.items()}
    save_file(retrained, copy / "model.safetensors", metadata=metadata)
    assert (copy / "model.safetensors").stat().st_size == size
    assert checkpoint.fingerprint(copy) != before
    config = json.loads((tiny_model / "config.json").read_text())
    shutil.copy(tiny_model / "model.safetensors", copy / "model.safetensors")
    assert checkpoint.fingerprint(copy) == before
    (copy / "config.json").write_text(json.dumps({**config, "layer_norm_epsilon": 1e-6}))
    assert checkpoint.fingerprint(copy) != before
