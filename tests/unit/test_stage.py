"""The plain Stage class (no Ray): stages chained equal the whole model, hooks are scoped."""

from __future__ import annotations

import numpy as np
import torch

from cluster.config import Selection
from prompts.batching import MicroBatch
from workers.checkpoint import load_config
from workers.rows import Hidden
from workers.shard import ShardSpec
from workers.stage import Stage, StageSpec


def one_batch(d_model: int) -> tuple[MicroBatch, Hidden]:
    gen = np.random.default_rng(0)
    lengths = np.array([9, 4], dtype=np.int32)
    ids = gen.integers(0, 256, size=(2, 9)).astype(np.int32)
    batch = MicroBatch(0, np.array([0, 1]), ids, lengths, lengths, np.zeros((2, 0), dtype=np.int32))
    hidden = Hidden(gen.standard_normal((2, 9, d_model)).astype(np.float32), "float32")
    return batch, hidden


def _stages(path, bounds, n_layers):
    stages = [Stage(StageSpec(str(path), ShardSpec(a, b, n_layers), "cpu", "float32", Selection())) for a, b in bounds]
    for s in stages:
        s.setup()
    return stages


def test_split_stages_are_bit_identical_to_one_stage(other_model):
    n = load_config(other_model).n_layer
    batch, _ = one_batch(0)
    results = []
    for bounds in ([(0, n)], [(0, 2), (2, 4), (4, n)]):
        hidden, rows = None, []
        for stage in _stages(other_model, bounds, n):
            hidden, r = stage.forward(batch, hidden)
            rows.append(r)
        results.append(rows)
    whole, split = results[0][0], results[1]
    for name in ("neuron", "max_act", "min_act", "max_pos", "n_above", "bands"):
        assert np.array_equal(whole.rows[name], np.concatenate([r.rows[name] for r in split])), name
    assert np.array_equal(whole.predictions["top_probs"], split[-1].predictions["top_probs"])


def test_hooks_are_removed_after_each_forward(other_model):
    [stage] = _stages(other_model, [(0, 2)], load_config(other_model).n_layer)
    batch, _ = one_batch(0)
    stage.forward(batch)
    assert all(not block.mlp.act._forward_hooks for block in stage.model.body.h)


def test_rows_are_compacted_and_per_prompt_counts_agree(other_model):
    [stage] = _stages(other_model, [(0, 2)], load_config(other_model).n_layer)
    batch, _ = one_batch(0)
    hidden, rows = stage.forward(batch)
    assert hidden.data.shape == (2, 9, load_config(other_model).n_embd)
    n_kept = rows.per_prompt["n_kept"]  # [layers, batch]
    assert n_kept.shape == (2, 2)
    for layer in range(2):
        for row in range(2):
            hits = (rows.rows["layer_offset"] == layer) & (rows.rows["row"] == row)
            assert hits.sum() == n_kept[layer, row]
    assert rows.rows["bands"].shape[1] == 3  # ceil(9 / 4) bytes for the longest row
    assert rows.predictions is None


def test_the_one_host_buffer_layout_gives_back_every_tensor():
    from workers.transfer import layout, pack, unpack

    tensors = [torch.arange(5, dtype=torch.int16), torch.randn(3, 4), torch.zeros(0, 7, dtype=torch.int32),
               torch.tensor([True, False, True]), torch.randn(2, 3).to(torch.bfloat16), torch.randint(0, 255, (2, 3, 5), dtype=torch.uint8)]
    offsets, total = layout(tensors)
    assert all(o % 16 == 0 for o in offsets) and total % 16 == 0
    arrays = unpack(pack(tensors, offsets, total), tensors, offsets)
    for t, a in zip(tensors, arrays):
        expected = t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
        assert a.dtype == expected.dtype and a.shape == expected.shape and (a == expected).all()


def test_two_threads_calling_one_stage_get_the_rows_of_sequential_calls(other_model):
    """Ray runs a stage actor's calls two at a time: launches take turns on the stage's lock,
    so each call still sees only its own micro-batch's activations."""
    from concurrent.futures import ThreadPoolExecutor

    [stage] = _stages(other_model, [(0, 3)], load_config(other_model).n_layer)
    gen = np.random.default_rng(1)
    batches = []
    for i in range(6):
        lengths = gen.integers(2, 12, size=3).astype(np.int32)
        ids = gen.integers(0, 256, size=(3, int(lengths.max()))).astype(np.int32)
        batches.append(MicroBatch(i, np.arange(3) + 3 * i, ids, lengths, lengths, np.zeros((3, 0), dtype=np.int32)))
    sequential = [stage.forward(b) for b in batches]
    with ThreadPoolExecutor(2) as pool:
        concurrent = list(pool.map(stage.forward, batches))
    for (h1, r1), (h2, r2) in zip(sequential, concurrent):
        assert r1.batch_id == r2.batch_id
        assert np.array_equal(h1.data, h2.data)
        for name in r1.rows:
            assert np.array_equal(r1.rows[name], r2.rows[name]), name
        for name in r1.per_prompt:
            assert np.array_equal(r1.per_prompt[name], r2.per_prompt[name]), name
    assert all(not block.mlp.act._forward_hooks for block in stage.model.body.h)
