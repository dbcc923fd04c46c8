"""Ray start-up, the placement group for S stages x R replicas, and the actors in it.

Each replica is one bundle of a placement group: its stages run on one node, and the
replicas are spread across the nodes (`reserve`). Actors are thin: `ray.remote` around
the plain `workers.stage.Stage` and `aggregator.aggregator.Aggregator` classes.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.exceptions import RayActorError
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from neuroscan.errors import UserError, user_line
from workers.handoff import GROUP, group_backend, transport, where

PLACEMENT_TIMEOUT_S = 120
ACTORS_PER_CORE = 4
"""A local Ray gets a logical CPU per actor, up to this many actors a core (a 2-core machine
runs 3 stages x 2 replicas); past it the processes only thrash (224 actors on 2 cores made no
progress for minutes), so the scan is refused before Ray starts."""
RESTARTS = {"max_restarts": 3, "max_task_retries": 3}
"""A crashed actor is restarted (and its calls retried) this many times before the run stops."""


def start_ray(n_actors: int) -> bool:
    """Connect to the Ray cluster at RAY_ADDRESS, use the Ray this process already runs, or
    start a local one.

    A local Ray is always a new one (``address="local"``), even where `ray start` left a
    cluster running on this machine: plain ``ray.init()`` would join that one, refuse the CPU
    count, and put the scan on whatever it holds. ``RAY_ADDRESS=auto`` joins it on purpose.
    A local Ray gets at least one logical CPU per actor, so a 2-core machine can still run
    three stages and the aggregator (they take turns on the cores). Returns True when this
    call started Ray, so the caller shuts it down.
    """
    # A failed stage call fails every later call of its micro-batch; the driver reads the error
    # from the aggregator's call, so Ray's "unhandled error" log of the others is noise.
    os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
    if not _on_terminal():  # Ray colours the "(pid=...)" prefix of the lines it prints unless this is "0"
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    if ray.is_initialized():
        return False
    with _keeping_sigterm():
        started = _init(n_actors)
    _log_cluster_errors()
    _native_stderr_to_log()
    return started


def _on_terminal() -> bool:
    """Whether stderr is a terminal (where colour codes are colours, not noise in a log)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced by an object without it, or closed
        return False


_native = None  # (the saved fd 2, the sys.stderr it had) while Ray's native lines go to a log


def _native_stderr_to_log() -> None:
    """Ray's C++ core worker in this process writes its error lines (objects it recovers
    after a node is lost, a connection retried) to fd 2, past any Python handler, and to its
    own log file as well. While Ray runs, fd 2 goes to ``neuroscan-driver-stderr.log`` in the
    session's log directory and Python's ``sys.stderr`` (neuroscan's lines, the progress bar,
    a traceback) to the terminal's stderr; `stop_ray` puts both back. Left as it is where
    ``sys.stderr`` is not fd 2 (a test capturing it)."""
    global _native
    from ray._private import worker

    try:
        if _native is not None or sys.stderr.fileno() != 2:
            return
        log = Path(worker.global_worker.node.get_logs_dir_path()) / "neuroscan-driver-stderr.log"
    except (AttributeError, OSError, ValueError):  # no fileno, or a Ray Client connection
        return
    sys.stderr.flush()
    saved = os.dup(2)
    _native = (saved, sys.stderr)
    sys.stderr = open(os.dup(saved), "w", buffering=1, encoding=sys.stderr.encoding, errors="backslashreplace")
    target = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(target, 2)
    os.close(target)


def stop_ray() -> None:
    """``ray.shutdown()``, and fd 2 back where it was (`_native_stderr_to_log`). Where the head
    is gone, neither: the shutdown would wait on it, and Ray's driver keeps writing its lines
    until the process exits, which stay in the log."""
    global _native
    if not head_answers():
        return
    ray.shutdown()
    if _native is not None:
        saved, stderr = _native
        _native = None
        sys.stderr.flush()
        sys.stderr.close()
        os.dup2(saved, 2)
        os.close(saved)
        sys.stderr = stderr


def _log_cluster_errors() -> None:
    """Ray's driver prints every error the cluster publishes (a worker died, a task will be
    retried) on stdout, with colour codes, above neuroscan's own line; neuroscan says what
    matters in one line (an actor that could not be restarted, a hand-off that timed out), so
    those lines go to ``neuroscan-cluster-errors.log`` in the Ray session's log directory.
    Any other line that comes this way goes to stderr (none is expected: workers' output is
    not forwarded, ``log_to_driver=False``), so that stdout carries only the command's result.
    (Ray has no switch for it: its listener prints through ``print_to_stdstream``, which is
    wrapped here; with another Ray that has no such function the lines print as before.)"""
    from ray._private import worker

    printing = getattr(worker, "print_to_stdstream", None)
    if printing is None or getattr(printing, "neuroscan", False):
        return
    try:
        log = Path(worker.global_worker.node.get_logs_dir_path()) / "neuroscan-cluster-errors.log"
    except AttributeError:  # a Ray Client connection (ray://): its driver runs on the cluster
        return

    def to_log(data, ignore_prefix):
        if data.get("pid") != "raylet":
            return printing({**data, "is_err": True}, ignore_prefix)  # Ray's sink for is_err: sys.stderr
        with open(log, "a") as f:
            f.writelines(line + "\n" for line in data.get("lines", ()))

    to_log.neuroscan = True
    worker.print_to_stdstream = to_log


@contextmanager
def _keeping_sigterm() -> Iterator[None]:
    """``ray.init`` replaces the SIGTERM handler of the main thread with ``sys.exit(15)``; the
    one before it (the CLI's: stop like Ctrl-C, one line, exit 143) is put back."""
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if on_main_thread else None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _init(n_actors: int) -> bool:
    common = dict(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    address = os.environ.get("RAY_ADDRESS")
    if not address:
        check_local_capacity(n_actors)
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, n_actors), **common)
        return True
    _check_reachable(address)
    try:
        ray.init(address=address, **common)
    except ConnectionError as err:
        raise UserError(
            f"cannot join the Ray cluster at RAY_ADDRESS={address} ({str(err).splitlines()[0]}): check it runs "
            "(`ray status`), or unset RAY_ADDRESS to start a local Ray"
        ) from None
    return True


def check_local_capacity(n_actors: int) -> None:
    """Refuse, before anything starts, more actors than a local Ray on this machine can run
    (`ACTORS_PER_CORE`); a Ray this process already runs, or one at RAY_ADDRESS, is judged by
    its own resources when the stages are placed (`check_resources`)."""
    if ray.is_initialized() or os.environ.get("RAY_ADDRESS"):
        return
    cores = os.cpu_count() or 1
    if n_actors > ACTORS_PER_CORE * cores:
        raise UserError(
            f"the scan needs {n_actors} actor processes (stages x replicas, and the aggregators) but this "
            f"machine has {cores} CPU core{'s' if cores > 1 else ''}: more than {ACTORS_PER_CORE * cores} "
            "only take turns loading weights and computing, and the scan makes no progress; "
            "lower --stages or --replicas, or set RAY_ADDRESS to a larger Ray cluster"
        )


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A ``host:port`` that nothing answers on is refused at once: Ray would retry it for minutes."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return  # "auto", "ray://...": Ray resolves those itself
    try:
        socket.create_connection(
            (host.removeprefix("[").removesuffix("]"), int(port)), timeout=timeout_s
        ).close()  # [::1]:6379
    except OSError as err:
        raise UserError(
            f"nothing answers at RAY_ADDRESS={address} ({err.strerror or err}): start the cluster's head there "
            "(`ray start --head`), fix the address, or unset RAY_ADDRESS to start a local Ray"
        ) from None


def stage_bundle(device: str, gpus: float = 1.0) -> dict[str, float]:
    """One stage's resources; ``gpus`` < 1 lets several stages share a GPU."""
    return {"CPU": 1, "GPU": gpus} if device == "cuda" else {"CPU": 1}


def check_resources(device: str, n_stage_actors: int, gpus: float = 1.0) -> None:
    """Refuse at once when the cluster cannot hold the stages, instead of waiting for placement."""
    available = ray.cluster_resources()
    for resource, amount in replica_bundle(device, n_stage_actors, gpus).items():
        have = available.get(resource, 0)
        if have < amount:
            fix = (
                "use --device cpu, or set RAY_ADDRESS to a Ray cluster with GPUs"
                if resource == "GPU" and have == 0
                else "lower --stages/--replicas or add nodes (see `ray status`)"
            )
            actors = f"{n_stage_actors} stage actor{'s' if n_stage_actors > 1 else ''}"
            raise UserError(
                f"the scan needs {amount:g} {resource} ({actors}) but the Ray cluster has {have:g} "
                f"({_describe(available)}): {fix}"
            )


@dataclass
class Reserved:
    """A ready placement group for S stages x R replicas, and where its bundles landed."""

    group: object
    stages: int
    per_replica: bool
    """One bundle per replica, holding all its stages (on one node), or one bundle per stage."""
    bundle_nodes: dict[int, str]
    """The Ray node id of each bundle."""

    def bundle(self, replica: int, stage: int) -> int:
        return replica if self.per_replica else replica * self.stages + stage

    def nodes(self, replica: int) -> set[str]:
        """The Ray node ids a replica's stages run on."""
        return {self.bundle_nodes[self.bundle(replica, s)] for s in range(self.stages)}


def replica_bundle(device: str, stages: int, gpus: float = 1.0) -> dict[str, float]:
    """The resources of ``stages`` stage actors together (one replica's S)."""
    return {k: v * stages for k, v in stage_bundle(device, gpus).items()}


def fits(bundle: dict[str, float], count: int, nodes: list[dict[str, float]]) -> bool:
    """Whether ``count`` copies of ``bundle`` fit on nodes of these total resources, each copy
    on one node (first fit)."""
    free = [dict(node) for node in nodes]
    for _ in range(count):
        node = next((n for n in free if all(n.get(k, 0) >= v for k, v in bundle.items())), None)
        if node is None:
            return False
        for k, v in bundle.items():
            node[k] -= v
    return True


def reserve(device: str, stages: int, replicas: int, gpus: float = 1.0, ranks: int = 1) -> Reserved:
    """A ready placement group for S stages x R replicas, each stage ``ranks`` actors.

    Each replica is one bundle of its S stages, so a replica lives on one node and its hidden
    state goes stage to stage through that node's shared memory (or its GPUs' NVLink), never
    the network; the bundles are spread across nodes (``SPREAD``), so losing a node loses the
    fewest replicas and the replicas share the nodes' network links to the aggregator. Where no
    node can hold a whole replica (more stages than a node has GPUs), each stage is a bundle of
    its own and the group packs them onto as few nodes as it can (``PACK``). Either way a
    tensor-parallel stage's ranks share one bundle, so one node (`workers.autotp`).
    """
    n_actors = stages * replicas * ranks
    check_resources(device, n_actors, gpus)
    whole = replica_bundle(device, stages * ranks, gpus)
    per_replica = fits(whole, replicas, [n["Resources"] for n in ray.nodes() if n["Alive"]])
    if per_replica:
        group = placement_group([whole] * replicas, strategy="SPREAD")
    else:
        group = placement_group([replica_bundle(device, ranks, gpus)] * (stages * replicas), strategy="PACK")
    ready, _ = ray.wait([group.ready()], timeout=PLACEMENT_TIMEOUT_S)
    if not ready:
        remove_placement_group(group)
        raise UserError(
            f"cannot place {n_actors} stage actors of {stage_bundle(device, gpus)} within {PLACEMENT_TIMEOUT_S} s "
            f"(cluster: {_describe(ray.cluster_resources())}); see `ray status`"
        )
    return Reserved(group, stages, per_replica, bundle_nodes(group))


def bundle_nodes(group) -> dict[int, str]:
    """The Ray node id each bundle of ``group`` is placed on now (Ray places a lost node's
    bundles again once a node has room)."""
    return placement_group_table(group)["bundles_to_node_id"]


def check_nodes(reserved: Reserved, model_path: str) -> None:
    """On every node the stages were placed on, other than the driver's, check before loading
    anything that neuroscan's code imports and the model is at the driver's path: one line
    naming the node instead of an import traceback in a worker's log, or a load that fails
    after the other nodes have loaded theirs."""

    def probe(model_path: str) -> str | None:
        """The line of what stops a stage on this node, or None. A local function: Ray pickles
        it by value, so it runs on a node where neuroscan is missing."""
        try:
            from workers.stage import model_here
        except ImportError as err:
            node = f"{socket.gethostname()} (Ray node {ray.get_runtime_context().get_node_id()[:8]})"
            return (
                f"node {node} cannot import neuroscan ({err}): install it on every node of the Ray cluster, the same "
                "version at the same path (`pip install -e .` of the same checkout, or the same wheel)"
            )
        from neuroscan.errors import UserError

        try:
            model_here(model_path)
        except UserError as err:
            return str(err)
        return None

    here = ray.get_runtime_context().get_node_id()
    nodes = sorted(set(reserved.bundle_nodes.values()) - {here})
    calls = [
        ray.remote(probe)
        .options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
        .remote(model_path)
        for node in nodes
    ]
    for node, ref in zip(nodes, calls):
        try:
            problem = ray.get(ref, timeout=PLACEMENT_TIMEOUT_S)
        except (ray.exceptions.RayError, TimeoutError) as err:
            problem = (
                f"Ray node {node[:8]} cannot run a task ({str(err).strip().splitlines()[0][:200]}): see `ray status`"
            )
        if problem:
            raise UserError(problem)


HEAD_GONE = (
    "the Ray cluster's head is gone (its GCS takes no connection), and the aggregator with it; "
    "committed parts are kept: rerun the same command with --resume once the cluster is back"
)
NODE_GONE = (
    "the Ray node of this machine died (its raylet), and the aggregator with it; committed parts are kept: "
    "rerun the same command with --resume (on a cluster, once `ray start` has brought this node back)"
)


def check_cluster(tries: int = 3) -> None:
    """One line when the cluster's head or this machine's Ray node (its raylet) takes no
    connection, asked ``tries`` times a second apart so that one lost connection is not taken
    for a lost node. Asked before anything that needs them: with either gone, Ray's calls
    wait until Ray's driver exits the process, without a word on the terminal."""
    for answers, line in ((head_answers, HEAD_GONE), (node_answers, NODE_GONE)):
        for attempt in range(tries):
            if answers():
                break
            if attempt + 1 < tries:
                time.sleep(1.0)
        else:
            raise UserError(line)


def head_answers(timeout_s: float = 2.0) -> bool:
    """Whether the cluster's head (its GCS) still takes connections. Asked before anything that
    needs it: with the head gone, Ray's calls wait on it until Ray's driver exits the process
    (after 60 s, without a word on the terminal)."""
    try:
        host, _, port = ray.get_runtime_context().gcs_address.rpartition(":")
    except (AttributeError, RuntimeError):  # a Ray Client connection: its driver runs on the cluster
        return True
    return _answers(host.strip("[]"), int(port), timeout_s)


def node_answers(timeout_s: float = 2.0) -> bool:
    """Whether the Ray node this process runs on (its raylet) still takes connections: seen at
    once, where the head marks a node dead only after its health checks fail (seconds)."""
    try:
        node = ray._private.worker.global_worker.node
        host, port = node.node_ip_address, node.node_manager_port
    except AttributeError:  # a Ray Client connection, or another Ray release: not known here
        return True
    return _answers(host, int(port), timeout_s)


def _answers(host: str, port: int, timeout_s: float) -> bool:
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError:
        return False
    return True


ANSI = re.compile(r"\x1b\[[0-9;]*m")
RAY_CALL = re.compile(r"^ray::[\w.]+\(\) \(pid=(\d+), ip=([^,)]+).*$")


def ray_reason(err: BaseException) -> str:
    """Why a Ray call failed, in a few words: Ray's own explanation ("... exit detail: ...",
    "The actor ...") rather than its first line, which may be the call's name in colour codes
    with the actor's pid, address and repr."""
    if (line := user_line(err)) is not None:  # neuroscan's own line, raised in the actor
        return line
    lines = [line.strip() for line in ANSI.sub("", str(err)).splitlines() if line.strip()]
    for line in lines:
        if "exit detail:" in line:
            return line.split("exit detail:", 1)[1].strip()[:300]
    for line in lines:
        if line.startswith("The actor"):
            return line[:300]
    if lines and (call := RAY_CALL.match(lines[0])):
        return f"{lines[0].split(' ')[0].removeprefix('ray::')} failed, pid {call[1]} on {call[2]}"
    return lines[0][:300] if lines else type(err).__name__


def alive_nodes() -> set[str]:
    """The ids of the Ray nodes alive now."""
    return {node["NodeID"] for node in ray.nodes() if node["Alive"]}


INFO = "info"
"""A concurrency group of its own for the actors' ``memory`` call: it answers at once, instead
of waiting behind the micro-batches queued on the actor."""

STAGE_CONCURRENCY = 2
"""Calls a GPU stage actor runs at once: one launching a micro-batch on the device while the
other waits for its copy and hands its result to Ray (`workers.stage`). A CPU stage computes
while it launches, so it runs one call at a time (two only competed for the same cores)."""


RANK_CALLS = 256
"""Calls a tensor-parallel rank takes at once, more than are ever in flight to one stage (a
thread each, started as calls come)."""


def stage_actor(
    cls, group, bundle: int, device: str, name: str, gpus: float = 1.0, direct: bool = False, ranked: bool = False
):
    """``ray.remote(cls)`` pinned to one bundle; it may be restarted and its calls retried.

    With ``direct`` (`workers.handoff`) the actor can hand tensors over through Ray Direct
    Transport, answers ``handoff`` calls in their own concurrency group, and is not restarted:
    a restarted actor is no longer in its pipeline's collective group and has lost the hidden
    states it held, so its death stops the run (resumable) instead. A rank of a tensor-parallel
    stage (``ranked``) is not restarted either (a new process is outside its stage's group), and
    takes every call sent to it at once (`RANK_CALLS`): its calls wait for their turn
    (`workers.stage.Stage.forward`), and one waiting must not keep out the call whose turn it is
    (Ray starts a threaded actor's calls in any order)."""
    concurrency = RANK_CALLS if ranked else STAGE_CONCURRENCY if device == "cuda" else 1
    groups = {GROUP: 2, INFO: 1} if direct else {INFO: 1}
    return ray.remote(enable_tensor_transport=direct, concurrency_groups=groups)(cls).options(
        name=name,
        num_cpus=1,
        max_concurrency=concurrency,
        num_gpus=gpus if device == "cuda" else 0,
        **({"max_restarts": 0} if direct or ranked else RESTARTS),
        scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=bundle),
    )


def aggregator_options() -> dict:
    """Ray options of the aggregator actor: on the driver's node, since it writes ``--out``, a
    path on that node (on a multi-node cluster Ray may otherwise start a CPU-less actor on any
    node, and the tables would land on that node's disk); restarted and retried on a crash."""
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return {"num_cpus": 0, "scheduling_strategy": here, **RESTARTS}


def aggregator_actor(cls, name: str):
    """``ray.remote(cls)`` with `aggregator_options`, answering ``memory`` in its own group."""
    return ray.remote(concurrency_groups={INFO: 1})(cls).options(name=name, **aggregator_options())


def connect(pipelines: list[list], device: str) -> tuple[list[list[str]], list]:
    """Set up direct hand-offs (`workers.handoff`): each pipeline's transport from stage to
    stage, and the collective groups created for them (to destroy at the end)."""
    from ray.experimental.collective import create_collective_group

    transports, groups = [], []
    for pipe in pipelines:
        places = ray.get([actor.__ray_call__.remote(where) for actor in pipe])
        hops = [transport(device, a, b) for a, b in itertools.pairwise(places)]
        if "NCCL" in hops and not all(p.cupy for p in places):
            raise UserError(
                "--handoff direct between stages on different GPUs goes through NCCL, which Ray drives with cupy: "
                "install cupy-cuda12x (or cupy-cuda13x) where the stages run, put stages on one GPU (--gpus-per-stage), "
                "or use --handoff store"
            )
        backend = group_backend(hops)
        if backend:
            groups.append(create_collective_group(pipe, backend=backend))
        transports.append(hops)
    return transports, groups


def disconnect(groups: list) -> None:
    """Forget the collective groups of `connect` once their actors are killed."""
    from ray.experimental.collective import destroy_collective_group

    for group in groups:
        try:
            destroy_collective_group(group)
        except RayActorError:
            pass


def _describe(resources: dict) -> str:
    shown = {k: v for k, v in resources.items() if k in ("CPU", "GPU", "memory") or k.startswith("accelerator")}
    return (
        ", ".join(f"{k}={v / 2**30:.1f} GiB" if k == "memory" else f"{k}={v:g}" for k, v in sorted(shown.items()))
        or "no resources"
    )
