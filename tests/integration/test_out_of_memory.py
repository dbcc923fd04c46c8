"""Out-of-memory micro-batches, and stages too large for their device, through the real command
(injected on CPU).

NEUROSCAN_FAULT_OOM_TOKENS=N makes every stage act as if a micro-batch of more than N
padded tokens ran out of device memory; NEUROSCAN_FAULT_MEMORY_BYTES=N as if its device had N
bytes free when it is about to load.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest

ROOT = Path(__file__).resolve().parents[2]
LONG_ID = "long-one"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    rows = [{"id": f"s{i}", "text": f"short prompt number {i}" + " ok" * i} for i in range(8)]
    rows.insert(3, {"id": LONG_ID, "text": "a long prompt " * 20})
    path = tmp_path_factory.mktemp("oom") / "c.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def scan(
    corpus: Path, out: Path, limit: int | None, *flags: str, env: dict | None = None
) -> subprocess.CompletedProcess:
    env = dict(env or os.environ)
    if limit:
        env["NEUROSCAN_FAULT_OOM_TOKENS"] = str(limit)
    cmd = [
        sys.executable,
        "-m",
        "cluster.cli",
        "scan",
        str(corpus),
        "--out",
        str(out),
        "--stages",
        "2",
        "--max-per-layer",
        "20",
        "--quiet",
        *flags,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


def rows_by_key(out: Path) -> dict:
    table = ds.dataset(out / "activations").to_table().to_pylist()
    return {(r["prompt_id"], r["layer"], r["neuron"]): r for r in table}


@pytest.fixture(scope="module")
def clean(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clean") / "out"
    assert scan(corpus, out, None).returncode == 0
    return out


def test_stop_names_the_prompt_and_leaves_a_valid_manifest(corpus, tmp_path):
    result = scan(corpus, tmp_path / "out", 200)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert f"prompt '{LONG_ID}' (280 tokens) does not fit in device memory even alone" in result.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["status"] == "running"


@pytest.mark.parametrize("handoff", ["store", "direct"])
def test_skip_leaves_out_only_that_prompt(corpus, clean, tmp_path, handoff):
    """Also when the hidden state goes to the second stage as a tensor (``--handoff direct``): it
    splits that tensor, and the first stage's error also ends that micro-batch's hand-off (else
    the hand-off of its rerun, for the same micro-batch id, would wait behind it)."""
    out = tmp_path / "out"
    result = scan(corpus, out, 200, "--on-error", "skip", "--handoff", handoff)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "skipped 1 prompts" in result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert [(s["prompt_id"], s["id"]) for s in manifest["skipped"]] == [(3, LONG_ID)]
    assert manifest["totals"]["prompts"] == 8
    prompts = ds.dataset(out / "prompts").to_table()
    assert sorted(prompts["prompt_id"].to_pylist()) == [0, 1, 2, 4, 5, 6, 7, 8]
    got, want = rows_by_key(out), rows_by_key(clean)
    assert set(got) == {k for k in want if k[0] != 3}  # split micro-batches give the same rows
    for key, row in got.items():
        assert abs(row["max_act"] - want[key]["max_act"]) < 1e-4
        assert row["bands"] == want[key]["bands"]
    layers = ds.dataset(out / "layers").to_table()
    assert 3 not in set(layers["prompt_id"].to_pylist())
    assert np.isclose(manifest["summary"]["layers"]["0"]["mean_kept"], 20)


def test_a_stage_too_large_for_its_device_stops_the_scan_in_one_line_before_loading(corpus, tmp_path):
    """Each stage checks what it needs against what its device has free before reading any
    weight; the first that does not fit stops the start with its line, Ray's wrapping and
    traceback left out, and nothing is committed."""
    ray_tmp = tempfile.mkdtemp(prefix="rm", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_TMPDIR": ray_tmp, "NEUROSCAN_FAULT_MEMORY_BYTES": str(1 << 20)}
    try:
        result = scan(corpus, tmp_path / "out", None, env=env)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stdout == ""
    line = (
        r"neuroscan: error: the stage of layers (0-13|14-27) \(of 28\) needs [\d.]+ MiB on cpu of \S+ \(Ray node \w{8}\) "
        r"but 1\.0 MiB is free \([\d.]+ MiB of weights at float32, [\d.]+ MiB to run a 2,048-token prompt\): "
        r"use a 16-bit --dtype \(bfloat16 or float16\), or free memory on that node\n"
    )
    assert re.fullmatch(line, result.stderr), result.stderr
    assert not any((tmp_path / "out").glob("**/*"))  # no manifest, no part
