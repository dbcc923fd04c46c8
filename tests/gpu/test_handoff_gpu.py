"""``--handoff direct`` on a real GPU: two stages sharing it hand the hidden state over by CUDA IPC
(no copy) and write the tables that the object store gives. Needs Ray (`bench/device.sh`
carries it); run on its own (``pytest -m gpu tests/gpu/test_handoff_gpu.py``) since it starts
a Ray that sees the real GPU instead of the tests' logical ones."""

from __future__ import annotations

import logging

import pytest
import torch

from cluster.config import ScanConfig, Selection
from cluster.driver import run_scan
from tests.same_output import assert_same_output, sequence_corpus

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def gpu_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    yield ray
    ray.shutdown()


def test_two_stages_on_one_gpu_hand_over_by_cuda_ipc_with_the_same_tables(gpu_ray, tmp_path):
    corpus = sequence_corpus(tmp_path / "prompts.jsonl", 300, seed=3)

    def scan(out, handoff):
        cfg = ScanConfig(prompts=str(corpus), out=str(tmp_path / out), stages=2, device="cuda", gpus_per_stage=0.5,
                         handoff=handoff, batch_tokens=1024, rows_per_part=3000, progress=False, selection=Selection(max_per_layer=5))
        return run_scan(cfg)

    scan("store", "store")
    manifest = scan("direct", "direct")
    assert manifest["timings"]["transports"] == [["CUDA_IPC"]]
    assert_same_output(tmp_path / "direct", tmp_path / "store")
