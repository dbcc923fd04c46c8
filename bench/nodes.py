"""``neuroscan bench --nodes N``: the same scan on Ray clusters of 1 to N worker nodes.

Each cluster is started on this machine (`ray.cluster_utils.Cluster`: a head and N worker
nodes, each its own raylet and object store) and holds one replica a node: every worker node
has as many logical CPUs as a replica has stages. The scan runs as a user runs it,
``neuroscan scan`` with RAY_ADDRESS set to the cluster, so the start-up figure is what a user
waits for before the first micro-batch: joining the cluster, placing the stages, checking the
other nodes, loading the weights (plus reading the corpus, the same for every node count).
On one machine the nodes share its cores: the figures show what placement and the network
path between nodes cost, not the scaling of separate machines.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest.mock import patch

from neuroscan.config import BenchConfig
from neuroscan.errors import UserError

STAGES = 2
"""Stages a replica, as the multi-node tests place them."""


def run_nodes_bench(cfg: BenchConfig, model: str | None, corpus: Path) -> dict:
    """One row a node count: start-up, scan time, tokens/s, and the ratio to one node."""
    if cfg.device != "cpu":
        raise UserError(
            "--nodes starts its Ray nodes on this machine, where they would share its GPUs: use --device cpu "
            "(on GPU nodes, compare `neuroscan scan --replicas R` runs on the real cluster)"
        )
    rows = [_one(cfg, model, corpus, nodes) for nodes in range(1, cfg.nodes + 1)]
    for row in rows:
        row["ratio_to_one_node"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
    return {"stages": STAGES, "prompts": cfg.prompts, "prompt_tokens": cfg.prompt_tokens, "rows": rows}


def start_cluster(tmp: str, **head_args):
    """A `ray.cluster_utils.Cluster` head on this machine, its sessions and its address file
    under ``tmp`` (not the machine's /tmp/ray, which `ray status` and ``RAY_ADDRESS=auto``
    read); add nodes with `add_node`. Its ``shutdown()`` resets the calling process's Ray state
    as well (its internal key-value client, its cluster address): call it where this process
    is connected to no other Ray."""
    from ray.cluster_utils import Cluster

    with patch.dict(os.environ, RAY_TMPDIR=tmp):
        cluster = Cluster(initialize_head=True, head_node_args=head_args)
    cluster.tmp = tmp
    return cluster


def add_node(cluster, **node_args):
    with patch.dict(os.environ, RAY_TMPDIR=cluster.tmp):
        return cluster.add_node(**node_args)


def _one(cfg: BenchConfig, model: str | None, corpus: Path, nodes: int) -> dict:
    ray_tmp = tempfile.mkdtemp(prefix="rb", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    cluster = start_cluster(ray_tmp, num_cpus=1, include_dashboard=False)
    try:
        for _ in range(nodes):
            add_node(cluster, num_cpus=STAGES, object_store_memory=256 << 20)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out"
            command = [
                sys.executable,
                "-m",
                "cluster.cli",
                "scan",
                str(corpus),
                "--out",
                str(out),
                "--quiet",
                "--verify",
                "0",
            ]
            command += ["--stages", str(STAGES), "--replicas", str(nodes), "--batch-tokens", str(cfg.batch_tokens)]
            command += ["--model", model] if model else []
            t0 = time.perf_counter()
            done = subprocess.run(
                command,
                env={**os.environ, "RAY_ADDRESS": cluster.address},
                capture_output=True,
                text=True,
                timeout=3600,
            )
            wall = time.perf_counter() - t0
            if done.returncode != 0:
                raise UserError(f"the {nodes}-node scan failed: {done.stderr.strip().splitlines()[-1]}")
            timings = json.loads((out / "manifest.json").read_text())["timings"]
    finally:
        cluster.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return {
        "nodes": nodes,
        "replicas": nodes,
        "wall_s": wall,
        "startup_s": wall - timings["seconds"],
        "scan_s": timings["seconds"],
        "tokens_per_s": timings["tokens_per_s"],
    }


def table(report: dict) -> str:
    lines = [
        f"{report['prompts']} prompts of {report['prompt_tokens']} tokens, {report['stages']} stages a replica, "
        "one replica a node (nodes on one machine)",
        "nodes  start-up s  scan s  tokens/s  vs 1 node",
    ]
    for r in report["rows"]:
        lines.append(
            f"{r['nodes']:5d}  {r['startup_s']:10.1f}  {r['scan_s']:6.1f}  {r['tokens_per_s']:8,.0f}  "
            f"{r['ratio_to_one_node']:8.2f}x"
        )
    return "\n".join(lines)
