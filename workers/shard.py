"""Build one pipeline stage's model from a checkpoint, loading only the stage's tensors.

The stage is a plain transformers ``GPTJModel`` whose ``h`` holds just blocks [start, stop),
so it runs through the public forward and keeps working as transformers' internals move
(mask and rotary helpers change between minor versions). Two modules of each block are
swapped for faster ones with the same parameters and results: the attention rotates its
queries and keys in place (`workers.rotary`) and the GELU is one kernel (`TanhGELU`).
Non-first stages take ``inputs_embeds=hidden``; every stage gets the same 2-D attention mask and position ids and
rebuilds its own causal mask and rotary tables. ``ln_f`` is an identity except on the last
stage, which also holds ``lm_head``. Parameters are created on the meta device and only the
owned tensors are materialised, so a stage's memory is its share of the model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from torch import nn
from transformers import GPTJConfig, GPTJModel

from workers.checkpoint import read_tensors
from workers.rotary import RotaryAttention


@dataclass(frozen=True)
class ShardSpec:
    """Which part of the model a stage holds."""

    start: int
    """First owned block."""
    stop: int
    """One past the last owned block."""
    n_layers: int
    """Blocks in the whole model."""

    @property
    def first(self) -> bool:
        return self.start == 0

    @property
    def last(self) -> bool:
        return self.stop == self.n_layers


class TanhGELU(nn.Module):
    """GPT-J's ``gelu_new`` (the tanh approximation) as one fused kernel.

    transformers writes it as eight elementwise ops, each a pass over the [batch, pos, d_mlp]
    activations; ``F.gelu(approximate="tanh")`` is the same function in one pass. It stays a
    module because the stage's hooks hang on ``mlp.act``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.gelu(x, approximate="tanh")


class StageModel(nn.Module):
    """Blocks [start, stop) of a GPT-J, plus ``wte`` (first stage) or ``ln_f``/``lm_head`` (last)."""

    def __init__(self, config: GPTJConfig, shard: ShardSpec):
        super().__init__()
        self.shard = shard
        config = copy.deepcopy(config)
        config.n_layer = shard.stop - shard.start
        self.body = GPTJModel(config)
        for block in self.body.h:
            block.attn = RotaryAttention(config, block.attn.layer_idx)  # the rotation in place, no concatenation
            if config.activation_function == "gelu_new":
                block.mlp.act = TanhGELU()
        if not shard.last:
            self.body.ln_f = nn.Identity()
        if not shard.first:
            self.body.wte = None  # unused: non-first stages take inputs_embeds
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size) if shard.last else None

    def checkpoint_names(self) -> dict[str, str]:
        """Checkpoint tensor name -> this module's parameter name, for owned tensors only."""
        names = {}
        for name, _ in self.named_parameters():
            if name.startswith("body.h."):
                local, rest = name.removeprefix("body.h.").split(".", 1)
                names[f"transformer.h.{int(local) + self.shard.start}.{rest}"] = name
            elif name.startswith("body."):
                names["transformer." + name.removeprefix("body.")] = name
            else:
                names[name] = name
        return names

    def forward(self, tokens_or_hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor):
        """[batch, pos] token ids (first stage) or [batch, pos, d_model] hidden -> hidden."""
        key = "input_ids" if self.shard.first else "inputs_embeds"
        out = self.body(
            **{key: tokens_or_hidden}, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
        return out.last_hidden_state


def load_stage(path: str, config: GPTJConfig, shard: ShardSpec, device: str, dtype: torch.dtype) -> StageModel:
    """Create the stage on the meta device and fill in exactly its own tensors from ``path``."""
    with init_empty_weights(include_buffers=False):
        model = StageModel(config, shard)
    names = model.checkpoint_names()
    for ckpt_name, tensor in read_tensors(path, list(names)).items():
        set_module_tensor_to_device(model, names[ckpt_name], device, value=tensor, dtype=dtype)
    for name, buf in list(model.named_buffers()):  # rotary tables, built at init on the CPU
        module_name, _, buf_name = name.rpartition(".")
        module = model.get_submodule(module_name)
        module._buffers[buf_name] = buf.to(device)
    return model.eval()
