"""The tools users would pick instead of neuroscan, each doing the same reduction its usual way.

  transformer_lens  TransformerLens's ``TransformerBridge`` over the same model: ``run_with_cache``
                    keeping every ``blocks.N.mlp.hook_post``, then the reduction on the cache
  nnsight           an ``NNsight`` trace of the same model saving every MLP output projection's
                    input (the neuron activations), then the reduction on the saved tensors

Both hold all of a micro-batch's activations at once (that is what caching means) and then run
neuroscan's eager reduction, compaction and host copy on them, so their rows are the same as
``scan_local_eager``'s and only the way to the activations differs. Both wrap the bench's own
loaded model (no second copy of the weights). They are optional: ``pip install
'neuroscan[bench]'`` installs them; `available` says whether one is importable here.
"""

from __future__ import annotations

import importlib.util
from contextlib import contextmanager

import torch

from neuroscan.config import Selection
from workers.reduce import compact, reduce_layer
from workers.transfer import leaves, to_host

PEERS = ("transformer_lens", "nnsight")
PEER_PACKAGES = ("transformer-lens", "nnsight")
"""Their distributions' names, for the versions a bench report records."""
HUB_NAMES = {
    "gptj": "EleutherAI/gpt-j-6b",
    "gpt_neox": "EleutherAI/pythia-6.9b",
    "llama": "meta-llama/Meta-Llama-3-8B",
    "mistral": "mistralai/Mistral-7B-v0.1",
    "qwen2": "Qwen/Qwen2-7B",
}
"""The name TransformerLens knows each family by (its adapter; the weights are the bench's own)."""
LENS_FAMILIES = ("gptj", "gpt_neox", "llama", "mistral", "qwen2")
"""The families whose TransformerLens activations are checked equal to the stage's
(tests/integration/test_peers.py): all but GPT-2. Its GPT-2 bridge gives other MLP activations than
transformers' ``GPT2Model`` on the same weights (by up to 6 at layer 0 of the tiny GPT-2), so a
GPT-2 bench does not time it."""


def available(peer: str) -> bool:
    return importlib.util.find_spec(peer) is not None


def reduce_saved(acts: list[torch.Tensor], n_tokens: torch.Tensor, sel: Selection) -> int:
    """neuroscan's eager reduction of every saved layer, compaction and one host copy; bytes copied."""
    rows, per_prompt = compact([reduce_layer(a, n_tokens, sel) for a in acts])
    host = to_host({"rows": rows, "per_prompt": per_prompt})
    return sum(a.nbytes for a in leaves(host))


@contextmanager
def transformer_lens_step(stage, tokenizer, inputs, sel: Selection):
    """A bench step through TransformerLens; the stage's model is left as it was afterwards.

    ``inputs(batch)`` gives (ids, attention mask, position ids) on the device."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM

    body, fam = stage.model.body, stage.model.family
    attention = body.config._attn_implementation
    undo = _restorer(stage.model)  # the bridge puts its wrappers in place of the blocks and hooks the originals
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(body.config)
    setattr(hf, fam.prefix.rstrip("."), body)  # the loaded weights, shared
    head = next(name for name, m in hf.named_children() if m is hf.get_output_embeddings())
    setattr(hf, head, stage.model.lm_head)
    bridge = TransformerBridge.boot_transformers(
        HUB_NAMES[fam.model_type],
        hf_model=hf,
        tokenizer=tokenizer,
        device=str(stage.device),
        dtype=next(body.parameters()).dtype,
    )  # switches the model to eager attention, as TransformerLens does so that its hooks see the pattern
    names = [f"blocks.{i}.mlp.hook_post" for i in range(len(stage.model.blocks))]

    @torch.inference_mode()
    def step(batch):
        ids, mask, _ = inputs(batch)
        _, cache = bridge.run_with_cache(ids, attention_mask=mask, names_filter=lambda name: name in names)
        n_tokens = torch.as_tensor(batch.n_tokens, device=ids.device)
        return reduce_saved([cache[name] for name in names], n_tokens, sel)

    try:
        yield step
    finally:
        bridge = None  # the wrappers go with it
        undo()
        body.config._attn_implementation = attention
        for block in stage.model.blocks:
            attn = getattr(block, "attn", None) or getattr(block, "self_attn", None) or block.attention
            attn.config._attn_implementation = attention


HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
KWARGS = ("_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs")


def _restorer(model: torch.nn.Module):
    """A function that puts ``model``'s submodules and hooks back as they are now."""
    children = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()]
    hooks = {id(m): {kind: set(getattr(m, kind)) for kind in HOOKS} for m in model.modules()}

    def undo() -> None:
        for parent, name, child in children:
            setattr(parent, name, child)
        for m in model.modules():
            for kind in HOOKS:
                added = set(getattr(m, kind)) - hooks[id(m)][kind]
                for key in added:
                    for table in (kind, *KWARGS):
                        getattr(m, table, {}).pop(key, None)

    return undo


@contextmanager
def nnsight_step(stage, inputs, sel: Selection):
    """A bench step through an nnsight trace of the stage's model."""
    from nnsight import NNsight

    model = NNsight(stage.model)
    fam = stage.model.family
    n_layers = len(stage.model.blocks)

    def neurons(i: int):  # the envoy of block i's MLP output projection
        envoy = getattr(model.body, fam.blocks)[i]
        for name in fam.down.split("."):
            envoy = getattr(envoy, name)
        return envoy

    @torch.inference_mode()
    def step(batch):
        ids, mask, pos = inputs(batch)
        saved = []
        with model.trace(ids, mask, pos):
            for i in range(n_layers):
                saved.append(neurons(i).input.save())
        n_tokens = torch.as_tensor(batch.n_tokens, device=ids.device)
        return reduce_saved(saved, n_tokens, sel)

    yield step
