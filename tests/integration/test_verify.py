"""The fidelity check (``--verify``) on real scans: a clean scan passes it, a scan whose
weights were silently changed fails it and names the layer.

NEUROSCAN_FAULT_PERTURB_LAYER=k makes the stage that owns block k scale that block's MLP
input weights once loaded (`workers.stage`); the variable reaches the stage actors through the
environment of the Ray the command starts, so those scans run the real command.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from cluster.driver import run_scan
from neuroscan.config import ScanConfig
from neuroscan.manifest import damaged_files, read_manifest
from tests.conftest import CORPUS

ROOT = Path(__file__).resolve().parents[2]


def scan_command(corpus: Path, out: Path, env: dict) -> subprocess.CompletedProcess:
    ray_tmp = tempfile.mkdtemp(prefix="rv", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    cmd = [sys.executable, "-m", "cluster.cli", "scan", str(corpus), "--out", str(out), "--stages", "2", "--quiet"]
    try:
        return subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={**os.environ, "RAY_ADDRESS": "", "RAY_TMPDIR": ray_tmp, **env},
            timeout=600,
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_a_clean_scan_passes_and_verify_zero_checks_nothing(ray_session, tmp_path, corpus):
    manifest = run_scan(ScanConfig(prompts=str(corpus), out=str(tmp_path / "a"), stages=3, verify=4, quiet=True))
    check = manifest.verification
    assert check.passed and check.failed() == [] and check.device == "cpu"
    assert len(check.prompts) == 4 and set(check.prompts) <= set(range(len(CORPUS)))
    assert (check.atol, check.rtol) == (1e-3, 1e-3) and set(check.layers) == {str(k) for k in range(28)}
    assert all(c.off == 0 and c.pairs > 0 and c.max_diff < 1e-3 for c in check.layers.values())
    assert read_manifest(tmp_path / "a") == manifest and manifest.complete
    unchecked = run_scan(ScanConfig(prompts=str(corpus), out=str(tmp_path / "b"), verify=0, quiet=True))
    assert unchecked.verification is None
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["verification"] is None


def test_perturbed_weights_fail_the_check_from_their_layer_and_the_tables_stay(tmp_path, corpus):
    out = tmp_path / "out"
    result = scan_command(corpus, out, {"NEUROSCAN_FAULT_PERTURB_LAYER": "17"})
    assert result.returncode == 3, result.stderr[-2000:]
    assert result.stdout == "" and "Traceback" not in result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith("fidelity check FAILED from layer 17 (") and "report it with this manifest.json" in last
    manifest = read_manifest(out)
    assert manifest.complete and not manifest.verification.passed
    failed = manifest.verification.failed()
    assert failed[0] == 17 and all(manifest.verification.layers[str(k)].off == 0 for k in range(17))
    assert manifest.totals.prompts == len(CORPUS) and damaged_files(out, manifest, hashes=True) == []
