"""GPT-J's attention with its rotary position embedding applied in place, in one kernel on a GPU.

transformers rotates the first ``rotary_dim`` features of every head of the queries and keys
out of place (stride-2 slices, a negation, a stack, two products and a sum, a dozen kernels
for the queries and the keys) and then concatenates the rotated features with the rest of
each head, a strided copy of the whole query and key tensors (a notable share of the forward
pass's device time at GPT-J-6B's shape: bench/RESULTS.md). Here the rotation is written back into the
projections' own outputs: on a GPU one Triton kernel reads and writes only the rotated
features, of the queries and the keys together; elsewhere a few in-place tensor ops.

Both give transformers' values bit for bit in every dtype: each product and the sum are
rounded to the activations' dtype as PyTorch's elementwise kernels round them (computed in
float32, stored in the dtype). `tests/unit/test_rotary.py` compares with transformers' own
attention on the CPU (the kernel under Triton's interpreter), `tests/gpu/` on a GPU.
"""

from __future__ import annotations

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.gptj.modeling_gptj import GPTJAttention, eager_attention_forward

from workers.fused import available, compiled, interpreted, tl

LAUNCH = {"num_warps": 4, "enable_fp_fusion": False}
"""The kernel's launch options. No floating-point contraction: each product is rounded, then
the sum, as PyTorch does; a fused multiply-add would differ in float32."""


def rotary_kernel(q, k, sin, cos, n_pairs, stride_x, stride_head, stride_sc, pairs_per_head, BLOCK: tl.constexpr):
    # Program (token, 0) turns every head's rotated features of q, (token, 1) those of k.
    row = tl.program_id(0).to(tl.int64)
    if tl.program_id(1) == 0:
        x = q
    else:
        x = k
    slot = tl.arange(0, BLOCK)  # (head, pair) flattened
    ok = slot < n_pairs
    head, pair = slot // pairs_per_head, slot % pairs_per_head
    at = x + row * stride_x + head * stride_head + 2 * pair  # the pair's even feature
    s = tl.load(sin + row * stride_sc + pair, mask=ok, other=0.0).to(tl.float32)
    c = tl.load(cos + row * stride_sc + pair, mask=ok, other=0.0).to(tl.float32)
    even = tl.load(at, mask=ok, other=0.0)
    odd = tl.load(at + 1, mask=ok, other=0.0)
    dtype = even.dtype
    even, odd = even.to(tl.float32), odd.to(tl.float32)
    # transformers: x * cos + rotate_every_two(x) * sin, each op rounded to the dtype.
    new_even = (even * c).to(dtype).to(tl.float32) - (odd * s).to(dtype).to(tl.float32)
    new_odd = (odd * c).to(dtype).to(tl.float32) + (even * s).to(dtype).to(tl.float32)
    tl.store(at, new_even.to(dtype), mask=ok)
    tl.store(at + 1, new_odd.to(dtype), mask=ok)


def rotate_(
    query: torch.Tensor,
    key: torch.Tensor,
    sin: torch.Tensor,
    cos: torch.Tensor,
    rotary_dim: int,
    kernel: bool | None = None,
) -> None:
    """Rotate the first ``rotary_dim`` features of every head of ``query`` and ``key`` in place.

    query, key [batch, pos, heads, head_dim] (each token's heads contiguous, as a projection's
    output viewed per head); sin, cos [batch, pos, rotary_dim / 2] in their dtype. Feature
    pairs (2i, 2i + 1) turn by angle i: (a, b) -> (a cos - b sin, b cos + a sin).
    ``kernel``: the Triton kernel (default: where `workers.fused.available`, a CUDA device with Triton).
    """
    if kernel is None:
        kernel = available(query.device)
    if not kernel:
        s, c = sin[:, :, None, :], cos[:, :, None, :]  # [batch, pos, 1, pairs]
        for x in (query, key):
            pairs = x[..., :rotary_dim].unflatten(-1, (rotary_dim // 2, 2))  # [batch, pos, heads, pairs, 2], a view
            even, odd = pairs[..., 0], pairs[..., 1]
            new_even = even * c - odd * s
            odd.copy_(odd * c + even * s)
            even.copy_(new_even)
        return
    import triton

    b, t, h, _ = query.shape
    if (
        key.stride() != query.stride()
        or query.stride(3) != 1
        or query.stride(1) != h * query.stride(2)
        or query.stride(0) != t * query.stride(1)
    ):
        raise ValueError("query and key must share a layout with each token's heads contiguous and tokens in order")
    sin, cos = sin.expand(b, t, -1).reshape(b * t, -1), cos.expand(b, t, -1).reshape(b * t, -1)
    pairs = rotary_dim // 2
    block = max(triton.next_power_of_2(h * pairs), 16)  # every (head, pair) of a token: 512 at GPT-J-6B's shape
    compiled(rotary_kernel, interpreted())[(b * t, 2)](
        query,
        key,
        sin,
        cos,
        h * pairs,
        query.stride(1),
        query.stride(2),
        sin.stride(0),
        pairs,
        BLOCK=block,
        **LAUNCH,
    )


class RotaryAttention(GPTJAttention):
    """transformers' ``GPTJAttention`` with the rotation done in place by `rotate_` (no
    concatenation); the same parameters, arguments and results."""

    def forward(self, hidden_states, position_embeddings, attention_mask=None, cache=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        per_head = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(per_head)
        key = self.k_proj(hidden_states).view(per_head)
        value = self.v_proj(hidden_states).view(per_head).transpose(1, 2)
        sin, cos = position_embeddings
        rotate_(query, key, sin, cos, self.rotary_dim)
        query, key = query.transpose(1, 2), key.transpose(1, 2)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, weights = attend(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        out = self.out_proj(out.reshape(*input_shape, -1).contiguous())
        return self.resid_dropout(out), weights
