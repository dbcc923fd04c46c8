"""Model checkpoints written in code: the embedded tiny GPT-J, a tiny model of every other
family, and the shapes of the models a GPU benchmark scans (GPT-J-6B, Pythia-6.9B, Llama-3-8B,
GPT-2 XL).

No machine here reaches the Hugging Face hub, so neuroscan builds its own checkpoints, with
its families' own transformers classes and random weights, and writes them in the standard layout (config.json, safetensors shards
with an index, tokenizer files). They are then loaded by exactly the code that loads a real
checkpoint (`workers.checkpoint`). Tensors are generated and written shard by shard, so the
large presets never hold the whole model in memory.

The embedded model has GPT-J's depth (28 blocks) at a tiny width. Its MLP input rows (every
family's) are scaled per neuron (pre-activation std drawn log-uniformly from 0.5 to 3) so ordinary text
produces all four bands: some neurons rarely leave grey, others go red on many tokens.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import zlib
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from transformers import PretrainedConfig

from neuroscan.config import MODEL_PRESETS, cache_dir
from neuroscan.errors import UserError
from workers.families import FAMILIES, Family, family, tensor_shapes, tied
from workers.tokenizer import byte_tokenizer

EMBEDDED_PRESET = "tiny"
EMBEDDED_SEED = 0
EMBEDDED_VERSION = 1
"""Bump when the embedded model's recipe changes, so cached copies are rebuilt."""
SHARD_BYTES = 2 << 30
BOS_FAMILIES = ("llama", "mistral")
"""Families whose released tokenizers put a BOS token before every text: so do their random checkpoints'."""


def preset_config(preset: str, **overrides) -> PretrainedConfig:
    """The config of a `neuroscan.config.MODEL_PRESETS` shape, as its family's config class."""
    fields = {**MODEL_PRESETS[preset], **overrides}
    fam = FAMILIES[fields.pop("model_type")]
    config = fam.module("config")(**fields)
    config.architectures = [fam.causal_lm]
    return config


def embedded_model_path() -> Path:
    """Where the embedded model is (or will be) on this machine."""
    return cache_dir() / "models" / f"{EMBEDDED_PRESET}-v{EMBEDDED_VERSION}-seed{EMBEDDED_SEED}"


def embedded_model_dir() -> Path:
    """The embedded model's directory, written on first use (atomically) under the cache."""
    path = embedded_model_path()
    if not (path / "config.json").exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=".building-"))
        try:
            write_checkpoint(
                preset_config(EMBEDDED_PRESET),
                staging,
                seed=EMBEDDED_SEED,
                named=path,
                fix="free space there, or set NEUROSCAN_CACHE to a place with room",
            )
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        try:
            staging.rename(path)
        except OSError:  # another process finished first; theirs is identical
            shutil.rmtree(staging, ignore_errors=True)
    return path


def write_checkpoint(
    config: PretrainedConfig,
    out: Path,
    seed: int = 0,
    shard_bytes: int = SHARD_BYTES,
    device: str = "cpu",
    *,
    named: Path | None = None,
    fix: str = "free space or choose another place, then run it again",
) -> Path:
    """Write a random checkpoint of ``config``'s family in Hugging Face layout; returns ``out``.

    Each tensor is drawn from its own generator (seeded by name), so a tensor's values do not
    depend on the shard size. At most one shard is in memory at a time. ``device`` draws the
    numbers there (a CUDA generator gives other values than the CPU's for the same seed). A
    write that fails (a full disk, Ctrl-C) removes the files it wrote, so no half checkpoint
    is loaded later; a full disk stops with one line naming ``named`` (default ``out``) and ``fix``.
    """
    out = Path(out)
    before = set(out.iterdir()) if out.is_dir() else set()
    try:
        return _write_checkpoint(config, out, seed, shard_bytes, device)
    except BaseException as err:
        for path in (set(out.iterdir()) - before) if out.is_dir() else ():
            path.unlink()
        if not isinstance(err, (OSError, SafetensorError)):
            raise
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err).rpartition("I/O error: ")[2]
        dtype = getattr(torch, str(config.dtype or "float32").removeprefix("torch."))
        size = sum(math.prod(shape) for shape in _tensor_shapes(config).values()) * dtype.itemsize
        raise UserError(
            f"writing a checkpoint to {named or out} failed ({reason}): it needs {size / 2**30:.2f} GiB; {fix}"
        ) from None


def _write_checkpoint(config: PretrainedConfig, out: Path, seed: int, shard_bytes: int, device: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, str(config.dtype or "float32").removeprefix("torch."))
    shards: list[list[str]] = []  # tensor names, one list a shard
    shard: dict[str, torch.Tensor] = {}
    filled = total = 0

    def flush() -> None:
        save_file(shard, str(out / f"part-{len(shards)}.safetensors"), metadata={"format": "pt"})
        shards.append(list(shard))
        shard.clear()

    fam = family(config)
    for key, shape in _tensor_shapes(config).items():
        tensor = _random_tensor(key, shape, seed, device, fam).to(dtype).cpu()
        nbytes = tensor.numel() * tensor.element_size()
        if shard and filled + nbytes > shard_bytes:
            flush()
            filled = 0
        shard[key] = tensor
        filled += nbytes
        total += nbytes
    flush()
    if len(shards) == 1:
        os.replace(out / "part-0.safetensors", out / "model.safetensors")
    else:  # Hugging Face names shards model-0000i-of-0000n.safetensors, listed in an index
        weight_map = {}
        for i, keys in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            os.replace(out / f"part-{i}.safetensors", out / name)
            weight_map |= dict.fromkeys(keys, name)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    config.save_pretrained(out)
    byte_tokenizer(bos=fam.model_type in BOS_FAMILIES).save_pretrained(out)
    return out


def _tensor_shapes(config: PretrainedConfig) -> dict[str, tuple[int, ...]]:
    """The checkpoint's tensors: the head only where it is not tied to the embedding."""
    return tensor_shapes(config, head=not tied(config))


def _random_tensor(
    key: str, shape: tuple[int, ...], seed: int, device: str = "cpu", fam: Family = FAMILIES["gptj"]
) -> torch.Tensor:
    """One tensor, drawn from its own generator. Norm weights are ones and biases zeros
    (except the MLP input's), the token embedding has unit variance, and each neuron's MLP
    input weights are scaled so its pre-activation's std is drawn log-uniformly from 0.5 to 3:
    with the norm's unit-variance output, a row's norm is that std. The rest is N(0, 0.02)."""
    gen = torch.Generator(device).manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))

    def randn(*size):
        return torch.randn(size, generator=gen, device=device)

    module = key.rsplit(".", 1)[0]
    mlp_in = any(module.endswith("." + name) for name in fam.mlp_in)
    if len(shape) == 1 and key.endswith(".weight") and ("norm" in key or ".ln_" in key):
        return torch.ones(shape, device=device)
    if key.endswith(".bias"):
        return randn(*shape) * 0.5 - 0.25 if mlp_in else torch.zeros(shape, device=device)
    if fam.up and module.endswith("." + fam.up):  # a gated MLP's second input: unit variance
        return randn(*shape) / math.sqrt(shape[1])
    if mlp_in:
        # the norm's output has unit variance per element, so a neuron's weight norm = its pre-activation std
        inner, d = shape[::-1] if fam.conv1d else shape
        std = torch.exp(torch.empty(inner, 1, device=device).uniform_(math.log(0.5), math.log(3.0), generator=gen))
        weight = randn(inner, d) * (std / math.sqrt(d))
        return weight.T.contiguous() if fam.conv1d else weight
    if key.endswith(f"{fam.embed}.weight"):
        return randn(*shape)
    return randn(*shape) * 0.02
