"""``--tensor-parallel 2`` on two real GPUs of one machine: the stage's ranks are one NCCL group,
AutoTP's sums and the reduction's gathers go through NCCL, and the rows are those of one GPU a
stage. Skipped with fewer than two GPUs. Run on its own (``pytest -m gpu
tests/gpu/test_tensor_parallel_gpu.py``): it starts a Ray that sees the real GPUs."""

from __future__ import annotations

import logging

import pytest
import torch

from cluster.driver import run_scan
from neuroscan.config import ScanConfig, Selection
from tests.reference import assert_same_rows
from tests.same_output import sequence_corpus

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices"),
]


@pytest.fixture(scope="module")
def gpu_ray():
    ray = pytest.importorskip("ray")
    pytest.importorskip("deepspeed")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    yield ray
    ray.shutdown()


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-3), ("float16", 2e-2)])
def test_two_gpu_ranks_write_the_rows_of_one_gpu(gpu_ray, tmp_path, dtype, tol):
    corpus = sequence_corpus(tmp_path / "prompts.jsonl", 96, seed=2)
    outs = {}
    for ranks in (1, 2):
        outs[ranks] = tmp_path / f"tp{ranks}"
        cfg = ScanConfig(
            prompts=str(corpus),
            out=str(outs[ranks]),
            device="cuda",
            dtype=dtype,
            tensor_parallel=ranks,
            selection=Selection(high=0.5, low=-0.1, max_per_layer=40),
            quiet=True,
            verify=0,
        )
        assert run_scan(cfg).tensor_parallel == ranks
    assert assert_same_rows(outs[2], outs[1], tol) > 0
