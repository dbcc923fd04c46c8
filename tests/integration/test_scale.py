"""Reading and writing stream: a 10x larger corpus does not need more memory.

Two scans of the embedded model in fresh processes (each with its own Ray), 2,000 and
20,000 prompts of one length (so both see the same micro-batch shapes). In the second,
every process's private memory, sampled after each micro-batch, and the driver's and the
aggregator's peak RSS stay within 20% of the first. A stage's peak RSS is set by the
transient memory of one forward pass (bounded by --batch-tokens, whatever the corpus) and
varies by about +-15% from run to run with glibc's heap, so it is reported, not compared.
The larger corpus is over the plan's `cluster.driver.KEEP_PROMPTS`, so the run keeps its first
chunks and streams the rest (most of it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from cluster import driver

ROOT = Path(__file__).resolve().parents[2]


def scan_memory(tmp_path: Path, n: int) -> dict:
    corpus = tmp_path / f"c{n}.jsonl"
    # Same length for every prompt, so both runs see the same micro-batch shapes.
    corpus.write_text("".join(json.dumps({"text": f"n{i:05d} ok"}) + "\n" for i in range(n)))
    out = tmp_path / f"out{n}"
    cmd = [
        sys.executable,
        "-m",
        "cluster.cli",
        "scan",
        str(corpus),
        "--out",
        str(out),
        "--max-per-layer",
        "5",
        "--rows-per-part",
        "50000",
        "--quiet",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=os.environ.copy(), timeout=1200)
    assert result.returncode == 0, result.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["totals"]["prompts"] == n
    assert manifest["totals"]["activation_rows"] == n * 28 * 5
    memory = manifest["timings"]["memory"]
    return {"driver": memory["driver"], "aggregator": memory["aggregator"], "stage": memory["stages"][0]}


def test_peak_memory_does_not_grow_with_the_corpus(tmp_path):
    assert 20_000 > driver.KEEP_PROMPTS  # the large run reads its corpus streaming
    small, large = scan_memory(tmp_path, 2_000), scan_memory(tmp_path, 20_000)
    print(json.dumps({"2000": small, "20000": large}, indent=1))
    checks = [(p, "peak_anon_mb") for p in small] + [("driver", "peak_rss_mb"), ("aggregator", "peak_rss_mb")]
    for process, metric in checks:
        assert large[process][metric] <= 1.2 * small[process][metric], (process, metric, small[process], large[process])
