"""``--tensor-parallel 2`` on CPU: each stage is two Ray actors, two Gloo ranks sharded by
DeepSpeed AutoTP, each reducing its own neurons. The tables are those of one rank a stage, row
by row (`assert_same_rows`), and both are the per-prompt forward pass's, bands included
(`assert_scan_matches`, tests/reference.py).
A rank that dies stops the run in one line, and ``--resume`` finishes it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from cluster.driver import run_scan
from neuroscan.config import ScanConfig, Selection, ServeConfig
from neuroscan.errors import UserError, user_line
from tests.conftest import CORPUS
from tests.integration.test_worker_faults import config, saboteur
from tests.reference import assert_same_rows, assert_scan_matches, reference_scan
from tests.same_output import assert_same_output, sequence_corpus

pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[2]
TEXTS = [row["text"] for row in CORPUS]
SELECTION = Selection(high=0.5, low=-0.1, max_per_layer=40)
"""A cap well inside the layer (the ranks' candidates merged) and both rules selecting."""


def scan(tmp_path: Path, corpus: Path, name: str, **kw) -> tuple[dict, Path]:
    out = tmp_path / name
    cfg = ScanConfig(prompts=str(corpus), out=str(out), quiet=True, selection=SELECTION, **kw)
    return run_scan(cfg).to_dict(), out


@pytest.fixture(scope="module")
def one_rank(ray_session, corpus, tmp_path_factory) -> Path:
    return scan(tmp_path_factory.mktemp("tp1"), corpus, "out", verify=0)[1]


@pytest.fixture(scope="module")
def tiny_reference(tiny_model):
    return reference_scan(tiny_model, TEXTS)


@pytest.mark.parametrize("stages", [1, 2])
def test_two_ranks_a_stage_write_the_rows_of_one_and_of_the_forward_pass(
    ray_session, corpus, tmp_path, one_rank, tiny_reference, stages
):
    manifest, out = scan(tmp_path, corpus, "out", stages=stages, tensor_parallel=2, verify=0 if stages == 2 else 4)
    assert manifest["status"] == "complete" and manifest["tensor_parallel"] == 2
    assert len(manifest["timings"]["memory"]["stages"]) == 2 * stages  # every rank is a process of its own
    assert assert_scan_matches(out, tiny_reference, SELECTION) == manifest["totals"]["activation_rows"] > 0
    assert assert_same_rows(out, one_rank) == manifest["totals"]["activation_rows"]
    assert_scan_matches(one_rank, tiny_reference, SELECTION)
    if stages == 1:
        assert manifest["verification"]["passed"]


def test_a_gated_model_cut_unevenly_matches_the_forward_pass(ray_session, corpus, tmp_path):
    """tiny-llama's 192 neurons a layer: 128 on rank 0, 64 on rank 1 (AutoTP's 64-neuron grain)."""
    from workers.embedded import preset_config, write_checkpoint

    model = write_checkpoint(preset_config("tiny-llama"), tmp_path / "llama")
    manifest, out = scan(tmp_path, corpus, "out", model=str(model), stages=2, tensor_parallel=2, verify=0)
    checked = assert_scan_matches(out, reference_scan(model, TEXTS), SELECTION)
    assert checked == manifest["totals"]["activation_rows"] > 0


@pytest.fixture(scope="module")
def long_corpus(tmp_path_factory) -> Path:
    return sequence_corpus(tmp_path_factory.mktemp("tp-faults") / "prompts.jsonl", 200, seed=5)


def test_a_rank_that_dies_stops_the_run_in_one_line_and_resume_finishes_it(ray_session, long_corpus, tmp_path):
    """Rank 1 of stage 1 killed once a part is committed: rank 0's next collective fails at
    once (its peer is gone), the run stops with one line and its committed parts, and the same
    command with --resume (new processes, a new group) completes the tables of a run that
    nothing stopped."""
    reference = tmp_path / "reference"
    run_scan(config(long_corpus, reference, tensor_parallel=2, verify=0))
    out, killed, stop = tmp_path / "out", [], threading.Event()
    thread = saboteur(out, [(1, "stage-0-0-rank-1")], killed, stop)
    try:
        with pytest.raises(UserError, match=r"tensor-parallel stage of layers 0-\d+ failed .* --resume") as err:
            run_scan(config(long_corpus, out, tensor_parallel=2, verify=0))
    finally:
        stop.set()
        thread.join()
    assert killed == ["stage-0-0-rank-1"]
    line = user_line(err.value)
    assert line is not None and "\n" not in line, str(err.value)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "running" and manifest["parts"]
    resume = [
        sys.executable, "-m", "cluster.cli", "scan", str(long_corpus), "--out", str(out), "--stages", "2",
        "--batch-tokens", "1024", "--rows-per-part", "3000", "--max-per-layer", "5", "--tensor-parallel", "2",
        "--verify", "0", "--resume", "--quiet",
    ]  # fmt: skip
    result = subprocess.run(resume, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert_same_output(out, reference)


def test_scans_through_the_service_equal_their_one_shot_scans(ray_session, corpus, tmp_path, tiny_reference):
    """The service's resident stages of two ranks each run scans with other thresholds side by
    side; each scan's tables are those of its one-shot scan, and the forward pass's."""
    from cluster.client import Client
    from cluster.serve import background
    from cluster.service import Service

    options = [{"high": 0.5, "low": -0.1, "max_per_layer": 40}, {"high": 1.0, "low": -0.05, "max_per_layer": 0}]
    cfg = ServeConfig(results=str(tmp_path / "results"), port=0, aggregators=1)
    service = Service(cfg, ScanConfig(prompts="seed", out=str(tmp_path), stages=2, tensor_parallel=2, verify=0))
    try:
        service.start()
        url, stop = background(service, "127.0.0.1", 0)
        client = Client(url)
        assert client.health()["tensor_parallel"] == 2
        jobs = [client.submit(str(corpus), name=f"tp{i}", **o) for i, o in enumerate(options * 2)]
        for job in jobs:
            assert job.wait()["state"] == "completed"
        runs = [job.result() for job in jobs]
        stop()
    finally:
        service.close()
    for i, (run, o) in enumerate(zip(runs, options * 2)):
        sel = Selection(**o)
        one_shot = tmp_path / f"one-shot-{i}"
        if i < len(options):
            run_scan(
                ScanConfig(
                    prompts=str(corpus),
                    out=str(one_shot),
                    quiet=True,
                    stages=2,
                    tensor_parallel=2,
                    selection=sel,
                    verify=0,
                )
            )
        assert run.manifest.tensor_parallel == 2
        assert_same_output(run.out, tmp_path / f"one-shot-{i % len(options)}")
        assert assert_scan_matches(run.out, tiny_reference, sel) > 0
