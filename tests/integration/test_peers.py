"""The bench's peers (TransformerLens, nnsight) reduce the same activations as neuroscan's stage.

If a peer hooked the wrong tensor (the MLP's pre-activation, the block output) its timing would
be of another computation; these tests pin what each one reduces to what enters the MLP's
output projection, in each family.
"""

from __future__ import annotations

import pytest
import torch

from bench import peers
from neuroscan.config import Selection
from prompts.batching import micro_batches
from workers.checkpoint import load_config, load_tokenizer
from workers.embedded import preset_config, write_checkpoint
from workers.families import context, n_layers
from workers.shard import ShardSpec
from workers.stage import Stage, StageSpec


@pytest.fixture(scope="module", params=["tiny", "tiny-neox", "tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-gpt2"])
def setup(request, tiny_model, tmp_path_factory):
    """A stage holding every layer of the embedded GPT-J, or of a tiny model of another family."""
    model = tiny_model
    if request.param != "tiny":
        model = write_checkpoint(preset_config(request.param), tmp_path_factory.mktemp(request.param) / "m")
    config = load_config(model)
    n = n_layers(config)
    stage = Stage(StageSpec(str(model), ShardSpec(0, n, n), "cpu", "float32"))
    stage.setup()
    tokenizer = load_tokenizer(model)
    batch = next(b for b, _ in micro_batches("seed", tokenizer, context(config), 512, False))
    return stage, tokenizer, batch


def _inputs(batch):
    b, t = batch.input_ids.shape
    pos = torch.arange(t)
    mask = (pos[None, :] < torch.as_tensor(batch.n_input)[:, None]).long()
    return torch.as_tensor(batch.input_ids).long(), mask, pos[None, :].expand(b, t)


def _stage_activations(stage, batch) -> list[torch.Tensor]:
    acts = []
    handles = [
        stage.model.neurons(block).register_forward_pre_hook(lambda m, i: acts.append(i[0].clone()))
        for block in stage.model.blocks
    ]
    try:
        with torch.inference_mode():
            stage.model(*_inputs(batch))
    finally:
        for h in handles:
            h.remove()
    return acts


def _captured(monkeypatch) -> list:
    seen = []
    real = peers.reduce_saved

    def spy(acts, n_tokens, sel):
        seen.append([a.clone() for a in acts])
        return real(acts, n_tokens, sel)

    monkeypatch.setattr(peers, "reduce_saved", spy)
    return seen


def test_nnsight_saves_exactly_the_stage_activations(setup, monkeypatch):
    pytest.importorskip("nnsight")
    stage, _, batch = setup
    seen = _captured(monkeypatch)
    with peers.nnsight_step(stage, _inputs, Selection()) as step:
        assert step(batch) > 0
    expected = _stage_activations(stage, batch)
    assert len(seen[0]) == len(expected) == len(stage.model.blocks)
    for got, want in zip(seen[0], expected):
        assert torch.equal(got, want)


def test_transformer_lens_caches_the_stage_activations_and_leaves_the_model_as_it_was(setup, monkeypatch):
    pytest.importorskip("transformer_lens")
    stage, tokenizer, batch = setup
    if stage.model.family.model_type not in peers.LENS_FAMILIES:
        pytest.skip("the bench does not time TransformerLens on this family (bench.peers.LENS_FAMILIES)")
    attention = stage.model.body.config._attn_implementation
    modules = dict(stage.model.named_modules())
    hooks = {name: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for name, m in modules.items()}
    seen = _captured(monkeypatch)
    with peers.transformer_lens_step(stage, tokenizer, _inputs, Selection()) as step:
        assert step(batch) > 0
        assert dict(stage.model.named_modules()) != modules  # the bridge wraps the blocks while it runs
    assert stage.model.body.config._attn_implementation == attention  # TransformerLens's eager attention undone
    assert dict(stage.model.named_modules()) == modules  # and its wrappers taken out: the same modules, by identity
    assert {
        name: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for name, m in modules.items()
    } == hooks  # and its hooks
    expected = _stage_activations(stage, batch)
    assert len(seen[0]) == len(expected)
    n = torch.as_tensor(batch.n_tokens)
    for got, want in zip(seen[0], expected):
        # Its eager attention against the stage's SDPA: equal up to float32 rounding, on the prompts' own tokens.
        for row, length in enumerate(n.tolist()):
            torch.testing.assert_close(got[row, :length], want[row, :length], atol=1e-4, rtol=1e-4)
