"""``--verify`` on a real GPU: half-precision scans of the tiny and the demo model pass the
fidelity check, run by the driver on the GPU in float32. Run on its own (``pytest -m gpu
tests/gpu/test_verify_gpu.py``) since it starts a Ray that sees the real GPU."""

from __future__ import annotations

import logging

import pytest
import torch

from cluster.driver import run_scan
from neuroscan.config import ScanConfig
from tests.same_output import sequence_corpus

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def gpu_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    yield ray
    ray.shutdown()


@pytest.mark.parametrize("model", [None, "demo"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_half_precision_scan_passes_its_check_on_the_gpu(gpu_ray, tmp_path, model, dtype):
    corpus = sequence_corpus(tmp_path / "prompts.jsonl", 64, seed=5)
    cfg = ScanConfig(
        prompts=str(corpus), out=str(tmp_path / "out"), model=model, device="cuda", dtype=dtype, quiet=True
    )
    check = run_scan(cfg).verification
    assert check.device == "cuda" and len(check.prompts) == 16
    worst = max(check.layers.values(), key=lambda c: c.off / max(c.pairs, 1))
    assert check.passed, worst
