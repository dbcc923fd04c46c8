"""The model families neuroscan scans, and where each keeps what a stage needs.

A stage is a family's plain transformers base model (``GPTJModel``, ``GPTNeoXModel``,
``LlamaModel``...) holding only its own blocks, so every family runs through transformers'
own forward. What differs between families is data, kept here in one table: the checkpoint's
prefix of the base model, the names of the blocks, the embedding, the final norm and the
head, and the MLP's output projection. A neuron's activation is what enters that projection:
``act(fc_in(x))`` in GPT-J, GPT-NeoX and GPT-2, and ``act(gate_proj(x)) * up_proj(x)`` in the
gated MLPs of Llama, Mistral and Qwen2, whose ``up_proj`` output is also read (`Family.up`)
to tell a negative gate from a negative up.

The family comes from ``model_type`` in ``config.json``; any other is refused in one line that
lists these.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import transformers
from accelerate import init_empty_weights
from transformers import PretrainedConfig

from neuroscan.errors import UserError

MAX_TOKENS = 32767
"""The longest prompt a scan takes whatever the model's context: token positions are stored as int16."""


@dataclass(frozen=True)
class Family:
    model_type: str
    """``model_type`` in ``config.json``."""
    name: str
    """How the family is called in messages and the report."""
    config_class: str
    base_class: str
    causal_lm: str
    """The transformers classes of its config, its base model (no head) and its causal LM."""
    prefix: str
    """The base model's tensors' prefix in a checkpoint ("transformer.", "model."...)."""
    blocks: str
    embed: str
    norm: str
    """Attribute names in the base model: the block list, the token embedding, the final norm."""
    head: str
    """The output head's module name in a checkpoint (its weight may be tied to the embedding)."""
    down: str
    """The MLP's output projection in a block: a neuron's activation is what enters it."""
    head_bias: bool = False
    up: str | None = None
    """Gated MLPs: the ``up`` projection, whose value at a neuron's extremes the rows carry."""
    positions: str | None = None
    """Learned position embeddings added by the base model's forward (GPT-2's ``wpe``)."""
    sizes: tuple[str, ...] = ()
    """``config.json`` fields that must be positive whole numbers: hidden size, heads, layers,
    context and vocabulary first, in that order."""
    legacy_prefixes: tuple[str, ...] = ()
    """Older checkpoints' prefixes for the same tensors (GPT-2's first releases had none)."""
    mlp_in: tuple[str, ...] = ()
    """The MLP's input projections (one a neuron, in a block), for random checkpoints whose
    neurons should reach every band (`workers.embedded`)."""
    conv1d: bool = False
    """Weights stored [in, out] (GPT-2's ``Conv1D``) rather than [out, in] (``nn.Linear``)."""
    tensor_parallel: bool = True
    """Whether DeepSpeed AutoTP shards its blocks (``--tensor-parallel``; `workers.autotp`)."""

    def stored_names(self, stored) -> tuple[str, str]:
        """The prefix and the head's name a checkpoint's tensors (``stored``, their names) use:
        the family's, a legacy prefix (GPT-2's first releases), or transformers' ``lm_head``
        (what it saves for a family whose released checkpoints name the head otherwise)."""
        prefix = next(
            (p for p in (self.prefix, *self.legacy_prefixes) if f"{p}{self.embed}.weight" in stored), self.prefix
        )
        head = "lm_head" if f"{self.head}.weight" not in stored and "lm_head.weight" in stored else self.head
        return prefix, head

    def module(self, kind: str):
        return getattr(transformers, {"config": self.config_class, "base": self.base_class}[kind])


HF_SIZES = ("hidden_size", "num_attention_heads", "num_hidden_layers", "max_position_embeddings", "vocab_size")
"""The size fields of the configs written after GPT-2 and GPT-J named theirs ``n_*``."""


def _gated(model_type: str, name: str) -> Family:
    """A Llama-like family: ``{Name}Config``, ``{Name}Model``, ``{Name}ForCausalLM``, the
    gated MLP (``down_proj(act(gate_proj(x)) * up_proj(x))``) and the same module names."""
    return Family(
        model_type, name, f"{name}Config", f"{name}Model", f"{name}ForCausalLM", "model.", "layers", "embed_tokens",
        "norm", "lm_head", down="mlp.down_proj", up="mlp.up_proj", mlp_in=("mlp.gate_proj",),
        sizes=(*HF_SIZES, "intermediate_size"),
    )  # fmt: skip


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family(
            "gptj", "GPT-J", "GPTJConfig", "GPTJModel", "GPTJForCausalLM", "transformer.", "h", "wte", "ln_f", "lm_head",
            down="mlp.fc_out", head_bias=True, mlp_in=("mlp.fc_in",),
            sizes=("n_embd", "n_head", "n_layer", "n_positions", "vocab_size"),
        ),
        Family(
            "gpt_neox", "GPT-NeoX", "GPTNeoXConfig", "GPTNeoXModel", "GPTNeoXForCausalLM", "gpt_neox.", "layers", "embed_in",
            "final_layer_norm", "embed_out", down="mlp.dense_4h_to_h", mlp_in=("mlp.dense_h_to_4h",),
            sizes=(*HF_SIZES, "intermediate_size"),
        ),
        *(_gated(*names) for names in (("llama", "Llama"), ("mistral", "Mistral"), ("qwen2", "Qwen2"))),
        Family(
            "gpt2", "GPT-2", "GPT2Config", "GPT2Model", "GPT2LMHeadModel", "transformer.", "h", "wte", "ln_f", "lm_head",
            down="mlp.c_proj", positions="wpe", mlp_in=("mlp.c_fc",), conv1d=True, tensor_parallel=False,
            sizes=("n_embd", "n_head", "n_layer", "n_positions", "vocab_size"),
            legacy_prefixes=("",),
        ),
    )
}  # fmt: skip


def supported() -> str:
    return ", ".join(f"{f.model_type} ({f.name})" for f in FAMILIES.values())


def family_of(model_type, where: str | Path) -> Family:
    """The family of a ``config.json``'s ``model_type``; one line naming the supported ones otherwise."""
    family = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        raise UserError(
            f"model at {where} is a {model_type!r} model, which neuroscan does not scan: "
            f"pass a checkpoint of a supported model_type: {supported()}"
        )
    return family


def family(config: PretrainedConfig) -> Family:
    return family_of(config.model_type, getattr(config, "name_or_path", "") or "the config")


def n_layers(config: PretrainedConfig) -> int:
    return config.num_hidden_layers


def d_model(config: PretrainedConfig) -> int:
    return config.hidden_size


def heads(config: PretrainedConfig) -> int:
    return config.num_attention_heads


def kv_heads(config: PretrainedConfig) -> int:
    """Key-value heads: fewer than the heads in grouped-query attention (Llama, Mistral, Qwen2)."""
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def d_mlp(config: PretrainedConfig) -> int:
    """Neurons a layer: the width of the MLP (GPT-J and GPT-2 default to 4 x d_model)."""
    inner = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
    return inner or 4 * config.hidden_size


def context(config: PretrainedConfig) -> int:
    """The longest prompt a scan takes: the model's context, at most `MAX_TOKENS`."""
    return min(config.max_position_embeddings, MAX_TOKENS)


def tied(config: PretrainedConfig) -> bool:
    """Whether the output head is the token embedding (no head tensor of its own in a checkpoint)."""
    return bool(getattr(config, "tie_word_embeddings", False))


def tensor_shapes(
    config: PretrainedConfig, prefix: str | None = None, head: bool = True, head_name: str | None = None
) -> dict[str, tuple[int, ...]]:
    """Every tensor of a checkpoint of ``config``, name -> shape, as the family's own modules
    built on the meta device (no memory) hold them, in the modules' order; ``head``: with the
    output head (left out where it is tied to the embedding and not stored); ``prefix`` and
    ``head_name``: the checkpoint's (`Family.stored_names`), the family's by default."""
    fam = family(config)
    prefix = fam.prefix if prefix is None else prefix
    head_name = head_name or fam.head
    with init_empty_weights(include_buffers=True):  # buffers are no checkpoint's tensors
        body = fam.module("base")(config)
    shapes = {prefix + name: tuple(p.shape) for name, p in body.named_parameters()}
    if head:
        vocab, d = shapes[f"{prefix}{fam.embed}.weight"]
        shapes[f"{head_name}.weight"] = (vocab, d)
        if fam.head_bias:
            shapes[f"{head_name}.bias"] = (vocab,)
    return shapes
