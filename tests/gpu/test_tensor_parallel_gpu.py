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
from tests.reference import assert_scan_matches, reference_scan
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


def test_two_gpu_ranks_write_the_rows_of_the_forward_pass(gpu_ray, tmp_path, tiny_model):
    """float32 on the GPUs, against the plain model's float32 forward pass on the CPU: one GPU a
    stage and two ranks a stage each match it, within the float32 tolerance at near ties."""
    import json

    corpus = sequence_corpus(tmp_path / "prompts.jsonl", 48, seed=2)
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    reference = reference_scan(tiny_model, texts)
    sel = Selection(high=0.5, low=-0.1, max_per_layer=40)
    for ranks in (1, 2):
        out = tmp_path / f"tp{ranks}"
        cfg = ScanConfig(
            prompts=str(corpus),
            out=str(out),
            device="cuda",
            dtype="float32",
            tensor_parallel=ranks,
            selection=sel,
            quiet=True,
            verify=0,
        )
        assert run_scan(cfg).tensor_parallel == ranks
        assert assert_scan_matches(out, reference, sel, tol=1e-3) > 0
