"""The in-place rotary embedding's kernel on a GPU (run with ``pytest -m gpu tests/gpu``):
transformers' values bit for bit at GPT-J-6B's shape, and a whole stage model gives the hidden
states of transformers' own attention exactly."""

from __future__ import annotations

import pytest
import torch
from transformers import GPTJConfig
from transformers.models.gptj.modeling_gptj import (
    GPTJAttention,
    GPTJRotaryEmbedding,
    apply_rotary_pos_emb,
)

from workers.rotary import RotaryAttention, rotate_

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shared_positions", [True, False])
def test_kernel_is_transformers_bit_for_bit_at_gptj_shape(dtype, shared_positions):
    config = GPTJConfig()  # GPT-J-6B: 16 heads of 256, rotary_dim 64
    b, t, heads, head_dim = 8, 256, config.n_head, config.n_embd // config.n_head
    gen = torch.Generator("cuda").manual_seed(0)
    projected = torch.randn(b, t, 2 * heads * head_dim, device="cuda", generator=gen, dtype=dtype) * 3
    query, key = (x.view(b, t, heads, head_dim) for x in projected.chunk(2, dim=-1))  # strided like q_proj's output
    query, key = query.contiguous(), key.contiguous()
    positions = torch.arange(t, device="cuda")[None, :]
    if not shared_positions:
        positions = torch.randint(0, config.n_positions, (b, t), device="cuda", generator=gen)
    sin, cos = GPTJRotaryEmbedding(config).to("cuda")(query, positions)
    rd = config.rotary_dim
    want = [torch.cat([apply_rotary_pos_emb(x[..., :rd], sin, cos), x[..., rd:]], dim=-1) for x in (query, key)]
    rotate_(query, key, sin, cos, rd)
    assert torch.equal(query, want[0]) and torch.equal(key, want[1])


def test_stage_model_hidden_states_equal_transformers_attention(tiny_model):
    from workers.checkpoint import load_config
    from workers.shard import ShardSpec, load_stage

    config = load_config(tiny_model)
    model = load_stage(str(tiny_model), config, ShardSpec(0, config.n_layer, config.n_layer), "cuda", torch.float16)
    assert all(type(block.attn) is RotaryAttention for block in model.body.h)
    ids = torch.randint(0, config.vocab_size, (4, 100), device="cuda")
    positions = torch.arange(100, device="cuda")[None, :].expand(4, 100)
    with torch.inference_mode():
        ours = model(ids, None, positions)
        for block in model.body.h:
            block.attn.__class__ = GPTJAttention
        theirs = model(ids, None, positions)
    assert torch.equal(ours, theirs)
