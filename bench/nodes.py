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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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
    rows = []
    for nodes in range(1, cfg.nodes + 1):
        rows.append(_one(cfg, model, corpus, nodes))
    for row in rows:
        row["ratio_to_one_node"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
    return {"stages": STAGES, "prompts": cfg.prompts, "prompt_tokens": cfg.prompt_tokens, "rows": rows}


def _one(cfg: BenchConfig, model: str | None, corpus: Path, nodes: int) -> dict:
    from ray.cluster_utils import Cluster

    ray_tmp = tempfile.mkdtemp(prefix="rb", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    saved = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = ray_tmp
    try:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        for _ in range(nodes):
            cluster.add_node(num_cpus=STAGES, object_store_memory=256 << 20)
    finally:
        if saved is None:
            os.environ.pop("RAY_TMPDIR")
        else:
            os.environ["RAY_TMPDIR"] = saved
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out"
            command = [sys.executable, "-m", "cluster.cli", "scan", str(corpus), "--out", str(out), "--quiet"]
            command += ["--stages", str(STAGES), "--replicas", str(nodes), "--batch-tokens", str(cfg.batch_tokens)]
            command += ["--model", model] if model else []
            t0 = time.perf_counter()
            done = subprocess.run(
                command, env={**env, "RAY_ADDRESS": cluster.address}, capture_output=True, text=True, timeout=3600
            )
            wall = time.perf_counter() - t0
            if done.returncode != 0:
                raise UserError(f"the {nodes}-node scan failed: {done.stderr.strip().splitlines()[-1]}")
            timings = json.loads((out / "manifest.json").read_text())["timings"]
    finally:
        cluster.shutdown()
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
