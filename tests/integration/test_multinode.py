"""Multi-node: a real Ray cluster on this machine, a head and worker nodes each with its own
raylet, object store and logical GPUs, started by `ray.cluster_utils.Cluster`.

Every worker node has 2 logical CPUs and 2 logical GPUs, so it holds exactly one replica of a
2-stage pipeline (`--device cpu` stages take a CPU each, placed by the same code as GPU
stages); the head has 1 CPU and holds none. Scans run as a user runs them, `neuroscan scan`
with RAY_ADDRESS set to the cluster, and where every actor ran is read from Ray's own state
API. Nodes are removed as a lost machine goes: every process of the node killed at once.
Nodes where the model or neuroscan is missing are real too: `ray start` in a mount namespace
of its own (`unshare`) where that directory is an empty tmpfs.

`make test` runs this module in a pytest process of its own: a `ray.cluster_utils.Cluster`
lives in the process that starts it, and its shutdown resets that process's Ray state (its
internal key-value client), which breaks the local Ray the other modules share
(`ray_session`); the same modules, after it, lost their direct hand-offs.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from unittest.mock import patch

import pytest

from bench.nodes import add_node, start_cluster
from tests.same_output import assert_same_output, sequence_corpus

ROOT = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).with_name("ray")
WORKERS = ("a", "b", "c")
NODE = {"num_cpus": 2, "num_gpus": 2, "object_store_memory": 200 << 20}
LABEL = "neuroscan-node"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MultiNode:
    """The cluster, its worker nodes by label, and what the tests ask of it."""

    def __init__(self, tmp: str):
        self.tmp = tmp
        self.cluster = start_cluster(
            tmp,
            num_cpus=1,
            labels={LABEL: "head"},
            include_dashboard=True,  # Ray's state API and job server
            dashboard_port=_free_port(),
            _system_config={"health_check_period_ms": 500, "health_check_failure_threshold": 4},
        )
        self.nodes = {}
        for label in WORKERS:
            self.add(label)

    @property
    def address(self) -> str:
        return self.cluster.address

    @property
    def dashboard(self) -> str:
        return f"http://{self.cluster.webui_url}"

    def add(self, label: str):
        self.nodes[label] = add_node(self.cluster, **NODE, labels={LABEL: label})
        return self.nodes[label]

    def lose(self, label: str) -> None:
        """Every process of the node killed at once, as when its machine goes."""
        self.cluster.remove_node(self.nodes.pop(label), allow_graceful=False)

    def env(self) -> dict:
        return {**os.environ, "RAY_ADDRESS": self.address}

    def labels(self) -> dict[str, str]:
        """Ray node id -> label, of every node alive."""
        from ray.util.state import list_nodes

        return {n.node_id: n.labels.get(LABEL) for n in list_nodes(address=self.address) if n.state == "ALIVE"}

    def actors(self, known: set[str] = frozenset()) -> dict[str, str]:
        """neuroscan's actors (name -> label of the node it ran on), from Ray's state API,
        leaving out those of names in ``known``."""
        from ray.util.state import list_actors, list_nodes

        labels = {n.node_id: n.labels.get(LABEL) for n in list_nodes(address=self.address, limit=1000)}
        found = list_actors(address=self.address, limit=10_000, detail=True)
        return {
            a.name: labels.get(a.node_id)
            for a in found
            if a.name and a.name.startswith("neuroscan-") and a.name not in known
        }


@pytest.fixture(scope="module")
def multinode():
    import ray

    if ray.is_initialized():  # the session's local Ray, which this cluster's shutdown would break
        pytest.skip("run in a pytest process of its own, as `make test` does (see the module's docstring)")
    tmp = tempfile.mkdtemp(prefix="rm", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    nodes = MultiNode(tmp)
    yield nodes
    nodes.cluster.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    return sequence_corpus(tmp_path_factory.mktemp("multinode") / "prompts.jsonl", 240, seed=5)


SCAN = ("--stages", "2", "--batch-tokens", "256", "--rows-per-part", "200", "--quiet")


def scan(env: dict, prompts: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli", "scan", str(prompts), "--out", str(out), *SCAN, *flags],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def start_scan(env: dict, prompts: Path, out: Path, *flags: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "scan", str(prompts), "--out", str(out), *SCAN, *flags],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture(scope="module")
def one_node(prompts, tmp_path_factory) -> Path:
    """The same scan on a local Ray of one node: what every multi-node scan must equal."""
    out = tmp_path_factory.mktemp("one-node") / "out"
    ray_tmp = tempfile.mkdtemp(prefix="r1", dir="/tmp")
    done = scan({**os.environ, "RAY_ADDRESS": "", "RAY_TMPDIR": ray_tmp}, prompts, out, "--replicas", "2")
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, done.stderr
    return out


def _committed(out: Path) -> int:
    try:
        return len(json.loads((out / "manifest.json").read_text())["parts"])
    except (OSError, ValueError, KeyError):
        return 0


def _wait_for(condition, timeout_s: float = 120, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_each_replica_on_a_node_of_its_own_and_the_tables_of_one_node(multinode, prompts, one_node, tmp_path):
    before = set(multinode.actors())
    done = scan(multinode.env(), prompts, tmp_path / "out", "--replicas", "3")
    assert done.returncode == 0, done.stderr
    assert_same_output(tmp_path / "out", one_node)

    ran = multinode.actors(before)
    stages = {name: label for name, label in ran.items() if "-stage-" in name}
    assert len(stages) == 6 and [label for name, label in ran.items() if "-aggregator" in name] == ["head"]
    per_replica = {r: {stages[n] for n in stages if n.rsplit("-", 2)[1] == str(r)} for r in range(3)}
    assert all(len(nodes) == 1 for nodes in per_replica.values())  # both stages of a replica on one node
    assert sorted(nodes.pop() for nodes in per_replica.values()) == sorted(WORKERS)  # one replica a node


def test_gpu_stages_are_placed_by_the_same_code_on_logical_gpus(multinode):
    """Placement alone (no GPU to load a model on): 2 stages x 3 replicas take one 2-GPU node
    each; 3 stages, more than any node's GPUs, get a bundle each, packed on two nodes."""
    probe = """
import json, ray
from cluster import placement
ray.init()
labels = {n["NodeID"]: n["Labels"]["neuroscan-node"] for n in ray.nodes() if n["Alive"]}
found = {}
for stages, replicas in ((2, 3), (3, 1)):
    reserved = placement.reserve("cuda", stages, replicas)
    found[f"{stages}x{replicas}"] = [reserved.per_replica, [sorted(labels[n] for n in reserved.nodes(r)) for r in range(replicas)]]
    placement.remove_placement_group(reserved.group)
print(json.dumps(found))
"""
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, env=multinode.env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    per_replica, nodes = found["2x3"]
    assert per_replica and sorted(n for [n] in nodes) == sorted(WORKERS)
    per_replica, [nodes] = found["3x1"]
    assert not per_replica and len(nodes) == 2  # a replica across two nodes, as few as hold it


def test_a_tensor_parallel_stages_ranks_share_a_node_and_write_the_rows_of_one_rank(
    multinode, prompts, one_node, tmp_path
):
    """Two stages of two ranks: no 2-CPU node holds a replica's four actors, so each stage is a
    bundle of its own, and its two ranks (one group, Gloo over the node's loopback) run on one
    node. The rows are those of the one-node scan of one rank a stage."""
    pytest.importorskip("deepspeed")
    from tests.reference import assert_same_rows

    before = set(multinode.actors())
    done = scan(multinode.env(), prompts, tmp_path / "out", "--tensor-parallel", "2", "--verify", "0")
    assert done.returncode == 0, done.stderr
    assert assert_same_rows(tmp_path / "out", one_node) > 0
    ran = {name: label for name, label in multinode.actors(before).items() if "-stage-" in name}
    assert sorted(name.split("-stage-")[1] for name in ran) == ["0-0-rank-0", "0-0-rank-1", "0-1-rank-0", "0-1-rank-1"]
    for stage in ("0-0", "0-1"):
        assert (
            ran[next(n for n in ran if n.endswith(f"{stage}-rank-0"))]
            == ran[next(n for n in ran if n.endswith(f"{stage}-rank-1"))]
        ), ran


def test_ray_job_submit_runs_a_scan_on_the_cluster(multinode, prompts, one_node, tmp_path):
    """The job's driver runs on the head with RAY_ADDRESS set, so the scan joins the cluster.
    Before any node is lost or added: run after them (every node here shares one IP), Ray's
    job server answered "No available agent to submit job"."""
    before = set(multinode.actors())
    neuroscan = Path(sys.executable).with_name("neuroscan")
    command = [str(neuroscan), "scan", str(prompts), "--out", str(tmp_path / "out"), *SCAN, "--replicas", "3"]
    done = subprocess.run(
        [str(RAY), "job", "submit", "--address", multinode.dashboard, "--", *command],
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "succeeded" in done.stdout
    assert_same_output(tmp_path / "out", one_node)
    ran = multinode.actors(before)
    assert sorted(label for name, label in ran.items() if "-stage-" in name) == sorted(WORKERS * 2)


def test_a_node_lost_mid_scan_leaves_the_scan_to_the_replicas_left(multinode, prompts, one_node, tmp_path):
    out = tmp_path / "out"
    before = set(multinode.actors())
    running = start_scan(multinode.env(), prompts, out, "--replicas", "3")
    _wait_for(lambda: _committed(out) >= 1 or running.poll() is not None, what="a committed part")
    assert running.poll() is None, "the scan ended before a node could be lost: give it a larger corpus"
    multinode.lose("b")
    stdout, stderr = running.communicate(timeout=600)
    try:
        assert running.returncode == 0, stderr
        said = stderr[: stderr.index(f"wrote {out}  (")]  # what came before the closing summary
        [lost] = said.strip().splitlines()  # neuroscan's line alone: none of Ray's
        assert lost.startswith("replica ") and " lost with node " in lost, stderr
        assert lost.endswith(": the scan goes on with the 2 replicas left"), stderr
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["status"] == "complete"
        assert_same_output(out, one_node)  # every micro-batch once: none lost, none twice
        assert "b" in set(multinode.actors(before).values())  # b held a replica before it went
    finally:
        multinode.add("b")


def test_a_node_lost_while_the_stages_load_leaves_the_scan_to_the_replicas_left(multinode, prompts, one_node, tmp_path):
    """Node c comes back slow to load (`NEUROSCAN_FAULT_LOAD_S` in its raylet's environment,
    which its workers inherit), and goes while its replica loads."""
    multinode.lose("c")
    with patch.dict(os.environ, NEUROSCAN_FAULT_LOAD_S="120"):
        multinode.add("c")
    out = tmp_path / "out"
    before = set(multinode.actors())
    try:
        running = start_scan(multinode.env(), prompts, out, "--replicas", "3")
        _wait_for(
            lambda: "c" in multinode.actors(before).values() or running.poll() is not None, what="a stage on node c"
        )
        assert running.poll() is None
        multinode.lose("c")
        stdout, stderr = running.communicate(timeout=600)
    finally:
        if "c" in multinode.nodes:
            multinode.lose("c")
        multinode.add("c")
    assert running.returncode == 0, stderr
    said = stderr[: stderr.index(f"wrote {out}  (")]
    [lost] = said.strip().splitlines()  # neuroscan's line alone: none of Ray's
    assert lost.startswith("replica ") and " lost with node " in lost, stderr
    assert lost.endswith(" while loading: the scan goes on with the 2 replicas left"), stderr
    assert_same_output(out, one_node)


def test_with_no_replica_left_the_scan_stops_and_resume_finishes_on_a_node_that_joined(
    multinode, prompts, one_node, tmp_path
):
    out = tmp_path / "out"
    before = set(multinode.actors())
    running = start_scan(multinode.env(), prompts, out, "--replicas", "1")
    _wait_for(lambda: _committed(out) >= 1 or running.poll() is not None, what="a committed part")
    assert running.poll() is None, "the scan ended before its node could be lost: give it a larger corpus"
    [label] = {label for name, label in multinode.actors(before).items() if "-stage-" in name}
    multinode.lose(label)
    stdout, stderr = running.communicate(timeout=600)
    assert running.returncode == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("neuroscan: error: every replica is lost (replica 0 lost with node ")
    assert lines[0].endswith("rerun the same command with --resume on the nodes that remain (see `ray status`)")
    assert _committed(out) >= 1
    parts = json.loads((out / "manifest.json").read_text())["parts"]
    batches = sum(len(part["batches"]) for part in parts)

    multinode.add("d")  # a node that joins after the loss: the next scan uses it
    before = set(multinode.actors())
    resumed = scan(multinode.env(), prompts, out, "--replicas", "3", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"{batches} micro-batches already committed, scanning the rest" in resumed.stderr
    assert_same_output(out, one_node)
    assert "d" in set(multinode.actors(before).values())
    multinode.lose("d")
    multinode.add(label)


def _namespaced_node(multinode: MultiNode, label: str, hide: list[Path]) -> subprocess.Popen:
    """A node started by `ray start` in a mount namespace of its own, where each of ``hide``
    is an empty tmpfs: a machine without that directory."""
    mounts = " && ".join(f"mount -t tmpfs none {shlex.quote(str(p))}" for p in hide)
    start = (
        f"exec {RAY} start --address={multinode.address} --num-cpus 2 --num-gpus 2 --labels {LABEL}={label} "
        "--block --disable-usage-stats"
    )
    process = subprocess.Popen(
        ["unshare", "-Urm", "sh", "-c", f"{mounts} && {start}"],
        env={**os.environ, "RAY_TMPDIR": multinode.tmp},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    _wait_for(lambda: label in multinode.labels().values() or process.poll() is not None, what=f"node {label}")
    assert process.poll() is None, "ray start in a mount namespace did not come up"
    return process


def _stop(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)


def _unshare_works() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(["unshare", "-Urm", "true"]).returncode == 0


needs_unshare = pytest.mark.skipif(
    not _unshare_works(), reason="needs unprivileged user and mount namespaces (`unshare -Urm`)"
)


@needs_unshare
def test_a_node_without_the_model_is_named_before_any_stage_loads(multinode, prompts, other_model, tmp_path):
    process = _namespaced_node(multinode, "no-model", [other_model])
    try:
        [node] = [n for n, label in multinode.labels().items() if label == "no-model"]
        done = scan(multinode.env(), prompts, tmp_path / "out", "--replicas", "4", "--model", str(other_model))
    finally:
        _stop(process)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"neuroscan: error: the model is not at {other_model} on node {socket.gethostname()} (Ray node {node[:8]}): "
        "every node of the Ray cluster reads it from the path it has on the driver's machine; put it there on each "
        "node (the same `hf download`, or a shared file system)"
    ]


@needs_unshare
def test_a_node_without_neuroscan_is_named_with_the_fix(multinode, prompts, tmp_path):
    hide = [ROOT / package for package in ("neuroscan", "workers", "cluster", "aggregator", "prompts")]
    process = _namespaced_node(multinode, "no-project", hide)
    try:
        [node] = [n for n, label in multinode.labels().items() if label == "no-project"]
        done = scan(multinode.env(), prompts, tmp_path / "out", "--replicas", "4")
    finally:
        _stop(process)
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(
        f"neuroscan: error: node {socket.gethostname()} (Ray node {node[:8]}) cannot import neuroscan (No module named "
    )
    assert line.endswith(
        "the same version at the same path (`pip install -e .` of the same checkout, or the same wheel)"
    )
    assert not (tmp_path / "out" / "manifest.json").exists() or _committed(tmp_path / "out") == 0


def test_the_service_on_the_cluster_answers_a_client_on_a_worker_node_and_places_a_lost_replica_again(
    multinode, prompts, one_node, tmp_path
):
    port = _free_port()
    log = tmp_path / "serve.log"
    results = tmp_path / "results"
    service = subprocess.Popen(
        [sys.executable, "-m", "neuroscan", "serve", "--results", str(results), "--port", str(port)]
        + ["--stages", "2", "--replicas", "3"],
        cwd=ROOT,
        env=multinode.env(),
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    client = f"""
import json, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
ray.init()
[node] = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Labels"].get("{LABEL}") == "a"]

@ray.remote(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
def submit():
    from cluster.client import Client
    job = Client("http://127.0.0.1:{port}").submit({str(prompts)!r}, name="from-a", batch_tokens=256, rows_per_part=200)
    return job.wait(), ray.get_runtime_context().get_node_id() == node

print(json.dumps(ray.get(submit.remote())))
"""
    try:
        _wait_for(lambda: "serving on" in log.read_text() or service.poll() is not None, 300, "the service")
        assert service.poll() is None, log.read_text()
        done = subprocess.run(
            [sys.executable, "-c", client], cwd=ROOT, env=multinode.env(), capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stderr
        status, on_a = json.loads(done.stdout.strip().splitlines()[-1])
        assert on_a and status["state"] == "completed"
        assert_same_output(results / "from-a", one_node)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30) as answer:
            health = json.load(answer)
        labels = multinode.labels()
        assert health["replicas_live"] == 3 and sorted(labels[n] for n in health["nodes"]) == sorted(WORKERS)

        # A node lost while the service is idle takes its replica; a node that joins gets it back.
        multinode.lose("b")
        _wait_for(lambda: _health(port)["replicas_live"] == 2, 60, "the replica on b dropped")
        before = set(multinode.actors())
        multinode.add("e")
        _wait_for(lambda: _health(port)["replicas_live"] == 3, 300, "a replica on the node that joined")
        labels = multinode.labels()
        assert sorted(labels[n] for n in _health(port)["nodes"]) == ["a", "c", "e"]
        job = subprocess.run(
            [
                sys.executable,
                "-m",
                "neuroscan",
                "submit",
                str(prompts),
                "--name",
                "after-e",
                "--url",
                f"http://127.0.0.1:{port}",
            ]
            + ["--batch-tokens", "256", "--rows-per-part", "200"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert job.returncode == 0, job.stderr
        waited = subprocess.run(
            [sys.executable, "-m", "neuroscan", "wait", job.stdout.split()[1], "--url", f"http://127.0.0.1:{port}"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert waited.returncode == 0, waited.stderr
        assert_same_output(results / "after-e", one_node)
        assert sorted(label for name, label in multinode.actors(before).items() if "-stage-" in name) == ["e", "e"]
        said = log.read_text()
        assert " lost with node " in said and ": the scan goes on with the 2 replicas left" in said
        assert "is back, on node " in said and "(loaded in " in said and "): 3 replicas live" in said
    finally:
        os.killpg(service.pid, signal.SIGINT)
        service.wait(timeout=120)
        if "e" in multinode.nodes:
            multinode.lose("e")
        if "b" not in multinode.nodes:
            multinode.add("b")


def _health(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30) as answer:
        return json.load(answer)


def test_a_cluster_with_fewer_nodes_than_asked_is_one_line(multinode, prompts, tmp_path):
    """8 GPU stages asked of three 2-CPU, 2-GPU nodes and a 1-CPU head: refused before anything
    is placed or loaded (CPUs, one a stage, are the first resource short)."""
    done = scan(multinode.env(), prompts, tmp_path / "out", "--device", "cuda", "--replicas", "4")
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(
        "neuroscan: error: the scan needs 8 CPU (8 stage actors) but the Ray cluster has 7 (CPU=7, GPU=6,"
    )
    assert line.endswith("lower --stages/--replicas or add nodes (see `ray status`)")


def test_the_head_lost_stops_the_scan_in_its_own_line_and_resume_finishes_it(multinode, prompts, one_node, tmp_path):
    """The last test of the module: the cluster goes with its head (and the driver's raylet,
    and the aggregator). Ray's driver would wait on the head for 60 s and exit without a word;
    neuroscan sees the head's GCS refuse connections, says so, and leaves parts that check
    clean and that `--resume` (here on a local Ray) completes."""
    out = tmp_path / "out"
    running = start_scan(multinode.env(), prompts, out, "--replicas", "3")
    _wait_for(lambda: _committed(out) >= 1 or running.poll() is not None, what="a committed part")
    assert running.poll() is None, "the scan ended before its head could be lost: give it a larger corpus"
    multinode.cluster.remove_node(multinode.cluster.head_node, allow_graceful=False)
    stdout, stderr = running.communicate(timeout=300)
    assert running.returncode == 2
    assert stderr.strip().splitlines() == [
        "neuroscan: error: the Ray cluster's head is gone (its GCS takes no connection), and the aggregator with "
        "it; committed parts are kept: rerun the same command with --resume once the cluster is back"
    ]
    checked = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "check", str(out)], capture_output=True, text=True, timeout=120
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    ray_tmp = tempfile.mkdtemp(prefix="r2", dir="/tmp")
    resumed = scan(
        {**os.environ, "RAY_ADDRESS": "", "RAY_TMPDIR": ray_tmp}, prompts, out, "--replicas", "2", "--resume"
    )
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_output(out, one_node)
