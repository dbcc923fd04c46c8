"""Every family's stage on CUDA (the fused reduction, the side stream) against its CPU stage."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("preset", ["tiny-neox", "tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-gpt2"])
def test_a_gpu_stage_of_each_family_gives_the_cpu_stage_rows(preset, tmp_path):
    """fp32 on both: the same kept rows but for the few rounding moves across a threshold, the
    same max_act and, gated, the same up values within float32 rounding."""
    from prompts.batching import micro_batches
    from workers.checkpoint import load_config, load_tokenizer
    from workers.embedded import preset_config, write_checkpoint
    from workers.families import context, n_layers
    from workers.shard import ShardSpec
    from workers.stage import Stage, StageSpec

    model = write_checkpoint(preset_config(preset), tmp_path / "m")
    config = load_config(model)
    shard = ShardSpec(0, n_layers(config), n_layers(config))
    gpu, cpu = (Stage(StageSpec(str(model), shard, d, "float32")) for d in ("cuda", "cpu"))
    assert gpu.setup()["reduction"] == "fused" and cpu.setup()["reduction"] == "eager"
    compared = 0
    for batch, _ in micro_batches("seed", load_tokenizer(model), context(config), 2048, False):
        (_, a), (_, b) = gpu.forward(batch), cpu.forward(batch)
        keys = [
            list(zip(r.rows["layer_offset"].tolist(), r.rows["row"].tolist(), r.rows["neuron"].tolist()))
            for r in (a, b)
        ]
        assert len(set(keys[0]) ^ set(keys[1])) <= 0.002 * len(keys[1])
        where = {key: i for i, key in enumerate(keys[0])}
        for j, key in enumerate(keys[1]):
            if key in where:
                i = where[key]
                assert abs(a.rows["max_act"][i] - b.rows["max_act"][j]) < 1e-3 * max(1.0, abs(b.rows["max_act"][j]))
                for name in ("up_at_max", "up_at_min") if "up_at_max" in b.rows else ():
                    assert np.isclose(a.rows[name][i], b.rows[name][j], rtol=1e-3, atol=1e-3), name
                compared += 1
    assert compared > 100
