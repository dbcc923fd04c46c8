"""Which Ray a scan runs on: a new local one unless RAY_ADDRESS says otherwise.

A cluster that `ray start --head` left on the machine must not capture a plain scan (Ray's
own ``ray.init()`` would join it and then refuse the CPU count), ``RAY_ADDRESS=auto`` joins
it on purpose, and an address where nothing answers is one line at once. The head runs
under its own RAY_TMPDIR, so the rest of the test session never sees it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from cluster import placement

ROOT = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).with_name("ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head():
    """A one-CPU Ray head started by `ray start`, as a user leaves one running; its env."""
    tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "RAY_TMPDIR": tmp}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [
            str(RAY),
            "start",
            "--head",
            "--block",
            "--num-cpus",
            "1",
            "--include-dashboard=false",
            "--disable-usage-stats",
            "--port",
            str(free_port()),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    marker = Path(tmp) / "ray" / "ray_current_cluster"
    deadline = time.monotonic() + 120
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert marker.exists(), "ray start --head did not come up"
    yield env
    proc.terminate()  # --block: the head's processes go with it
    proc.wait(timeout=60)
    shutil.rmtree(tmp, ignore_errors=True)


def scan(env: dict, out: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli", "scan", "seed", "--out", str(out), "--quiet", *flags],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_a_cluster_left_by_ray_start_is_joined_only_when_asked(head, tmp_path):
    alone = scan(head, tmp_path / "alone", "--stages", "2")  # 3 actors: more than the head's one CPU
    assert alone.returncode == 0, alone.stderr[-2000:]
    asked = {**head, "RAY_ADDRESS": "auto"}
    too_big = scan(asked, tmp_path / "too-big", "--stages", "2")  # on the head: one CPU for two stages
    assert (
        too_big.returncode == 2 and "needs 2 CPU (2 stage actors) but the Ray cluster has 1 (CPU=1," in too_big.stderr
    )
    joined = scan(asked, tmp_path / "joined")
    assert joined.returncode == 0, joined.stderr[-2000:]
    assert '"status": "complete"' in (tmp_path / "joined" / "manifest.json").read_text()


def test_an_address_where_nothing_answers_is_one_line_at_once(tmp_path):
    port = free_port()  # bound, then closed: nothing listens there
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{port}"}
    started = time.monotonic()
    result = scan(env, tmp_path / "o")
    assert result.returncode == 2
    assert result.stderr.startswith(f"neuroscan: error: nothing answers at RAY_ADDRESS=127.0.0.1:{port} (")
    assert result.stderr.count("\n") == 1
    assert time.monotonic() - started < 60  # Ray alone retries for minutes


@pytest.mark.parametrize(
    "family, host", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "[::1]")], ids=["ipv4", "ipv6"]
)
def test_an_address_where_something_answers_passes_the_check(family, host):
    with socket.socket(family) as listening:
        listening.bind((host.strip("[]"), 0))
        listening.listen()
        placement._check_reachable(f"{host}:{listening.getsockname()[1]}")  # raises UserError if refused
