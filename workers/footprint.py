"""What a stage will hold on its device, known before it loads, and the check that it fits.

The weights are counted from the safetensors headers (each tensor's shape and dtype) of exactly
the tensors the stage owns (`StageModel.checkpoint_names`, built on the meta device), at the
stage's dtype; no tensor's bytes are read. To them are added the stage's buffers (the rotary
table), and on a CPU the tensors read at another dtype than the stage's: `load_stage` holds
every tensor as read until all are converted. On a GPU those copies are in host memory.

The working set is an allowance for one prompt as long as the model's context
(its context, `workers.families.context`): a micro-batch that does not fit is split in halves down to one prompt
(`workers.split`), so this is the room a stage needs to scan any prompt, whatever
``--batch-tokens`` (a setting of each scan, not of the stages, which a service shares between
scans). Per token it is ``(3 x d_mlp + 8 x d_model) x`` the dtype's bytes: the MLP's input
projection, its GELU and one temporary of the reduction at once (``d_mlp`` each; a gated MLP
adds its second projection, 4 x), and the
residual stream and its layer norm, the attention's query, key, value and output, and the
hidden states in and out (``d_model`` each). Attention's scores are not held: PyTorch's SDPA,
which every family runs here, computes them in blocks (an eager attention would hold
``heads x tokens^2`` of them). Not counted: the allocator's slack, CUDA's
workspaces and compiled kernels, and other stages loading on the same device at the same time
(each sees the memory free when it checks).

A rank of a tensor-parallel stage (``ranks`` > 1, `workers.autotp`) holds its share of the
blocks' matrices and of the MLP's working set, and the whole of the rest (the embedding, the
head, the norms, the residual stream). AutoTP cuts the MLP in multiples of 64 neurons (`GRAIN`),
so the first ranks may hold more than an even share of it: each is counted at the largest. With
key-value heads that the ranks do not divide, AutoTP gives the ranks unequal numbers of heads;
each is then counted with the whole attention (more than any holds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from transformers import PretrainedConfig

from neuroscan.errors import UserError
from workers.checkpoint import tensor_files, tensor_headers
from workers.families import context, d_mlp, d_model, kv_heads
from workers.shard import ShardSpec, StageModel

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
"""The stage's dtypes as a safetensors header names them."""
ITEM_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}
"""Bytes of one element of each safetensors dtype; the rest (8-bit types, BOOL) take one."""


@dataclass(frozen=True)
class Footprint:
    """Bytes a stage needs on its device, by what holds them."""

    weights: int
    """The stage's own tensors at its dtype (what `load_stage` materialises as parameters)."""
    buffers: int
    """The stage's buffers (the rotary table), as built."""
    reading: int
    """On a CPU, the tensors read at another dtype than the stage's, held while the load lasts; 0 on a GPU."""
    working: int
    """A micro-batch of one ``tokens``-long prompt on the way through the stage's blocks."""
    tokens: int
    """The prompt length the working set allows for: the model's context."""

    @property
    def total(self) -> int:
        return self.weights + self.buffers + self.reading + self.working


def footprint(
    path: str, config: PretrainedConfig, shard: ShardSpec, dtype: torch.dtype, device: str, ranks: int = 1
) -> Footprint:
    """What the stage of ``shard`` of the checkpoint at ``path`` needs on ``device`` ("cpu" or
    "cuda") at ``dtype``, from the checkpoint's headers and config alone; with ``ranks``, what
    one of that many tensor-parallel ranks needs."""
    with init_empty_weights(include_buffers=False):
        model = StageModel(config, shard)
    names = model.checkpoint_names(set(tensor_files(Path(path))))
    headers = tensor_headers(path, list(names))
    size = torch.finfo(dtype).bits // 8
    weights = reading = 0
    blocks = f".{model.family.blocks}."
    even_heads = kv_heads(config) % ranks == 0
    for name, (shape, stored) in headers.items():
        n = math.prod(shape)
        if ranks > 1 and blocks in f".{name}" and len(shape) == 2:  # a block's matrix: cut over the ranks
            if d_mlp(config) in shape:  # the MLP's, cut in multiples of GRAIN
                n = n * largest_share(d_mlp(config), ranks) // d_mlp(config)
            elif even_heads:  # the attention's, by heads (or held whole by the first rank)
                n = -(-n // ranks)
        weights += n * size  # a tied head on the embedding's stage is the same parameter
        if device == "cpu" and stored != SAFETENSORS_DTYPES.get(dtype):
            reading += n * ITEM_BYTES.get(stored, 1)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    tokens = context(config)
    mlp = 4 if model.family.up else 3  # a gated MLP holds its gate, its up and their product
    working = tokens * (mlp * largest_share(d_mlp(config), ranks) + 8 * d_model(config)) * size
    return Footprint(weights, buffers, reading, working, tokens)


GRAIN = 64


def largest_share(width: int, ranks: int) -> int:
    """The most of ``width`` rows any of ``ranks`` holds when cut in multiples of `GRAIN`."""
    if ranks == 1:
        return width
    return min(width, -(-width // (ranks * GRAIN)) * GRAIN)


def free_bytes(device: torch.device) -> int:
    """What ``device`` has free now: on CUDA the driver's free memory, on a CPU the kernel's
    MemAvailable (what can be allocated without swapping, page cache included)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # kB
    raise OSError("/proc/meminfo has no MemAvailable")


def check_fits(need: Footprint, free: int, shard: ShardSpec, dtype: str, where: str, device: str) -> None:
    """Stop with one line unless ``need`` fits in ``free`` bytes. ``where``: the device and its
    node as the user should read them; ``device``: "cpu" or "cuda"; ``dtype``: the stage's."""
    if need.total <= free:
        return
    uses = []
    if device == "cuda" and shard.stop - shard.start > 1:  # on CPUs the stages of a node share its memory
        uses.append("more --stages")
    if dtype == "float32":
        uses.append("a 16-bit --dtype (bfloat16 or float16)")
    free_it = "free the GPU" if device == "cuda" else "free memory on that node"
    fixes = f"use {' or '.join(uses)}, or {free_it}" if uses else free_it
    reading = f" and {_size(need.reading)} more while they load" if need.reading else ""
    raise UserError(
        f"the stage of layers {shard.start}-{shard.stop - 1} (of {shard.n_layers}) needs {_size(need.total)} "
        f"on {where} but {_size(free)} is free ({_size(need.weights + need.buffers)} of weights at {dtype}{reading}, "
        f"{_size(need.working)} to run a {need.tokens:,}-token prompt): {fixes}"
    )


def _size(n: int) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.1f} GiB"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n:,} bytes"
