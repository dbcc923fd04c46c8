"""A pipeline stage: a shard of the model whose every owned layer's neuron activations are reduced on the device.

`Stage` is a plain class (tested without Ray); Ray runs it as an actor, two calls at a time
on a GPU (`cluster.placement.stage_actor`). Its ``__init__`` only stores the spec; weights
load in `setup`, after Ray has placed the actor and set ``CUDA_VISIBLE_DEVICES``. Per
micro-batch the stage runs its blocks once under scoped hooks (on a GPU each layer's
reduction, Triton kernels from `workers.fused`, is queued on a side stream beside the forward
pass), compacts the kept rows of all its layers on the device (one host sync), and queues one
copy of them, with the hidden state for the next stage, to pinned host memory
(`workers.transfer`).

Two phases. *Launch* holds the stage's lock: inputs to the device (pinned, asynchronous),
the forward pass with each layer's reduction queued on a side stream, predictions or the
hidden state, then device events marking the end of both streams' work. *Collect* does not:
on its own stream (one per calling thread) it waits for those events, compacts the kept rows
(the one host sync, which waits for this micro-batch's work only), queues the host copy,
waits for it and builds the result, which Ray then stores. While one call collects, the
next launches, so the device always has the next micro-batch queued and never idles while
the host compacts, copies or serialises.

With ``--tensor-parallel T`` a stage is T of these, ranks of one group (`workers.autotp`): each
loads its own part of the blocks, every micro-batch goes to all of them and launches in the
order the driver sent it (``turn``), each reduces its own neurons into the whole layer's rows
(`workers.ranks.reduce_ranked`), and rank 0 returns them with the predictions or the hidden
state.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from neuroscan.config import Selection
from neuroscan.errors import UserError
from neuroscan.memory import MemoryWatch, release_free_heap
from neuroscan.messages import Hidden, MicroBatch, StageRows
from workers.checkpoint import load_config
from workers.embedded import embedded_model_dir, embedded_model_path
from workers.families import d_model
from workers.footprint import check_fits, footprint, free_bytes
from workers.fused import available as fused_available
from workers.handoff import Outbox
from workers.ranks import Slice, Turns, reduce_ranked
from workers.reduce import compact, reduce_layer
from workers.shard import ShardSpec, StageModel, load_stage
from workers.split import forward_splitting
from workers.transfer import host_tensor, leaves, start_copy, to_device

TOP_TOKENS = 5
FAULT_OOM_TOKENS = int(os.environ.get("NEUROSCAN_FAULT_OOM_TOKENS", "0"))
"""Testing hook: act as if a micro-batch of more padded tokens than this ran out of memory."""
FAULT_LOAD_S = float(os.environ.get("NEUROSCAN_FAULT_LOAD_S", "0"))
"""Testing hook: take this many seconds longer to load the weights (a large model on a slow disk)."""
FAULT_MEMORY_BYTES = int(os.environ.get("NEUROSCAN_FAULT_MEMORY_BYTES", "0"))
"""Testing hook: act as if the stage's device had this many bytes free."""
FAULT_PERTURB_LAYER = int(os.environ.get("NEUROSCAN_FAULT_PERTURB_LAYER", "-1"))
"""Testing hook: scale this block's MLP input weights by `PERTURB` once loaded (in the stage
that owns it), so that the scan's rows are silently wrong from that layer on (what ``--verify`` catches)."""
PERTURB = 1.5
MEMORY_SETTLE_S = 10.0
"""How long a stage that does not fit waits for memory to be freed before it says so."""


def node_name() -> str:
    """This machine's host name, with its Ray node's id in a Ray worker (one machine can run
    several Ray nodes)."""
    import ray

    if not ray.is_initialized():
        return socket.gethostname()
    return f"{socket.gethostname()} (Ray node {ray.get_runtime_context().get_node_id()[:8]})"


def model_here(path: str) -> None:
    """The driver resolved the model's path on its own machine; a stage on another node of a
    cluster reads the same path there. The embedded model is built where it is missing (the
    same bytes from the same seed); any other model must already be there. A directory without
    its config.json counts as missing: a shared file system not mounted on that node leaves
    the empty mount point."""
    if (Path(path) / "config.json").is_file():
        return
    if Path(path) == embedded_model_path():
        embedded_model_dir()
        return
    raise UserError(
        f"the model is not at {path} on node {node_name()}: every node of the Ray cluster reads it from the "
        "path it has on the driver's machine; put it there on each node (the same `hf download`, or a shared file system)"
    )


@dataclass(frozen=True)
class StageSpec:
    model_path: str
    shard: ShardSpec
    device: str
    """"cpu" or "cuda" (the GPU Ray assigned)."""
    dtype: str
    """A resolved torch dtype name: float32, float16 or bfloat16."""
    threads: int = 0
    """torch intra-op threads on CPU; 0 leaves torch's default."""
    keep_hidden: bool = False
    """Leave the hidden state for the next stage on the device, for a direct hand-off
    (`workers.handoff`), instead of copying it to host memory with the rows."""
    ranks: int = 1
    """Processes the stage's blocks are sharded over (``--tensor-parallel``, `workers.autotp`)."""
    rank: int = 0
    """This process's rank among them: rank 0 returns the stage's rows, predictions and hidden
    state; the others return None for both."""


@contextmanager
def reducing_hooks(
    model: StageModel,
    n_tokens: torch.Tensor,
    sel: Selection,
    sink: list,
    fused: bool = False,
    stream: torch.cuda.Stream | None = None,
    part: Slice | None = None,
) -> Iterator[None]:
    """Reduce every owned block's neuron activations (what enters its MLP's output projection,
    `StageModel.neurons`) into ``sink`` while the context is open. In a gated MLP the up
    projection's output is held from its forward until the reduction, which reads it at each
    kept neuron's extremes.

    With ``stream`` (CUDA), each layer's reduction is queued on that side stream after the
    activations are written, so its small kernels run beside the next matmuls instead of
    between them; the activations are kept from reuse until the side stream has read them.
    With ``part`` (a tensor-parallel rank's neurons), the reduction is `reduce_ranked`'s, with
    the group's other ranks.
    """
    ups: dict[int, torch.Tensor] = {}

    def layer(act: torch.Tensor, up: torch.Tensor | None) -> dict[str, torch.Tensor]:
        if part is None:
            return reduce_layer(act, n_tokens, sel, fused, up)
        return reduce_ranked(act, n_tokens, sel, part, fused, up)

    def reduce(act: torch.Tensor, up: torch.Tensor | None) -> None:
        if stream is None:
            sink.append(layer(act, up))
            return
        stream.wait_stream(torch.cuda.current_stream(act.device))  # a device-side wait, not a host sync
        with torch.cuda.stream(stream):
            sink.append(layer(act, up))
        for tensor in (act, up):
            if tensor is not None:
                tensor.record_stream(stream)

    handles = []
    for i, block in enumerate(model.blocks):
        if model.family.up:
            keep_up = block.get_submodule(model.family.up).register_forward_hook(
                lambda module, inputs, output, i=i: ups.__setitem__(i, output)
            )
            handles.append(keep_up)
        hook = model.neurons(block).register_forward_pre_hook(
            lambda module, inputs, i=i: reduce(inputs[0], ups.pop(i, None))
        )
        handles.append(hook)
    try:
        yield
    finally:
        ups.clear()
        for handle in handles:
            handle.remove()


@dataclass
class Launched:
    """A micro-batch whose device work is queued: what collecting it needs."""

    layers: list[dict[str, torch.Tensor]]
    """Every layer's reduction (written on the side stream, if there is one)."""
    outputs: dict
    """{"predictions": ...} (last stage) or {"hidden": {"data": h}} (written on the main stream)."""
    ready: list
    """CUDA events after which all of the above is written (none on a CPU)."""


class Stage:
    def __init__(self, spec: StageSpec):
        self.spec = spec
        self.model = None
        self.watch = MemoryWatch()
        self.lock = threading.Lock()  # one launch at a time: the hooks and the side stream are shared
        self.streams = threading.local()  # each calling thread collects on its own stream
        self.outbox = Outbox()  # hidden states waiting for their direct hand-off
        self.part: Slice | None = None  # a tensor-parallel rank's neurons
        self.turns = Turns()  # a tensor-parallel rank's micro-batches, in the driver's order
        self.lock_break = threading.Lock()
        # A tensor-parallel rank takes every call at once (they wait for their turn): as many
        # micro-batches are on its device at a time as a stage of one rank has.
        self.slots = threading.Semaphore(2 if spec.device == "cuda" else 1)

    def rendezvous(self) -> str:
        """Where the ranks of a tensor-parallel stage meet (asked of rank 0): `workers.autotp.rendezvous`."""
        from workers.autotp import rendezvous

        return rendezvous()

    def setup(self, address: str | None = None) -> dict:
        """Load this stage's weights on its device; returns what was loaded. Before anything
        loads, what the stage needs (`workers.footprint`) is checked against what the device
        has free: one line if it does not fit. A rank of a tensor-parallel stage first joins
        its group at ``address`` (`rendezvous`), then reads its own part of the weights."""
        if self.spec.threads:
            torch.set_num_threads(self.spec.threads)
        model_here(self.spec.model_path)
        time.sleep(FAULT_LOAD_S)
        config = load_config(self.spec.model_path)
        self.device = torch.device(self.spec.device)
        self.fused = fused_available(self.device)  # one Triton pass on a GPU, the eager reference elsewhere
        # On a GPU the reductions run on a side stream, beside the forward pass (bench turns it off
        # to measure the difference).
        # A tensor-parallel rank reduces on the forward pass's own stream: its gathers then follow
        # AutoTP's all-reduces in one order on one stream (two NCCL communicators with kernels on two
        # streams at once may deadlock).
        side = self.device.type == "cuda" and self.spec.ranks == 1
        self.reduce_stream = torch.cuda.Stream(self.device) if side else None
        dtype = getattr(torch, self.spec.dtype)
        need = footprint(self.spec.model_path, config, self.spec.shard, dtype, self.device.type, self.spec.ranks)
        where = self.device if self.device.type == "cpu" else torch.device("cuda", torch.cuda.current_device())
        free = FAULT_MEMORY_BYTES or free_bytes(self.device)
        settled = time.monotonic() + MEMORY_SETTLE_S
        while need.total > free and not FAULT_MEMORY_BYTES and time.monotonic() < settled:
            time.sleep(0.5)  # a process just gone (this actor before Ray restarted it) may still be freeing
            free = free_bytes(self.device)
        check_fits(need, free, self.spec.shard, self.spec.dtype, f"{where} of {node_name()}", self.device.type)
        if self.spec.ranks > 1:
            from workers.autotp import join, load_ranked

            join(address, self.spec.rank, self.spec.ranks, self.device.type)
            self.model, self.part = load_ranked(self.spec.model_path, config, self.spec.shard, self.device, dtype)
        else:
            self.model = load_stage(self.spec.model_path, config, self.spec.shard, self.device, dtype)
        if self.spec.shard.start <= FAULT_PERTURB_LAYER < self.spec.shard.stop:
            block = self.model.blocks[FAULT_PERTURB_LAYER - self.spec.shard.start]
            for name in self.model.family.mlp_in:
                block.get_submodule(name).weight.data.mul_(PERTURB)
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters() if p.device.type != "meta")
        if self.device.type == "cuda":
            self._warm_up(d_model(config))
        return {
            "layers": (self.spec.shard.start, self.spec.shard.stop),
            "rank": (self.spec.rank, self.spec.ranks),
            "weight_bytes": weights,
            "device": str(self.device),
            "reduction": "fused" if self.fused else "eager",
        }

    def _warm_up(self, d_model: int) -> None:  # with the lock held (or before any call)
        """Three small forwards, so that kernel compilation (Triton, cuBLAS handles) happens at
        set-up and not inside the first micro-batches. Triton compiles a kernel again for an
        integer argument that is or is not a multiple of 16: the rows kernel's band bytes a row,
        a quarter of the tokens (16 tokens make 4 bytes, 64 make 16, 17 make 5)."""
        for n in (16, 64, 17):
            batch = MicroBatch(
                -1,
                np.zeros(1, np.int64),
                np.zeros((1, n), np.int32),
                np.array([n], np.int32),
                np.array([n], np.int32),
                np.zeros((1, 0), np.int32),
            )
            hidden = (
                None
                if self.spec.shard.first
                else Hidden(np.zeros((1, n, d_model), _host_dtype(self.spec.dtype)), self.spec.dtype)
            )
            self._collect(batch, self._launch(batch, hidden))

    def memory(self) -> dict[str, float]:
        return self.watch.report()

    def forward(
        self, batch: MicroBatch, hidden: Hidden | list | None = None, turn: int | None = None
    ) -> tuple[Hidden | None, StageRows | None]:
        """Run one micro-batch; out of memory, its halves are run and merged (`workers.split`).
        Safe to call from two threads: launches take turns, collecting overlaps.

        A rank of a tensor-parallel stage runs the micro-batches in the order of ``turn``
        (`workers.ranks.Turns`), gets the hidden state as ``[its Ray reference]``, read once the
        turn is its own (a previous stage that failed then costs the turn, not a wait), and
        returns (None, None) unless it is rank 0. Out of memory is not split there (every rank
        would have to split alike). Any failure ends the group: this rank leaves it, so that the
        others' next collective fails (at once over Gloo; NCCL waits for its timeout), and every
        call from then on raises the same one line."""
        if self.spec.ranks == 1:
            return forward_splitting(self._forward, batch, hidden)
        try:
            self.turns.take(turn)
        except TimeoutError as err:
            raise UserError(self._break(err)) from None
        try:
            hidden = _resolved(hidden)
        except Exception:
            self.turns.pass_on()  # the previous stage failed: no rank of the group runs this one
            raise
        try:
            with self.slots:
                return self._forward(batch, hidden, ranked=True)
        except Exception as err:
            raise UserError(self._break(err)) from None

    def _break(self, err: BaseException) -> str:
        """End this rank's tensor-parallel group after ``err`` (once); the line every call raises."""
        import torch.distributed as dist

        with self.lock_break:
            if self.turns.broken is None and dist.is_initialized():
                dist.destroy_process_group()
            shard = self.spec.shard
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
            return self.turns.fail(
                f"rank {self.spec.rank} of the tensor-parallel stage of layers {shard.start}-{shard.stop - 1} failed "
                f"({reason}): its group of {self.spec.ranks} cannot go on; committed parts are kept: fix the cause, "
                "then rerun the same command with --resume"
            )

    def scan(self, batch: MicroBatch, hidden=None) -> StageRows:
        """`forward` for a direct hand-off (`workers.handoff`): returns the rows and leaves the
        hidden state (or the error that stopped it) for `handoff`. ``hidden`` is the previous
        stage's tensor as Ray handed it over."""
        if hidden is not None and not isinstance(hidden, Hidden):
            hidden = Hidden(hidden, self.spec.dtype)
        try:
            out, rows = self.forward(batch, hidden)
        except BaseException as err:
            if not self.spec.shard.last:
                self.outbox.put((batch.job, batch.batch_id), err)
            raise
        if out is not None:
            self.outbox.put((batch.job, batch.batch_id), out.data)
        return rows

    def handoff(self, key: tuple[str, int]):
        """The hidden state `scan` left for micro-batch ``key`` ((scan, batch id): a tensor on
        this stage's device)."""
        return self.outbox.take(key)

    def _forward(
        self, batch: MicroBatch, hidden: Hidden | None, ranked: bool = False
    ) -> tuple[Hidden | None, StageRows]:
        if (
            self.model is not None
            and self.device.type == "cuda"
            and hidden is not None
            and isinstance(hidden.data, np.ndarray)
        ):
            # The host copy into pinned memory (64 MB at GPT-J's 8,192 tokens) before taking the
            # lock, so the other call's launch does not wait for it.
            hidden = Hidden(host_tensor(hidden.data, pin=True), hidden.dtype)
        with self.lock:
            if self.model is None:  # Ray restarted this actor: load the weights again
                self.setup()
            launched = self._launch(batch, hidden)
            if ranked:  # its collectives are queued: the next micro-batch may launch
                self.turns.pass_on()
        return self._collect(batch, launched)

    @torch.inference_mode()
    def _launch(self, batch: MicroBatch, hidden: Hidden | None) -> Launched:
        """Queue the micro-batch's forward pass and reductions (see the module's docstring)."""
        if FAULT_OOM_TOKENS and batch.input_ids.size > FAULT_OOM_TOKENS:
            raise torch.OutOfMemoryError(f"injected: {batch.input_ids.size} tokens > {FAULT_OOM_TOKENS}")
        shard, dev = self.spec.shard, self.device
        b, t = batch.input_ids.shape
        n_tokens = to_device(batch.n_tokens, dev)
        position_ids = torch.arange(t, device=dev)[None, :].expand(b, t)
        x = to_device(batch.input_ids, dev).long() if shard.first else _from_host(hidden, dev)

        layers: list[dict[str, torch.Tensor]] = []
        side = self.reduce_stream
        with reducing_hooks(self.model, n_tokens, batch.selection, layers, self.fused, side, self.part):
            # No attention mask: padding only ever follows a prompt's tokens (and its answer's),
            # so the causal mask alone keeps every real token from seeing it, and the rows never
            # read a padded position. (With a mask transformers checks it on the host, a sync,
            # and SDPA leaves its flash kernel.)
            h = self.model(x, None, position_ids)  # [batch, pos, d_model]
        if self.spec.rank > 0:  # rank 0 answers for the group
            outputs = {}
        else:
            outputs = {"predictions": self._predict(h, batch)} if shard.last else {"hidden": {"data": h}}
        ready = []
        if dev.type == "cuda":
            if side is not None:
                n_tokens.record_stream(side)  # read by the side stream's kernels, maybe after this returns
            for stream in (side, torch.cuda.current_stream(dev)):
                if stream is not None:
                    ready.append(torch.cuda.Event())
                    ready[-1].record(stream)
        return Launched(layers, outputs, ready)

    @torch.inference_mode()
    def _collect(self, batch: MicroBatch, launched: Launched) -> tuple[Hidden | None, StageRows]:
        """Compact and copy the launched micro-batch on this thread's stream, wait for the copy,
        and wrap it for the next stage and the aggregator."""
        shard = self.spec.shard
        on_stream = nullcontext()
        if self.device.type == "cuda":
            tail = self._collect_stream()
            for event in launched.ready:
                tail.wait_event(event)
            for tensor in [*(t for layer in launched.layers for t in layer.values()), *leaves(launched.outputs)]:
                tensor.record_stream(tail)  # written on other streams, read here: not to be reused before
            on_stream = torch.cuda.stream(tail)
        if self.spec.rank > 0:  # rank 0 answers for the group
            for event in launched.ready:
                event.synchronize()
            del launched
            if self.device.type == "cpu":
                release_free_heap()
            self.watch.sample()
            return None, None
        kept = launched.outputs.pop("hidden") if self.spec.keep_hidden and not shard.last else None
        with on_stream:
            rows, per_prompt = compact(launched.layers)  # nonzero: on a GPU, waits for this micro-batch only
            transfer = start_copy({"rows": rows, "per_prompt": per_prompt, **launched.outputs})
        del launched, rows, per_prompt
        host = transfer.wait()  # after this micro-batch's device work: a kept hidden state is written too
        del transfer
        out_hidden = None if shard.last else Hidden((kept or host["hidden"])["data"], self.spec.dtype)
        if self.device.type == "cpu":
            release_free_heap()
        self.watch.sample()
        return out_hidden, StageRows(
            batch_id=batch.batch_id,
            start=shard.start,
            rows=host["rows"],
            per_prompt=host["per_prompt"],
            predictions=host.get("predictions"),
        )

    def _collect_stream(self) -> torch.cuda.Stream:
        stream = getattr(self.streams, "collect", None)
        if stream is None:
            stream = self.streams.collect = torch.cuda.Stream(self.device)
        return stream

    def _predict(self, h: torch.Tensor, batch: MicroBatch) -> dict[str, torch.Tensor]:
        """Top tokens after each prompt and whether its expected answer is the greedy continuation.

        The answer tokens follow the prompt in the batch, so the logits at positions
        n_tokens - 1 ... n_tokens + len(answer) - 2 predict them one by one (teacher forcing).
        """
        dev = h.device
        answers = to_device(batch.answer_ids, dev).long()  # [batch, answer]
        steps = max(answers.shape[1], 1)
        last = to_device(batch.n_tokens, dev).long() - 1  # [batch]
        at = (last[:, None] + torch.arange(steps, device=dev)).clamp(max=h.shape[1] - 1)  # [batch, steps]
        picked = h.gather(1, at[:, :, None].expand(-1, -1, h.shape[2]))  # [batch, steps, d_model]
        logits = self.model.lm_head(picked).float()  # [batch, steps, vocab]
        top_probs, top_ids = logits[:, 0].softmax(-1).topk(TOP_TOKENS, dim=-1)
        if answers.shape[1]:
            hit = (logits.argmax(-1) == answers) | (answers < 0)
            correct = torch.where(answers[:, 0] >= 0, hit.all(dim=1).to(torch.int8), -1)
        else:
            correct = torch.full((h.shape[0],), -1, dtype=torch.int8, device=dev)
        return {"top_ids": top_ids.to(torch.int32), "top_probs": top_probs, "correct": correct.to(torch.int8)}


def _resolved(hidden):
    """A tensor-parallel rank's hidden state: ``[a Ray reference]`` (or ``[None]`` on the first
    stage) read now."""
    if not isinstance(hidden, list):
        return hidden
    import ray

    return None if hidden[0] is None else ray.get(hidden[0])


def _host_dtype(dtype: str) -> type:
    return {"float32": np.float32, "float16": np.float16, "bfloat16": np.int16}[dtype]


def _from_host(hidden: Hidden, device: torch.device) -> torch.Tensor:
    """The hidden state on ``device``: from numpy or pinned memory (bfloat16 as its int16 bits),
    or a tensor handed over directly (already on its device, in its own dtype)."""
    x = to_device(hidden.data, device)
    return x.view(torch.bfloat16) if hidden.dtype == "bfloat16" and x.dtype == torch.int16 else x
