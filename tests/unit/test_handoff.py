"""The pure parts of the direct hand-off: the outbox a stage keeps and the transport chosen."""

from __future__ import annotations

import threading
import time

import pytest

from workers.handoff import GROUP, Outbox, Where, group_backend, transport


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


class Call:
    """A stand-in for a Ray actor method: records each call and its options, returns a name."""

    def __init__(self, log: list, name: str, options: dict | None = None):
        self.log, self.name, self.opts = log, name, options or {}

    def options(self, **options):
        return Call(self.log, self.name, options)

    def remote(self, *args):
        self.log.append((self.name, self.opts, args))
        return f"ref:{self.name}:{len(self.log)}"


class FakeStage:
    def __init__(self, log: list, name: str):
        self.scan, self.handoff, self.forward = (Call(log, f"{name}.{m}") for m in ("scan", "handoff", "forward"))


def test_the_scheduler_hands_each_stage_the_previous_stages_hand_off(monkeypatch):
    """With hand-offs, each stage's rows come from ``scan`` and the next stage's hidden state is
    the reference of a ``handoff`` call made with the hop's transport (not ``forward``, whose
    hidden state goes through the object store)."""
    import cluster.schedule as schedule
    from cluster.job import Job
    from cluster.pipelines import Pipelines
    from neuroscan.config import ScanConfig
    from neuroscan.messages import MicroBatch

    monkeypatch.setattr(schedule.ray, "put", lambda value: "ref:batch")
    log: list = []
    pipe = [FakeStage(log, f"s{i}") for i in range(3)]
    sink = type("Sink", (), {"add": staticmethod(Call(log, "agg.add").remote)})()
    cfg = ScanConfig(prompts="seed", out="x", stages=3, quiet=True)
    job = Job("scan-a", cfg, iter([]), set(), sink, 1)
    scheduler = schedule.Scheduler(Pipelines("cpu", [pipe], handoffs=[["GLOO", "CUDA_IPC"]]), window=3)
    scheduler.submit(job, MicroBatch(5, None, None, None, None, None, job="scan-a"), ["prompt"], pipe)
    names = [name for name, _, _ in log]
    assert names == ["s0.scan", "s0.handoff", "s1.scan", "s1.handoff", "s2.scan", "agg.add"]
    assert log[1][1] == {"concurrency_group": GROUP, "tensor_transport": "GLOO"} and log[1][2] == (("scan-a", 5),)
    assert job.in_flight == 1
    assert log[3][1]["tensor_transport"] == "CUDA_IPC"
    assert log[0][2] == ("ref:batch", None) and log[2][2] == ("ref:batch", "ref:s0.handoff:2")
    assert log[4][2] == ("ref:batch", "ref:s1.handoff:4")
    assert log[5][2] == (["prompt"], "ref:s0.scan:1", "ref:s1.scan:3", "ref:s2.scan:5")


def test_a_hand_off_that_times_out_ends_the_run_with_one_line(monkeypatch):
    """Ray Direct Transport gives up on a transfer after a while (its receiver raises
    TimeoutError, wrapped by Ray): the user gets one line that names it and the way on."""
    from ray.exceptions import RayTaskError

    import cluster.schedule as schedule
    from neuroscan.errors import UserError

    lost = TimeoutError(
        "ObjectRef(ab12) not found in RDT object store after 60.0s, transfer may have failed.\nPlease report"
    )

    def get(ref):
        raise RayTaskError("Stage.scan", "Traceback (most recent call last): ...", lost).as_instanceof_cause()

    monkeypatch.setattr(schedule.ray, "get", get)
    with pytest.raises(UserError) as raised:
        schedule.call("ref")
    assert str(raised.value) == (
        "a stage-to-stage hand-off timed out (ObjectRef(ab12) not found in RDT object store after 60.0s, transfer may have failed.); "
        "committed parts are kept: rerun the same command with --resume (or with --handoff store)"
    )
