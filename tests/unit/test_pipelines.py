"""Loading the stages: each said as it finishes, in the order they finish; a lost node takes its
replicas and the others go on; with none left, one line."""

from __future__ import annotations

import re

import pytest

from cluster import pipelines
from cluster.pipelines import Pipelines
from neuroscan.errors import UserError

BOUNDS = [(0, 14), (14, 28)]
CALLS = ["r0s0", "r0s1", "r1s0", "r1s1"]  # replica by replica, stage by stage, as `open` makes them


class FakeRay:
    """``wait`` hands out the calls that finish, one step at a time ([] is a wait that timed out);
    ``get`` fails for the calls in ``failed``."""

    def __init__(self, steps: list[list[str]], failed: tuple[str, ...] = ()):
        self.steps, self.failed = iter(steps), failed

    def wait(self, pending, num_returns, timeout):
        assert num_returns == 1 and timeout == pipelines.NODE_CHECK_S
        ready = next(self.steps)
        return ready, [c for c in pending if c not in ready]

    def get(self, refs):
        for ref in refs:
            if ref in self.failed:
                raise RuntimeError(f"{ref} failed to load")


def load(
    monkeypatch, fake: FakeRay, lost: list[list[int]], calls: list[list[str]] | None = None
) -> tuple[list[str], list[str], Pipelines]:
    """Load ``calls`` (each stage's ranks' calls; CALLS, one rank a stage, by default); ``lost``:
    what each question to Ray about lost nodes answers."""
    monkeypatch.setattr(pipelines, "ray", fake)
    pipes = Pipelines(device="cpu", pipes=[["stage", "stage"], ["stage", "stage"]])
    answers = iter(lost)

    def lost_now():
        gone = next(answers)
        pipes.dropped.update({r: ["3f2a"] for r in gone})
        return gone

    monkeypatch.setattr(pipes, "lost", lost_now)
    monkeypatch.setattr(pipes, "lost_line", lambda: "replica 1 lost with node 3f2a")
    said: list[str] = []
    noticed: list[str] = []
    pipes._load(calls or [[c] for c in CALLS], BOUNDS, said.append, noticed.append)
    return said, noticed, pipes


def test_each_stage_is_said_as_it_finishes(monkeypatch):
    said, noticed, _ = load(monkeypatch, FakeRay([["r1s1"], [], ["r0s0"], ["r0s1"], ["r1s0"]]), lost=[[]])
    named = [re.sub(r", [\d.]+ s\)$", ")", line) for line in said]
    assert named == [
        "stage 2/2 of replica 2/2 loaded (layers 14-27)",
        "stage 1/2 of replica 1/2 loaded (layers 0-13)",
        "stage 2/2 of replica 1/2 loaded (layers 14-27)",
        "stage 1/2 of replica 2/2 loaded (layers 0-13)",
    ]
    assert all(re.search(r", \d+\.\d s\)$", line) for line in said) and not noticed


def test_a_stage_of_two_ranks_is_said_loaded_once_both_are(monkeypatch):
    calls = [[f"{c}-rank{k}" for k in (0, 1)] for c in CALLS]
    steps = [["r0s1-rank0"], ["r0s0-rank1"], ["r0s1-rank1"], ["r1s0-rank0"], ["r1s0-rank1"], ["r0s0-rank0"]]
    steps += [["r1s1-rank1"], ["r1s1-rank0"]]
    said, noticed, _ = load(monkeypatch, FakeRay(steps), lost=[], calls=calls)
    assert [line.split(" (")[0] for line in said] == [
        "stage 2/2 of replica 1/2 loaded",
        "stage 1/2 of replica 2/2 loaded",
        "stage 1/2 of replica 1/2 loaded",
        "stage 2/2 of replica 2/2 loaded",
    ]
    assert not noticed


@pytest.mark.parametrize(
    "steps, failed",
    [
        ([["r0s0"], [], ["r0s1"]], ()),  # nothing finished for a while: Ray is asked
        ([["r1s0"], ["r0s0"], ["r0s1"]], ("r1s0",)),  # a stage's call failed with its node
    ],
)
def test_a_node_lost_while_loading_leaves_the_start_to_the_replicas_left(monkeypatch, steps, failed):
    said, noticed, pipes = load(monkeypatch, FakeRay(steps, failed=failed), lost=[[1]])
    assert noticed == ["replica 1 lost with node 3f2a while loading: the scan goes on with the 1 replica left"]
    assert [line.split(" (")[0] for line in said] == [
        "stage 1/2 of replica 1/2 loaded",
        "stage 2/2 of replica 1/2 loaded",
    ]
    assert pipes.live == [0]


def test_every_replica_lost_while_loading_stops_the_start_in_one_line(monkeypatch):
    line = "a node left the Ray cluster while the stages were loading the model (replica 1 lost with node 3f2a)"
    with pytest.raises(UserError, match=re.escape(line)):
        load(monkeypatch, FakeRay([["r0s0"], []]), lost=[[0, 1]])


def test_a_stage_that_fails_to_load_stops_the_start_at_once(monkeypatch):
    with pytest.raises(RuntimeError, match="r0s1 failed to load"):
        load(monkeypatch, FakeRay([["r0s1"]], failed=("r0s1",)), lost=[[]])


def test_what_actors_answer_within_the_time_and_none_for_the_others(monkeypatch):
    """The memory a finished scan records: an actor that does not answer in time (a stopped
    process) or whose call failed is None, instead of a wait with no end."""

    class Answers:
        def wait(self, refs, num_returns, timeout):
            assert num_returns == len(refs) and timeout == 10.0
            return [r for r in refs if r != "stopped"], ["stopped"]

        def get(self, ref):
            if ref == "failed":
                raise RuntimeError("it died")
            return {"rss_mb": 1.0, "ref": ref}

    monkeypatch.setattr(pipelines, "ray", Answers())
    assert pipelines.answers(["a", "stopped", "failed", "b"], 10.0) == [
        {"rss_mb": 1.0, "ref": "a"},
        None,
        None,
        {"rss_mb": 1.0, "ref": "b"},
    ]
