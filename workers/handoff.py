"""Stage-to-stage hand-off of the hidden state without the object store (``--handoff direct``).

By default (``store``) a stage copies the hidden state it wrote for the next stage to pinned
host memory with its rows, and Ray's object store carries it as numpy: one copy out of the
device, one into plasma, one into pinned memory and one back onto the next device, 64 MB
each at GPT-J's 8,192 tokens a micro-batch. With ``direct`` the tensor stays where it was
written and Ray Direct Transport (RDT) hands it over: CUDA IPC when the two stages share a
GPU (the next stage maps the first one's device memory instead of copying it), NCCL between GPUs
(Ray's collective group, which needs cupy), Gloo between CPU stages (how the tests run this
path on machines without a GPU).

RDT carries a tensor returned by an actor call of one return value, so a stage splits its
work for one micro-batch in two calls: ``scan`` returns the rows (through the object store,
to the aggregator) and leaves the hidden state in the stage's `Outbox`; ``handoff``, in its
own concurrency group, takes it out and returns it. The next stage's ``scan`` gets that
call's reference as its hidden state. A failed ``scan`` leaves its error in the outbox, so
the next stage fails with the same error, as it does when the object store carries it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

GROUP = "handoff"
"""The stages' concurrency group for ``handoff`` calls: they wait for a ``scan`` without taking
one of its threads."""
WAIT_S = 3600.0
"""How long a ``handoff`` waits for its ``scan`` (the driver always sends the ``scan`` first)."""


class Outbox:
    """Hidden states (or the errors that stopped them) waiting for their hand-off, by micro-batch."""

    def __init__(self, wait_s: float = WAIT_S):
        self.wait_s = wait_s
        self.items: dict[int, object] = {}
        self.ready = threading.Condition()

    def put(self, batch_id: int, value) -> None:
        with self.ready:
            self.items[batch_id] = value
            self.ready.notify_all()

    def take(self, batch_id: int):
        """The value put for ``batch_id`` (raised if it is an error), once it is there."""
        with self.ready:
            if not self.ready.wait_for(lambda: batch_id in self.items, timeout=self.wait_s):
                raise TimeoutError(f"no hidden state for micro-batch {batch_id} after {self.wait_s:g} s")
            value = self.items.pop(batch_id)
        if isinstance(value, BaseException):
            raise value
        return value

    def __len__(self) -> int:
        with self.ready:
            return len(self.items)


@dataclass(frozen=True)
class Where:
    """Where a stage actor runs: its node and the GPUs Ray gave it."""

    node: str
    gpus: tuple[str, ...]
    cupy: bool
    """Whether cupy imports there (Ray's NCCL groups need it)."""


def where(actor=None) -> Where:
    """Run inside a stage actor (``actor.__ray_call__.remote(where)``): its `Where`."""
    import importlib.util

    import ray

    context = ray.get_runtime_context()
    gpus = tuple(context.get_accelerator_ids().get("GPU", ()))
    return Where(context.get_node_id(), gpus, importlib.util.find_spec("cupy") is not None)


def transport(device: str, sender: Where, receiver: Where) -> str:
    """The RDT transport from ``sender`` to ``receiver``: Gloo on CPUs, CUDA IPC on one GPU,
    NCCL between GPUs."""
    if device == "cpu":
        return "GLOO"
    if sender.node == receiver.node and sender.gpus and sender.gpus == receiver.gpus:
        return "CUDA_IPC"
    return "NCCL"


def group_backend(transports: list[str]) -> str | None:
    """The collective group a pipeline's stages need for these hand-offs (CUDA IPC needs none)."""
    collective = {t for t in transports if t in ("GLOO", "NCCL")}
    assert len(collective) <= 1, collective  # one device type per run
    return {"GLOO": "torch_gloo", "NCCL": "nccl"}.get(collective.pop()) if collective else None
