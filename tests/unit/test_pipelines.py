"""Loading the stages: each said as it finishes, in the order they finish; a lost node is one line."""

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


def load(monkeypatch, fake: FakeRay, lost: list[list[int]]) -> list[str]:
    monkeypatch.setattr(pipelines, "ray", fake)
    pipes = Pipelines(device="cpu")
    answers = iter(lost)
    monkeypatch.setattr(pipes, "lost", lambda: next(answers))
    monkeypatch.setattr(pipes, "lost_line", lambda: "replica 1 lost with node 3f2a")
    said: list[str] = []
    pipes._load(CALLS, BOUNDS, said.append)
    return said


def test_each_stage_is_said_as_it_finishes(monkeypatch):
    said = load(monkeypatch, FakeRay([["r1s1"], [], ["r0s0"], ["r0s1"], ["r1s0"]]), lost=[[]])
    named = [re.sub(r", [\d.]+ s\)$", ")", line) for line in said]
    assert named == [
        "stage 2/2 of replica 2/2 loaded (layers 14-27)",
        "stage 1/2 of replica 1/2 loaded (layers 0-13)",
        "stage 2/2 of replica 1/2 loaded (layers 14-27)",
        "stage 1/2 of replica 2/2 loaded (layers 0-13)",
    ]
    assert all(re.search(r", \d+\.\d s\)$", line) for line in said)


def test_a_node_lost_while_loading_stops_the_start_in_one_line(monkeypatch):
    line = "a node left the Ray cluster while the stages were loading the model (replica 1 lost with node 3f2a)"
    with pytest.raises(UserError, match=re.escape(line)):  # nothing finished for a while: Ray is asked
        load(monkeypatch, FakeRay([["r0s0"], []]), lost=[[1]])
    with pytest.raises(UserError, match=re.escape(line)):  # a stage's call failed with its node
        load(monkeypatch, FakeRay([["r1s0"]], failed=("r1s0",)), lost=[[1]])


def test_a_stage_that_fails_to_load_stops_the_start_at_once(monkeypatch):
    with pytest.raises(RuntimeError, match="r0s1 failed to load"):
        load(monkeypatch, FakeRay([["r0s1"]], failed=("r0s1",)), lost=[[]])
