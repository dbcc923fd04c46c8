"""Crashed actors: Ray restarts them, in-flight work is retried, nothing is lost or doubled."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import ray

from cluster.driver import run_scan
from neuroscan.config import ScanConfig, Selection
from neuroscan.errors import UserError
from tests.same_output import assert_same_output, sequence_corpus


def config(corpus: Path, out: Path, **kw) -> ScanConfig:
    """Two stages, micro-batches of 1,024 tokens, parts of 3,000 rows: a run of many parts."""
    kw = {
        "stages": 2,
        "batch_tokens": 1024,
        "rows_per_part": 3000,
        "quiet": True,
        "selection": Selection(max_per_layer=5),
        **kw,
    }
    return ScanConfig(prompts=str(corpus), out=str(out), **kw)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return sequence_corpus(tmp_path_factory.mktemp("faults") / "prompts.jsonl", 500, seed=4)


@pytest.fixture(scope="module")
def reference(ray_session, corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faults-ref") / "out"
    run_scan(config(corpus, out))
    return out


def parts(out: Path) -> int:
    try:
        return len(json.loads((out / "manifest.json").read_text())["parts"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def actor(suffix: str):
    names = [n for n in ray.util.list_named_actors() if n.startswith("neuroscan-") and n.endswith(suffix)]
    return ray.get_actor(names[-1]) if names else None


def saboteur(out: Path, plan: list[tuple[int, str]], killed: list, stop: threading.Event) -> threading.Thread:
    """Kill (letting Ray restart) the actor named ``suffix`` once ``parts`` parts are committed."""

    def work():
        for at_parts, suffix in plan:
            while parts(out) < at_parts and not stop.is_set():
                time.sleep(0.02)
            handle = actor(suffix)
            if stop.is_set() or handle is None:
                return
            ray.kill(handle, no_restart=False)
            killed.append(suffix)
            time.sleep(1.0)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread


def test_stage_and_aggregator_crashes_leave_the_same_tables(ray_session, corpus, reference, tmp_path):
    out, killed, stop = tmp_path / "out", [], threading.Event()
    thread = saboteur(out, [(1, "stage-0-1"), (2, "stage-0-0"), (4, "aggregator-0")], killed, stop)
    try:
        run_scan(config(corpus, out))
    finally:
        stop.set()
        thread.join()
    assert killed == ["stage-0-1", "stage-0-0", "aggregator-0"]
    assert json.loads((out / "manifest.json").read_text())["resumed_at"]  # the aggregator did restart
    assert_same_output(out, reference)


def test_a_fault_that_keeps_recurring_stops_the_run_resumably(ray_session, corpus, reference, tmp_path):
    out, killed, stop = tmp_path / "out", [], threading.Event()
    thread = saboteur(out, [(1, "stage-0-1")] * 5, killed, stop)
    try:
        with pytest.raises(UserError, match="a pipeline actor died and could not be restarted .* --resume"):
            run_scan(config(corpus, out))
    finally:
        stop.set()
        thread.join()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "running" and manifest["parts"]
    run_scan(config(corpus, out, resume=True))
    assert_same_output(out, reference)


def test_the_clusters_error_lines_go_to_a_log_not_into_the_scans_output(corpus, reference, tmp_path):
    """A stage's process killed (SIGKILL) in a scan run from the command line: Ray restarts it,
    and the lines Ray publishes about it ("a worker died", "will be retried") go to the Ray
    session's neuroscan-cluster-errors.log, not above neuroscan's own output."""
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import tempfile

    import psutil

    ray_tmp = tempfile.mkdtemp(prefix="rf", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    out = tmp_path / "out"
    flags = ["--stages", "2", "--batch-tokens", "1024", "--rows-per-part", "3000", "--max-per-layer", "5", "--quiet"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "neuroscan", "scan", str(corpus), "--out", str(out), *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "RAY_ADDRESS": "", "RAY_TMPDIR": ray_tmp},
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 600
        while parts(out) < 1:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else ""
            time.sleep(0.05)
        stage = next(p for p in psutil.Process(proc.pid).children(recursive=True) if "ray::Stage" in p.name())
        stage.kill()
        stdout, stderr = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    log_text = "".join(p.read_text() for p in Path(ray_tmp).glob("ray/session_2*/logs/neuroscan-cluster-errors.log"))
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, stderr
    assert "(raylet)" not in stdout + stderr and "\x1b[" not in stdout + stderr, stdout + stderr
    assert f"wrote {out}  (" in stderr and stdout == ""
    assert "died" in log_text or "retried" in log_text  # what Ray said, kept
    assert_same_output(out, reference)
