"""Build one pipeline stage's model from a checkpoint, loading only the stage's tensors.

The stage is its family's plain transformers base model (``GPTJModel``, ``GPTNeoXModel``,
``LlamaModel``, ``GPT2Model``...; `workers.families`) whose block list holds just blocks
[start, stop), so it runs through the public forward and keeps working as transformers'
internals move (mask and rotary helpers change between minor versions). In GPT-J two modules
of each block are swapped for faster ones with the same parameters and results: the attention
rotates its queries and keys in place (`workers.rotary`) and the tanh GELU is one kernel
(`TanhGELU`, also GPT-2's). Non-first stages take ``inputs_embeds=hidden``; every stage gets
the same position ids and rebuilds its own causal mask and rotary tables. The final norm is
an identity except on the last stage, which also holds the head. Parameters are created on the meta device and only the
owned tensors are materialised, so a stage's memory is its share of the model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from torch import nn
from transformers import PretrainedConfig

from workers.checkpoint import read_tensors, tensor_files
from workers.families import d_model, family, tied
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
    module, ``mlp.act``, as transformers' is.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.gelu(x, approximate="tanh")


class NoPositions(nn.Module):
    """Stands for GPT-2's learned position embedding on non-first stages: the first stage
    already added it, and the base model's forward adds it again to ``inputs_embeds``."""

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros((), device=position_ids.device)


class StageModel(nn.Module):
    """Blocks [start, stop) of a model of any `workers.families` family, plus its embedding
    (first stage) or final norm and head (last).

    The base model is built with ``stop`` blocks and keeps [start, stop), so each block keeps
    its index in the whole model (GPT-2 scales attention by it, Qwen2 picks a
    layer's attention kind by it); the config then says ``stop - start`` blocks, with each
    block's entry of ``layer_types``.
    """

    def __init__(self, config: PretrainedConfig, shard: ShardSpec):
        super().__init__()
        self.shard = shard
        self.family = family(config)
        config = copy.deepcopy(config)
        config.num_hidden_layers = shard.stop
        self.body = self.family.module("base")(config)
        blocks = nn.ModuleList(list(getattr(self.body, self.family.blocks))[shard.start : shard.stop])
        setattr(self.body, self.family.blocks, blocks)
        self.body.config.num_hidden_layers = shard.stop - shard.start
        if getattr(self.body.config, "layer_types", None) is not None:
            self.body.config.layer_types = self.body.config.layer_types[shard.start : shard.stop]
        if self.family.model_type == "gptj":
            for block in blocks:
                block.attn = RotaryAttention(config, block.attn.layer_idx)  # the rotation in place, no concatenation
        if getattr(config, "activation_function", None) == "gelu_new":
            for block in blocks:
                block.mlp.act = TanhGELU()
        if not shard.last:
            setattr(self.body, self.family.norm, nn.Identity())
        if not shard.first:
            setattr(self.body, self.family.embed, None)  # unused: non-first stages take inputs_embeds
            if self.family.positions:
                setattr(self.body, self.family.positions, NoPositions())
        self.lm_head = nn.Linear(d_model(config), config.vocab_size, bias=self.family.head_bias) if shard.last else None

    @property
    def blocks(self) -> nn.ModuleList:
        return getattr(self.body, self.family.blocks)

    def checkpoint_names(self, stored: set[str]) -> dict[str, list[str]]:
        """Checkpoint tensor name -> this module's parameter names, for owned tensors only
        (one tensor fills two parameters, which `load_stage` makes one, where a tied head is
        the embedding and this stage holds both). ``stored``: the checkpoint's tensor names,
        which say its prefix and head name (`Family.stored_names`) and whether the head is tied."""
        fam = self.family
        prefix, head = fam.stored_names(stored)
        blocks = f"body.{fam.blocks}."
        names: dict[str, list[str]] = {}
        for name, _ in self.named_parameters():
            if name.startswith(blocks):
                local, rest = name.removeprefix(blocks).split(".", 1)
                ckpt = f"{prefix}{fam.blocks}.{int(local) + self.shard.start}.{rest}"
            elif name.startswith("body."):
                ckpt = prefix + name.removeprefix("body.")
            else:  # the head, under the name it is stored by, or the embedding it is tied to
                ckpt = head + name.removeprefix("lm_head")
                if name == "lm_head.weight" and ckpt not in stored and tied(self.body.config):
                    ckpt = f"{prefix}{fam.embed}.weight"
            names.setdefault(ckpt, []).append(name)
        return names

    def neurons(self, block: nn.Module) -> nn.Module:
        """The module whose input is ``block``'s neuron activations (the MLP's output projection)."""
        return block.get_submodule(self.family.down)

    def forward(self, tokens_or_hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor):
        """[batch, pos] token ids (first stage) or [batch, pos, d_model] hidden -> hidden."""
        key = "input_ids" if self.shard.first else "inputs_embeds"
        out = self.body(
            **{key: tokens_or_hidden}, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
        return out.last_hidden_state


def load_stage(path: str, config: PretrainedConfig, shard: ShardSpec, device: str, dtype: torch.dtype) -> StageModel:
    """Create the stage on the meta device and fill in exactly its own tensors from ``path``."""
    with init_empty_weights(include_buffers=False):
        model = StageModel(config, shard)
    names = model.checkpoint_names(set(tensor_files(Path(path))))
    for ckpt_name, tensor in read_tensors(path, list(names)).items():
        first, *tied_to = names[ckpt_name]
        set_module_tensor_to_device(model, first, device, value=tensor, dtype=dtype)
        for name in tied_to:  # a tied head on the embedding's stage: the same parameter, held once
            module, _, attr = name.rpartition(".")
            setattr(model.get_submodule(module), attr, model.get_parameter(first))
    for name, buf in list(model.named_buffers()):  # rotary tables, built at init on the CPU
        module_name, _, buf_name = name.rpartition(".")
        module = model.get_submodule(module_name)
        module._buffers[buf_name] = buf.to(device)
    return model.eval()
