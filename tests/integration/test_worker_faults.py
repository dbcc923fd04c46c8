"""Crashed actors: Ray restarts them, in-flight work is retried, nothing is lost or doubled."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
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


FLAGS = ["--stages", "2", "--batch-tokens", "1024", "--rows-per-part", "3000", "--max-per-layer", "5", "--quiet"]


def cli_scan_hit_after_a_part(corpus: Path, out: Path, ray_tmp: str, hit, env: dict | None = None, *flags: str):
    """`neuroscan scan` as a user runs it, on a local Ray of its own under ``ray_tmp``: once
    it has committed a part, ``hit(processes)`` is called with every process under it (Ray's
    raylet and workers among them). Returns (exit status, stdout, stderr)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "neuroscan", "scan", str(corpus), "--out", str(out), *FLAGS, *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "RAY_ADDRESS": "", "RAY_TMPDIR": ray_tmp, **(env or {})},
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 600
        while parts(out) < 1:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else ""
            time.sleep(0.05)
        hit(psutil.Process(proc.pid).children(recursive=True))
        stdout, stderr = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    return proc.returncode, stdout, stderr


def named(processes, name: str):
    return next(p for p in processes if name in p.name())


def test_the_clusters_error_lines_go_to_a_log_not_into_the_scans_output(corpus, reference, tmp_path):
    """A stage's process killed (SIGKILL) in a scan run from the command line: Ray restarts it,
    and the lines Ray publishes about it ("a worker died", "will be retried") go to the Ray
    session's neuroscan-cluster-errors.log, not above neuroscan's own output."""
    ray_tmp = tempfile.mkdtemp(prefix="rf", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    out = tmp_path / "out"
    code, stdout, stderr = cli_scan_hit_after_a_part(
        corpus, out, ray_tmp, lambda processes: named(processes, "ray::Stage").kill()
    )
    log_text = "".join(p.read_text() for p in Path(ray_tmp).glob("ray/session_2*/logs/neuroscan-cluster-errors.log"))
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert code == 0, stderr
    assert "(raylet)" not in stdout + stderr and "\x1b[" not in stdout + stderr, stdout + stderr
    assert f"wrote {out}  (" in stderr and stdout == ""
    assert "died" in log_text or "retried" in log_text  # what Ray said, kept
    assert_same_output(out, reference)


def test_a_stopped_stage_is_found_and_restarted_and_the_scan_goes_on(corpus, reference, tmp_path):
    """A stage's process stopped (SIGSTOP: alive to Ray, answering nothing) in a scan run from
    the command line: within NEUROSCAN_STALL_S (3 s here) and twice 10 s the driver finds the
    stage that does not answer, kills it, Ray restarts it, and the scan completes with the same
    tables, saying so in one line."""
    ray_tmp = tempfile.mkdtemp(prefix="rs", dir="/tmp")
    out = tmp_path / "out"
    code, _, stderr = cli_scan_hit_after_a_part(
        corpus,
        out,
        ray_tmp,
        lambda processes: named(processes, "ray::Stage").send_signal(signal.SIGSTOP),
        {"NEUROSCAN_STALL_S": "3"},
    )
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert code == 0, stderr
    said = stderr[: stderr.index(f"wrote {out}  (")].strip().splitlines()
    assert len(said) == 1 and said[0].startswith("stage ") and " of replica 0 answered nothing for " in said[0], stderr
    assert said[0].endswith(" s: restarted it, its calls sent again")
    assert_same_output(out, reference)


def test_the_raylet_killed_stops_the_scan_in_neuroscans_line_alone_and_resume_finishes_it(corpus, reference, tmp_path):
    """The raylet of the scan's own Ray node killed (the node's daemon: its workers, the
    aggregator among them, go with it): one line of neuroscan's, none of Ray's (its lines in
    colour codes with pids and reprs), and the committed parts resume."""
    ray_tmp = tempfile.mkdtemp(prefix="rk", dir="/tmp")
    out = tmp_path / "out"
    code, stdout, stderr = cli_scan_hit_after_a_part(
        corpus, out, ray_tmp, lambda processes: named(processes, "raylet").kill()
    )
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert code == 2 and stdout == ""
    assert stderr.splitlines() == [
        "neuroscan: error: the Ray node of this machine died (its raylet), and the aggregator with it; committed "
        "parts are kept: rerun the same command with --resume (on a cluster, once `ray start` has brought this node back)"
    ]
    assert parts(out) >= 1
    ray_tmp = tempfile.mkdtemp(prefix="rk", dir="/tmp")
    resumed = subprocess.run(
        [sys.executable, "-m", "neuroscan", "scan", str(corpus), "--out", str(out), *FLAGS, "--resume"],
        capture_output=True,
        text=True,
        env={**os.environ, "RAY_ADDRESS": "", "RAY_TMPDIR": ray_tmp},
        timeout=900,
    )
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_output(out, reference)
