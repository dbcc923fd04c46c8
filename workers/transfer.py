"""Device -> host: everything a stage returns for a micro-batch in one pinned, asynchronous copy
(and `to_device`, the way in: through pinned memory, asynchronously).

`start_copy` queues the copy and returns at once; `Transfer.wait` blocks (without the GIL)
until it has landed and gives the numpy arrays. A stage starts the next micro-batch's
forward pass in between, so the copy overlaps the next batch's compute.

The tensors (kept rows, per-prompt statistics, predictions or the hidden state) are packed
into one device byte buffer at 16-byte aligned offsets, copied on a side stream into pinned
host memory, and read back as numpy views of that one buffer. Pinned blocks come from
torch's caching host allocator: a block is reused for a later micro-batch once nothing
refers to the arrays of the earlier one, so the pool cannot overwrite rows still in use.
On a CPU the tensors are already on the host and are returned as they are.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import torch

ALIGN = 16


def layout(tensors: list[torch.Tensor]) -> tuple[list[int], int]:
    """Byte offsets of ``tensors`` packed back to back at ``ALIGN``-byte boundaries, and the total."""
    offsets, total = [], 0
    for t in tensors:
        offsets.append(total)
        total += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
    return offsets, total


def pack(tensors: list[torch.Tensor], offsets: list[int], total: int) -> torch.Tensor:
    """One uint8 buffer on the tensors' device holding each tensor's bytes at its offset."""
    device = tensors[0].device if tensors else torch.device("cpu")
    buf = torch.empty(max(total, ALIGN), dtype=torch.uint8, device=device)
    for t, o in zip(tensors, offsets):
        n = t.numel() * t.element_size()
        if n:
            buf[o : o + n].view(t.dtype).copy_(t.reshape(-1))
    return buf


def unpack(buf: torch.Tensor, like: list[torch.Tensor], offsets: list[int]) -> list[np.ndarray]:
    """Numpy views of ``buf`` shaped and typed like ``like`` (bfloat16 as its int16 bits)."""
    out = []
    for t, o in zip(like, offsets):
        n = t.numel() * t.element_size()
        view = buf[o : o + n].view(t.dtype).view(t.shape)
        out.append(view.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else view.numpy())
    return out


@functools.cache
def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device=device)


class Transfer:
    """A queued device -> host copy of a nested dict of tensors."""

    def __init__(self, tree: dict, host: torch.Tensor | None = None, done: torch.cuda.Event | None = None, offsets=()):
        self.tree, self.host, self.done, self.offsets = tree, host, done, offsets

    def wait(self) -> dict:
        """The same dict of numpy arrays, once the copy has landed (views of one pinned buffer)."""
        if self.done is None:  # already on the host
            return _map(self.tree, lambda t: _numpy(t.contiguous()))
        self.done.synchronize()  # releases the GIL: another thread may launch work meanwhile
        arrays = iter(unpack(self.host, list(leaves(self.tree)), self.offsets))
        return _map(self.tree, lambda _: next(arrays))


def start_copy(tree: dict) -> Transfer:
    """Pack ``tree``'s device tensors into one buffer and queue its copy to pinned host memory
    on a side stream, after everything queued so far on the current stream."""
    tensors = list(leaves(tree))
    if not any(t.is_cuda for t in tensors):
        return Transfer(tree)
    offsets, total = layout(tensors)
    staging = pack(tensors, offsets, total)
    host = torch.empty(staging.numel(), dtype=torch.uint8, pin_memory=True)
    stream = _copy_stream(staging.device)
    stream.wait_stream(torch.cuda.current_stream(staging.device))  # the rows are written
    with torch.cuda.stream(stream):
        host.copy_(staging, non_blocking=True)
        done = torch.cuda.Event()
        done.record(stream)
    staging.record_stream(stream)  # the allocator must not hand it out before the copy ends
    return Transfer(tree, host, done, offsets)


def to_host(tree: dict) -> dict:
    """A nested dict of device tensors -> the same dict of numpy arrays (one copy, one wait)."""
    return start_copy(tree).wait()


def host_tensor(array: np.ndarray, pin: bool = False) -> torch.Tensor:
    """A numpy array as a torch tensor (shared memory), or copied to pinned memory with ``pin``."""
    with warnings.catch_warnings():  # object-store arrays are read-only; nothing writes to them
        warnings.simplefilter("ignore", UserWarning)
        x = torch.from_numpy(np.ascontiguousarray(array))
    return x.pin_memory() if pin else x


def to_device(data: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device: a host array (or tensor) on ``device``. To a GPU through pinned memory,
    asynchronously: a copy from pageable memory would make the host wait for everything
    queued before it. A tensor already pinned (`host_tensor`) or on the device is not copied
    on the host again."""
    x = data if isinstance(data, torch.Tensor) else host_tensor(data)
    if device.type != "cuda":
        return x
    if x.device.type == "cpu" and not x.is_pinned():
        x = x.pin_memory()
    return x.to(device, non_blocking=True)


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def leaves(tree: dict):
    """The tensors (or arrays) of a nested dict, depth first."""
    for value in tree.values():
        yield from leaves(value) if isinstance(value, dict) else (value,)


def _map(tree: dict, fn) -> dict:
    return {k: _map(v, fn) if isinstance(v, dict) else fn(v) for k, v in tree.items()}
