"""What a stage needs on its device, from the checkpoint's headers, and the line when it does not fit."""

from __future__ import annotations

import pytest
import torch

import workers.stage
from neuroscan.errors import UserError
from workers.checkpoint import load_config
from workers.footprint import Footprint, check_fits, footprint, free_bytes
from workers.shard import ShardSpec, load_stage
from workers.stage import Stage, StageSpec


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("bounds", [[(0, 5)], [(0, 2), (2, 5)]], ids=["1 stage", "2 stages"])
def test_the_counted_weights_are_the_loaded_stages_parameters(other_model, read_log, bounds, dtype):
    """Counted from the headers alone (no tensor read), equal to what `load_stage` holds."""
    config = load_config(other_model)
    for start, stop in bounds:
        shard = ShardSpec(start, stop, config.n_layer)
        need = footprint(str(other_model), config, shard, dtype, "cpu")
        on_gpu = footprint(str(other_model), config, shard, dtype, "cuda")
        assert read_log == []  # headers only
        model = load_stage(str(other_model), config, shard, "cpu", dtype)
        read_log.clear()
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        assert need.weights == weights
        assert need.buffers == sum(b.numel() * b.element_size() for b in model.buffers())
        # the checkpoint is float32: read at another dtype, it is held as read (4 bytes an element) while loading
        assert need.reading == (0 if dtype == torch.float32 else 2 * weights)
        assert on_gpu.reading == 0 and on_gpu.weights == weights
        size = torch.finfo(dtype).bits // 8
        assert need.tokens == config.n_positions
        assert need.working == config.n_positions * (3 * config.n_inner + 8 * config.n_embd) * size
        assert need.total == need.weights + need.buffers + need.reading + need.working


def test_the_line_names_the_stage_the_sizes_and_what_helps():
    need = Footprint(weights=6 << 30, buffers=1 << 20, reading=0, working=(1 << 30) // 4, tokens=2048)
    shard = ShardSpec(14, 28, 28)
    check_fits(need, need.total, shard, "float16", "cuda:0 of gpu1", "cuda")  # exactly enough fits
    with pytest.raises(UserError) as err:
        check_fits(need, need.total - 1, shard, "float32", "cuda:0 of gpu1", "cuda")
    assert str(err.value) == (
        "the stage of layers 14-27 (of 28) needs 6.3 GiB on cuda:0 of gpu1 but 6.3 GiB is free "
        "(6.0 GiB of weights at float32, 256.0 MiB to run a 2,048-token prompt): "
        "use more --stages or a 16-bit --dtype (bfloat16 or float16), or free the GPU"
    )
    one_layer, on_cpu = ShardSpec(27, 28, 28), Footprint(6 << 30, 0, 3 << 30, 1 << 28, 2048)
    with pytest.raises(UserError, match=r"to run a 2,048-token prompt\): free the GPU$"):
        check_fits(need, 3 << 30, one_layer, "bfloat16", "cuda:0 of gpu1", "cuda")  # a one-layer stage splits no more
    with pytest.raises(UserError) as err:
        check_fits(on_cpu, 1000, shard, "float32", "cpu of box", "cpu")
    assert str(err.value).endswith(
        "needs 9.2 GiB on cpu of box but 1,000 bytes is free (6.0 GiB of weights at float32 and 3.0 GiB more "
        "while they load, 256.0 MiB to run a 2,048-token prompt): "
        "use a 16-bit --dtype (bfloat16 or float16), or free memory on that node"
    )  # on a CPU more stages share the same memory: not suggested


def test_a_stage_that_does_not_fit_stops_before_loading(other_model, monkeypatch):
    assert free_bytes(torch.device("cpu")) > 0
    config = load_config(other_model)
    monkeypatch.setattr(workers.stage, "FAULT_MEMORY_BYTES", 1 << 20)
    monkeypatch.setattr(workers.stage, "load_stage", lambda *a: pytest.fail("loaded although it does not fit"))
    stage = Stage(StageSpec(str(other_model), ShardSpec(2, 5, config.n_layer), "cpu", "float32"))
    with pytest.raises(
        UserError, match=r"^the stage of layers 2-4 \(of 5\) needs [\d.]+ MiB on cpu of .+ but 1\.0 MiB is free \("
    ):
        stage.setup()
    assert stage.model is None
