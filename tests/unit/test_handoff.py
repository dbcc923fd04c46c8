"""The pure parts of the direct hand-off: the outbox a stage keeps and the transport chosen."""

from __future__ import annotations

import threading
import time

import pytest

from workers.handoff import Outbox, Where, group_backend, transport


def test_a_take_waits_for_its_put_and_gets_that_batch_only():
    box, got = Outbox(), []
    reader = threading.Thread(target=lambda: got.append(box.take(2)))
    reader.start()
    box.put(1, "one")
    time.sleep(0.05)
    assert got == [] and reader.is_alive()  # batch 1 is not what it waits for
    box.put(2, "two")
    reader.join(5)
    assert got == ["two"] and box.take(1) == "one" and len(box) == 0


def test_an_error_put_for_a_batch_is_raised_by_its_take():
    box = Outbox()
    box.put(3, ValueError("stage failed"))
    with pytest.raises(ValueError, match="stage failed"):
        box.take(3)
    assert len(box) == 0


def test_a_take_without_a_put_times_out_with_the_batch_named():
    with pytest.raises(TimeoutError, match="micro-batch 9"):
        Outbox(wait_s=0.05).take(9)


def test_transports_follow_devices_and_placement():
    gpu0, gpu1 = Where("node-a", ("0",), False), Where("node-a", ("1",), False)
    assert transport("cpu", Where("node-a", (), False), Where("node-b", (), False)) == "GLOO"
    assert transport("cuda", gpu0, Where("node-a", ("0",), True)) == "CUDA_IPC"  # two stages sharing a GPU
    assert transport("cuda", gpu0, gpu1) == "NCCL"
    assert transport("cuda", gpu0, Where("node-b", ("0",), False)) == "NCCL"  # GPU 0 of another node
    assert group_backend(["CUDA_IPC", "CUDA_IPC"]) is None
    assert group_backend(["CUDA_IPC", "NCCL"]) == "nccl"
    assert group_backend(["GLOO"]) == "torch_gloo"
