"""A stage over T devices: its blocks sharded by DeepSpeed AutoTP, one torch.distributed group a stage.

With ``--tensor-parallel T`` each stage is T processes (Ray actors on one node), ranks 0 ... T-1
of a group of their own: Gloo on CPUs, NCCL on GPUs. ``deepspeed.init_inference`` with
``tensor_parallel={"tp_size": T}`` (AutoTP) cuts every block's linear layers: the MLP's input
projections (and the attention's query, key and value) by output rows, the output projections by
input columns, whose partial results it sums over the group. So rank r holds a contiguous slice
of every layer's neurons and computes their activations itself: what enters its slice of the
MLP's output projection, which `workers.ranks.reduce_ranked` reduces there (`Slice`: where the
rank's neurons start, read from every rank's width: AutoTP cuts every MLP in multiples of 64
neurons, so the slices differ where the ranks do not divide the layer in such multiples:
Llama's 192 neurons of the tiny test model as 128 and 64).

Loading: the stage is built on the meta device and sharded there, so that each parameter has
its rank's shape; then each rank reads from the safetensors files only its own part of every
tensor: the rows or columns its slice holds, where AutoTP cut the tensor (the offset: the widths
of the ranks before it, from every rank's shapes), and the whole of what it keeps whole (the
embedding, the norms, the head, the output projections' biases). Cut tensors are read by
`safetensors`' slices: a rank's host memory holds its share of the blocks, never the whole stage.

AutoTP's sums go through ``deepspeed.comm``, which on CPUs would compile (at run time, with the
machine's C++ compiler) and use a shared-memory all-reduce of its own. That kernel waits for
its peers by spinning on flags in shared memory: a rank that dies leaves the others spinning
for ever, where Gloo's all-reduce fails at once ("connection closed by peer"), so that the run
stops in one line. `join` keeps DeepSpeed on torch.distributed's all-reduce (Gloo on CPUs,
NCCL on GPUs, where the kernel is not used anyway); it also sets ``LOCAL_SIZE`` to the group's
size, without which that kernel, where a DeepSpeed build still loads it, crashes the process.
GPT-2 is refused: AutoTP has no rule for its ``Conv1D`` layers (`Family.tensor_parallel`).
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.util
import io
import logging
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from transformers import PretrainedConfig

from neuroscan.errors import UserError
from workers.checkpoint import read_slices, tensor_files, tensor_headers
from workers.families import d_mlp, family, heads
from workers.footprint import GRAIN
from workers.ranks import GROUP_TIMEOUT_S, Slice
from workers.shard import ShardSpec, StageModel


def check_tensor_parallel(config: PretrainedConfig, size: int) -> None:
    """One line, before anything starts, when ``--tensor-parallel size`` cannot shard this model."""
    if size == 1:
        return
    fam = family(config)
    if not fam.tensor_parallel:
        raise UserError(
            f"--tensor-parallel {size}: DeepSpeed AutoTP does not shard {fam.name} models (it has no rule for "
            "their Conv1D layers): use --tensor-parallel 1 and spread the model with --stages"
        )
    most = min(heads(config), d_mlp(config) // GRAIN)
    if size > most:
        raise UserError(
            f"--tensor-parallel {size} is more ranks than this model can be cut into: AutoTP gives each rank at least "
            f"one of its {heads(config)} attention heads and {GRAIN} of its {d_mlp(config)} neurons a layer; use at most "
            f"--tensor-parallel {most}"
        )
    if importlib.util.find_spec("deepspeed") is None:  # not imported here: it prints what it finds at import
        raise UserError(
            f"--tensor-parallel {size} shards each stage with DeepSpeed, which is not installed: "
            "pip install 'neuroscan[deepspeed]' (or use --tensor-parallel 1)"
        )


def rendezvous() -> str:
    """``host:port`` for a group's ranks to meet at: this machine's address and a port free now
    (asked of rank 0, which listens there)."""
    import ray

    host = ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return f"[{host}]:{s.getsockname()[1]}" if ":" in host else f"{host}:{s.getsockname()[1]}"


def join(address: str, rank: int, size: int, device: str) -> None:
    """Join the stage's group as ``rank`` of ``size``, meeting at ``address`` (`rendezvous`)."""
    host, _, port = address.rpartition(":")
    os.environ.update(
        MASTER_ADDR=host.strip("[]"),
        MASTER_PORT=port,
        RANK=str(rank),
        WORLD_SIZE=str(size),
        # On a GPU Ray shows each rank its one device, as cuda:0; on CPUs the ranks of a group share
        # a node and DeepSpeed's shared-memory all-reduce counts them (see the module's docstring).
        LOCAL_RANK=str(rank if device == "cpu" else 0),
        LOCAL_SIZE=str(size),
        DS_ACCELERATOR=device,
    )
    deepspeed = _deepspeed()
    # torch.distributed's all-reduce: see the module's docstring. (`import deepspeed.comm.torch as`
    # would bind the torch package, which deepspeed.comm imports under that name.)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(
        dist_backend="gloo" if device == "cpu" else "nccl",
        timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S),
        verbose=False,
    )


def _deepspeed():
    """``deepspeed``, imported without its start-up notices (the accelerator it found)."""
    with contextlib.redirect_stdout(io.StringIO()):
        import deepspeed
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    return deepspeed


def shard_blocks(model: StageModel, size: int, dtype: torch.dtype) -> None:
    """Let AutoTP cut ``model``'s blocks for this rank of ``size`` (on the meta device: the
    parameters take their rank's shapes, to be filled by `load_ranked`)."""
    deepspeed = _deepspeed()
    with contextlib.redirect_stdout(io.StringIO()):  # AutoTP prints the layers it found
        engine = deepspeed.init_inference(
            model.body, tensor_parallel={"tp_size": size}, dtype=dtype, replace_with_kernel_inject=False
        )
    model.body = engine.module


def load_ranked(
    path: str, config: PretrainedConfig, shard: ShardSpec, device: torch.device, dtype: torch.dtype
) -> tuple[StageModel, Slice]:
    """This rank's part of the stage, read from ``path`` (see the module's docstring), and
    where its neurons lie in every layer. Every rank of the group calls it together."""
    with init_empty_weights(include_buffers=False):
        model = StageModel(config, shard)
    buffers = dict(model.named_buffers())  # rotary tables, built at init on the CPU: AutoTP empties them
    shard_blocks(model, dist.get_world_size(), dtype)
    names = model.checkpoint_names(set(tensor_files(Path(path))))
    shapes = {ckpt: tuple(model.get_parameter(params[0]).shape) for ckpt, params in names.items()}
    everyone: list[dict] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(everyone, shapes)
    full = {name: shape for name, (shape, _) in tensor_headers(path, list(names)).items()}
    cuts = {name: cut(full[name], [ranks[name] for ranks in everyone], dist.get_rank()) for name in names}
    for ckpt, tensor in read_slices(path, cuts).items():
        first, *tied_to = names[ckpt]
        set_module_tensor_to_device(model, first, device, value=tensor, dtype=dtype)
        for name in tied_to:  # a tied head on the embedding's stage: the same parameter, held once
            module, _, attr = name.rpartition(".")
            setattr(model.get_submodule(module), attr, model.get_parameter(first))
    for name, buf in buffers.items():
        module_name, _, buf_name = name.rpartition(".")
        model.get_submodule(module_name)._buffers[buf_name] = buf.to(device)
    return model.eval(), neuron_slice(model)


def cut(full: tuple[int, ...], shapes: list[tuple[int, ...]], rank: int) -> tuple[slice, ...]:
    """The part of a tensor of shape ``full`` that ``rank`` holds, from every rank's shape of
    it (``shapes``): the whole tensor, or, along the one dimension AutoTP cut, the rank's
    width after those of the ranks before it."""
    whole = tuple(slice(None) for _ in full)
    cut_dims = [d for d in range(len(full)) if shapes[rank][d] != full[d]]
    if not cut_dims:
        return whole
    if len(cut_dims) > 1 or sum(s[cut_dims[0]] for s in shapes) != full[cut_dims[0]]:
        raise UserError(
            f"DeepSpeed AutoTP cut a tensor of shape {list(full)} into {[list(s) for s in shapes]}, not into "
            "contiguous slices of one dimension: this model cannot be loaded rank by rank; use --tensor-parallel 1"
        )
    d = cut_dims[0]
    start = sum(s[d] for s in shapes[:rank])
    return (*whole[:d], slice(start, start + shapes[rank][d]), *whole[d + 1 :])


def neuron_slice(model: StageModel) -> Slice:
    """Where this rank's neurons lie in every layer: its width of the MLP's output projection's
    input, after the widths of the ranks before it."""
    width = model.neurons(model.blocks[0]).weight.shape[1]
    widths: list[int] = [0] * dist.get_world_size()
    dist.all_gather_object(widths, width)
    rank = dist.get_rank()
    return Slice(offset=sum(widths[:rank]), width=width, total=sum(widths))
