"""``--handoff direct`` on a real GPU: two stages sharing it hand the hidden state over by CUDA IPC
(no copy) and write the tables that the object store gives. Needs Ray (`bench/device.sh`
carries it); run on its own (``pytest -m gpu tests/gpu/test_handoff_gpu.py``) since it starts
a Ray that sees the real GPU instead of the tests' logical ones."""

from __future__ import annotations

import logging

import pytest
import torch

from cluster.driver import run_scan
from neuroscan.config import ScanConfig, Selection
from tests.same_output import assert_same_output, sequence_corpus

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_the_next_stage_gets_the_same_hidden_state_from_the_host_or_the_device(tiny_model, dtype):
    """Through the host the hidden state is pinned before the stage's lock (bfloat16 as its int16
    bits); kept on the device it is the tensor itself: the second stage's rows are identical."""
    import numpy as np

    from prompts.batching import micro_batches
    from workers.checkpoint import load_config, load_tokenizer
    from workers.shard import ShardSpec
    from workers.stage import Stage, StageSpec

    config = load_config(tiny_model)
    half = config.n_layer // 2

    def stage(start, stop, keep):
        s = Stage(StageSpec(str(tiny_model), ShardSpec(start, stop, config.n_layer), "cuda", dtype, keep_hidden=keep))
        s.setup()
        return s

    first_host, first_kept, second = stage(0, half, False), stage(0, half, True), stage(half, config.n_layer, False)
    batches = [b for b, _ in micro_batches("seed", load_tokenizer(tiny_model), config.n_positions, 2048, False)]
    for batch in batches:
        h_host, _ = first_host.forward(batch)
        h_kept, _ = first_kept.forward(batch)
        assert isinstance(h_host.data, np.ndarray) and h_kept.data.is_cuda
        assert np.array_equal(
            h_host.data, h_kept.data.cpu().view(torch.int16 if dtype == "bfloat16" else torch.float16).numpy()
        )
        (_, want), (_, got) = second.forward(batch, h_host), second.forward(batch, h_kept)
        for name in want.rows:
            assert np.array_equal(got.rows[name], want.rows[name]), name
        assert np.array_equal(got.predictions["top_probs"], want.predictions["top_probs"])


@pytest.fixture(scope="module")
def gpu_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    yield ray
    ray.shutdown()


def test_two_stages_on_one_gpu_hand_over_by_cuda_ipc_with_the_same_tables(gpu_ray, tmp_path):
    corpus = sequence_corpus(tmp_path / "prompts.jsonl", 300, seed=3)

    def scan(out, handoff):
        cfg = ScanConfig(
            prompts=str(corpus),
            out=str(tmp_path / out),
            stages=2,
            device="cuda",
            gpus_per_stage=0.5,
            handoff=handoff,
            batch_tokens=1024,
            rows_per_part=3000,
            quiet=True,
            selection=Selection(max_per_layer=5),
        )
        return run_scan(cfg).to_dict()

    scan("store", "store")
    manifest = scan("direct", "direct")
    assert manifest["timings"]["transports"] == [["CUDA_IPC"]]
    assert_same_output(tmp_path / "direct", tmp_path / "store")
