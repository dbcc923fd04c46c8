from __future__ import annotations

import math

import pytest

from cluster.config import ScanConfig, Selection
from cluster.errors import UserError
from cluster.partition import partition_layers


@pytest.mark.parametrize("n, s", [(28, 1), (28, 2), (28, 3), (28, 8), (28, 28), (5, 3), (1, 1)])
def test_partition_covers_every_layer_once_evenly(n, s):
    bounds = partition_layers(n, s)
    assert len(bounds) == s
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    sizes = [stop - start for start, stop in bounds]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    assert sizes == sorted(sizes, reverse=True)  # the last stage, which has lm_head, is never larger


def test_partition_28_by_3():
    assert partition_layers(28, 3) == [(0, 10), (10, 19), (19, 28)]


@pytest.mark.parametrize("s", [0, 29, -1])
def test_partition_refuses_impossible_stage_counts(s):
    with pytest.raises(UserError, match="--stages"):
        partition_layers(28, s)


@pytest.mark.parametrize(
    "selection, match",
    [
        (Selection(high=0.0, low=0.0), "--high 0.0 must be greater than --low 0.0"),
        (Selection(high=1.0, low=2.0), "must be greater"),
        (Selection(red=2.0), "--red 2.0 must be at least --high"),
        (Selection(high=math.nan), "not a finite number"),
        (Selection(low=-math.inf), "not a finite number"),
        (Selection(max_per_layer=-1), "negative"),
    ],
)
def test_selection_validation(selection, match):
    with pytest.raises(UserError, match=match):
        selection.validate()


@pytest.mark.parametrize(
    "kwargs, match",
    [({"device": "tpu"}, "--device 'tpu'"), ({"dtype": "int8"}, "--dtype"), ({"stages": 0}, "--stages"),
     ({"replicas": 0}, "--replicas"), ({"format": "csv"}, "--format"), ({"batch_tokens": 0}, "--batch-tokens"),
     ({"handoff": "nccl"}, "--handoff 'nccl' is not known: use one of store, direct")],
)
def test_scan_config_validation(kwargs, match):
    with pytest.raises(UserError, match=match):
        ScanConfig(prompts="seed", out="x", **kwargs).validate()


def test_cli_prints_only_the_cause_of_an_error_raised_in_an_actor(capsys, monkeypatch):
    import ray.exceptions

    import cluster.cli as cli

    def fail(args):
        raise ray.exceptions.RayTaskError("add", "Traceback (most recent call last):\n  ...", UserError("writing part 2 failed: rerun with --resume")).as_instanceof_cause()

    monkeypatch.setitem(cli.COMMANDS, "scan", fail)
    assert cli.main(["scan", "seed", "--out", "x"]) == 2
    assert capsys.readouterr().err == "neuroscan: error: writing part 2 failed: rerun with --resume\n"
