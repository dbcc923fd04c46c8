"""GPT-J's rotary embedding in place (`workers.rotary`) against transformers' own, bit for bit:
the eager ops, the Triton kernel under the interpreter, and the whole attention module."""

from __future__ import annotations

import pytest
import torch
from transformers import GPTJConfig
from transformers.models.gptj.modeling_gptj import (
    GPTJAttention,
    GPTJRotaryEmbedding,
    apply_rotary_pos_emb,
)

from tests.triton_cpu import HAS_TRITON
from workers.rotary import RotaryAttention, rotate_

KERNEL = [False, pytest.param(True, marks=pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed"))]


def transformers_rotation(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """What transformers' GPTJAttention does to the queries and keys: rotate, then concatenate."""
    return torch.cat([apply_rotary_pos_emb(x[..., :rotary_dim], sin, cos), x[..., rotary_dim:]], dim=-1)


def tables(config: GPTJConfig, positions: torch.Tensor, dtype: torch.dtype):
    return GPTJRotaryEmbedding(config)(torch.zeros((), dtype=dtype), positions)


@pytest.mark.parametrize("kernel", KERNEL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("b", "t", "heads", "head_dim", "rotary_dim"), [(2, 7, 3, 16, 8), (1, 33, 4, 8, 8), (3, 5, 16, 24, 16)]
)
def test_rotation_in_place_is_transformers_bit_for_bit(kernel, dtype, b, t, heads, head_dim, rotary_dim):
    if kernel and dtype == torch.bfloat16 and not torch.cuda.is_available():
        pytest.skip(
            "Triton's interpreter truncates float32 -> bfloat16 (a GPU rounds to nearest): tests/gpu checks bfloat16"
        )
    config = GPTJConfig(n_embd=heads * head_dim, n_head=heads, rotary_dim=rotary_dim, n_positions=64)
    gen = torch.Generator().manual_seed(t * 100 + heads)
    query, key = (torch.randn(b, t, heads, head_dim, generator=gen).mul(4).to(dtype) for _ in range(2))
    positions = torch.randint(0, 64, (b, t), generator=gen)
    sin, cos = tables(config, positions, dtype)
    want_q, want_k = (
        transformers_rotation(query, sin, cos, rotary_dim),
        transformers_rotation(key, sin, cos, rotary_dim),
    )
    rotate_(query, key, sin, cos, rotary_dim, kernel=kernel)
    assert torch.equal(query, want_q) and torch.equal(key, want_k)


@pytest.mark.parametrize("kernel", KERNEL)
def test_shared_positions_broadcast(kernel):
    """Position ids of one row ([1, pos]) serve every prompt of the batch."""
    config = GPTJConfig(n_embd=32, n_head=2, rotary_dim=8, n_positions=16)
    query, key = torch.randn(3, 6, 2, 16), torch.randn(3, 6, 2, 16)
    sin, cos = tables(config, torch.arange(6)[None, :], torch.float32)
    want = [transformers_rotation(x, sin, cos, 8) for x in (query, key)]
    rotate_(query, key, sin, cos, 8, kernel=kernel)
    assert torch.equal(query, want[0]) and torch.equal(key, want[1])


@pytest.mark.parametrize("rotary_dim", [4, 8])  # part of each head, all of it
def test_attention_module_gives_transformers_outputs(rotary_dim):
    config = GPTJConfig(n_embd=32, n_head=4, rotary_dim=rotary_dim, n_positions=32, attn_pdrop=0.0, resid_pdrop=0.0)
    theirs = GPTJAttention(config, layer_idx=0).eval()
    ours = RotaryAttention(config, layer_idx=0).eval()
    ours.load_state_dict(theirs.state_dict())
    hidden = torch.randn(2, 9, 32)
    positions = torch.arange(9)[None, :].expand(2, 9)
    embeddings = GPTJRotaryEmbedding(config)(hidden, positions)
    with torch.no_grad():
        want, _ = theirs(hidden, embeddings, position_ids=positions)
        got, _ = ours(hidden, embeddings, position_ids=positions)
    assert torch.equal(got, want)
