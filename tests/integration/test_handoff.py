"""``--handoff direct``: the hidden state goes stage to stage as a tensor through Ray Direct
Transport (Gloo between these CPU stages), and the tables are the ones the object store gives."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from cluster import placement
from cluster.driver import run_scan
from neuroscan.errors import UserError
from tests.integration.test_worker_faults import config, saboteur
from tests.same_output import assert_same_output, sequence_corpus

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return sequence_corpus(tmp_path_factory.mktemp("handoff") / "prompts.jsonl", 300, seed=7)


@pytest.fixture(scope="module")
def reference(ray_session, corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("handoff-ref") / "out"
    run_scan(config(corpus, out))
    return out


@pytest.mark.parametrize("stages, replicas", [(2, 2), (3, 1)])
def test_direct_hand_offs_write_the_tables_of_the_object_store(
    ray_session, corpus, reference, tmp_path, stages, replicas
):
    out = tmp_path / "out"
    manifest = run_scan(config(corpus, out, stages=stages, replicas=replicas, handoff="direct")).to_dict()
    assert manifest["handoff"] == "direct" and len(manifest["parts"]) > 1
    assert manifest["timings"]["transports"] == [["GLOO"] * (stages - 1)] * replicas
    assert_same_output(out, reference)


def test_a_stage_that_dies_stops_a_direct_run_and_resume_finishes_it(ray_session, corpus, reference, tmp_path):
    """A restarted stage would have lost its collective group and the hidden states it held, so
    a direct run is not restarted: one line, the committed parts kept, ``--resume`` goes on."""
    out, killed, stop = tmp_path / "out", [], threading.Event()
    thread = saboteur(out, [(1, "stage-0-1")], killed, stop)
    try:
        with pytest.raises(UserError, match="a pipeline actor died and could not be restarted .* --resume"):
            run_scan(config(corpus, out, handoff="direct")).to_dict()
    finally:
        stop.set()
        thread.join()
    assert killed == ["stage-0-1"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "running" and manifest["parts"]
    # The user's next step: the same command with --resume, in a new driver process.
    resume = [
        sys.executable,
        "-m",
        "cluster.cli",
        "scan",
        str(corpus),
        "--out",
        str(out),
        "--stages",
        "2",
        "--batch-tokens",
        "1024",
        "--rows-per-part",
        "3000",
        "--max-per-layer",
        "5",
        "--handoff",
        "direct",
        "--resume",
        "--quiet",
    ]
    result = subprocess.run(resume, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert_same_output(out, reference)


class Idle:
    """Stands in for a stage actor where only its placement matters."""


def test_transports_follow_the_gpus_ray_gave_the_stages(ray_session):
    """(The session's Ray has four logical GPUs.) Two stages sharing one GPU hand over by CUDA
    IPC; stages on two GPUs need NCCL, which Ray drives with cupy: without it, one line."""
    shared = [ray_session.remote(num_gpus=0.5, num_cpus=0)(Idle).remote() for _ in range(2)]
    apart = [ray_session.remote(num_gpus=1, num_cpus=0)(Idle).remote() for _ in range(2)]
    try:
        assert placement.connect([shared], "cuda") == ([["CUDA_IPC"]], [])
        if importlib.util.find_spec("cupy") is None:
            with pytest.raises(UserError, match="goes through NCCL, which Ray drives with cupy: install cupy"):
                placement.connect([apart], "cuda")
    finally:
        for actor in shared + apart:  # give the logical GPUs back to the session's other tests
            ray_session.kill(actor)
