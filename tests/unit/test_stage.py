"""The plain Stage class (no Ray): stages chained equal the whole model, hooks are scoped."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import workers.stage
from neuroscan.errors import UserError
from neuroscan.messages import Hidden, MicroBatch
from workers.checkpoint import load_config
from workers.shard import ShardSpec
from workers.split import PromptTooLarge
from workers.stage import Stage, StageSpec


def one_batch(d_model: int) -> tuple[MicroBatch, Hidden]:
    gen = np.random.default_rng(0)
    lengths = np.array([9, 4], dtype=np.int32)
    ids = gen.integers(0, 256, size=(2, 9)).astype(np.int32)
    batch = MicroBatch(0, np.array([0, 1]), ids, lengths, lengths, np.zeros((2, 0), dtype=np.int32))
    hidden = Hidden(gen.standard_normal((2, 9, d_model)).astype(np.float32), "float32")
    return batch, hidden


def _stages(path, bounds, n_layers):
    stages = [Stage(StageSpec(str(path), ShardSpec(a, b, n_layers), "cpu", "float32")) for a, b in bounds]
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


def test_a_stage_on_a_node_without_the_model(tmp_path, monkeypatch, tiny_model):
    """On a cluster a stage reads the model at the driver's path, on its own node: the embedded
    model is built there (the same bytes), any other is named with the fix."""
    from workers.embedded import embedded_model_path

    missing = tmp_path / "models" / "gpt-j-6b"
    with pytest.raises(UserError, match=rf"the model is not at {missing} on node [^:]+: every node of the Ray cluster"):
        _stages(missing, [(0, 2)], 28)
    monkeypatch.setenv("NEUROSCAN_CACHE", str(tmp_path / "node-cache"))  # this node has no embedded model yet
    here = embedded_model_path()
    assert not here.exists()
    [stage] = _stages(here, [(0, 2)], 28)
    assert stage.model.body.h[0].mlp.fc_in.weight.equal(
        _stages(tiny_model, [(0, 2)], 28)[0].model.body.h[0].mlp.fc_in.weight
    )


def test_hooks_are_removed_after_each_forward(other_model):
    [stage] = _stages(other_model, [(0, 2)], load_config(other_model).n_layer)
    batch, _ = one_batch(0)
    stage.forward(batch)
    assert all(not block.mlp.fc_out._forward_pre_hooks for block in stage.model.blocks)


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

    tensors = [
        torch.arange(5, dtype=torch.int16),
        torch.randn(3, 4),
        torch.zeros(0, 7, dtype=torch.int32),
        torch.tensor([True, False, True]),
        torch.randn(2, 3).to(torch.bfloat16),
        torch.randint(0, 255, (2, 3, 5), dtype=torch.uint8),
    ]
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
    assert all(not block.mlp.fc_out._forward_pre_hooks for block in stage.model.blocks)


def test_a_direct_hand_off_gives_the_next_stage_what_forward_gives_it(other_model):
    """`Stage.scan` keeps the hidden state on the device for `Stage.handoff`; the next stage's
    rows are the same as when the hidden state goes through host memory."""
    n = load_config(other_model).n_layer
    batch, _ = one_batch(0)
    host = _stages(other_model, [(0, 2), (2, n)], n)
    h, _ = host[0].forward(batch)
    _, want = host[1].forward(batch, h)
    kept = [
        Stage(StageSpec(str(other_model), ShardSpec(a, b, n), "cpu", "float32", keep_hidden=True))
        for a, b in [(0, 2), (2, n)]
    ]
    for stage in kept:
        stage.setup()
    first_rows = kept[0].scan(batch)
    tensor = kept[0].handoff((batch.job, batch.batch_id))
    assert isinstance(tensor, torch.Tensor) and np.array_equal(tensor.numpy(), h.data)
    assert len(kept[0].outbox) == 0
    got = kept[1].scan(batch, tensor)
    assert first_rows.batch_id == got.batch_id == batch.batch_id
    for name in want.rows:
        assert np.array_equal(got.rows[name], want.rows[name]), name
    assert np.array_equal(got.predictions["top_ids"], want.predictions["top_ids"])
    assert len(kept[1].outbox) == 0  # the last stage hands nothing over


def test_a_failed_scan_leaves_its_error_for_the_hand_off(other_model, monkeypatch):
    """The next stage then fails with the same error, as it does through the object store."""
    n = load_config(other_model).n_layer
    stage = Stage(StageSpec(str(other_model), ShardSpec(0, 2, n), "cpu", "float32", keep_hidden=True))
    stage.setup()
    batch, _ = one_batch(0)
    monkeypatch.setattr(workers.stage, "FAULT_OOM_TOKENS", 4)  # every prompt "runs out of memory"
    with pytest.raises(PromptTooLarge):
        stage.scan(batch)
    with pytest.raises(PromptTooLarge, match="does not fit in device memory even alone"):
        stage.handoff((batch.job, batch.batch_id))
    assert len(stage.outbox) == 0


def test_split_halves_of_a_handed_over_tensor_merge_like_numpy_ones(other_model, monkeypatch):
    """Out of memory, a stage splits a micro-batch whose hidden state came as a tensor."""
    n = load_config(other_model).n_layer
    batch, hidden = one_batch(load_config(other_model).n_embd)
    [stage] = _stages(other_model, [(2, n - 1)], n)
    monkeypatch.setattr(workers.stage, "FAULT_OOM_TOKENS", 12)  # the 2 x 9 batch splits in halves
    h_want, want = stage.forward(batch, hidden)
    h_got, got = stage.forward(batch, Hidden(torch.from_numpy(hidden.data), "float32"))
    assert isinstance(h_got.data, np.ndarray)  # a stage that does not keep its hidden state copies it out
    assert np.array_equal(h_got.data, h_want.data)
    for name in want.rows:
        assert np.array_equal(got.rows[name], want.rows[name]), name
    stage.spec = dataclasses.replace(stage.spec, keep_hidden=True)
    h_kept, _ = stage.forward(batch, Hidden(torch.from_numpy(hidden.data), "float32"))
    assert isinstance(h_kept.data, torch.Tensor) and np.array_equal(h_kept.data.numpy(), h_want.data)


def test_a_ranks_calls_launch_in_turn_order_whatever_order_they_come_in(tiny_model):
    """Ray starts a threaded actor's calls in any order; a rank's collectives pair up with its
    group's only in the order the driver sent the micro-batches (their ``turn``)."""
    import threading

    config = load_config(tiny_model)
    stage = Stage(StageSpec(str(tiny_model), ShardSpec(0, config.n_layer, config.n_layer), "cpu", "float32", ranks=2))
    stage.model, stage.device, launched = object(), torch.device("cpu"), []
    stage._launch = lambda batch, hidden: launched.append(batch)
    stage._collect = lambda batch, done: (None, None)
    threads = [threading.Thread(target=stage.forward, args=(turn, None, turn)) for turn in (2, 0, 3, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert launched == [0, 1, 2, 3]


def test_a_rank_that_failed_answers_every_later_call_with_the_same_line(tiny_model):
    config = load_config(tiny_model)
    spec = StageSpec(str(tiny_model), ShardSpec(0, 3, config.n_layer), "cpu", "float32", ranks=2, rank=1)
    stage = Stage(spec)
    stage.model, stage.device = object(), torch.device("cpu")

    def fail(batch, hidden):
        raise RuntimeError("[gloo] Connection closed by peer [10.0.0.2]:29500\ntraceback lines")

    stage._launch = fail
    lines = []
    for turn in (0, 1):
        with pytest.raises(UserError) as err:
            stage.forward(None, None, turn)
        lines.append(str(err.value))
    assert (
        lines[0]
        == lines[1]
        == (
            "rank 1 of the tensor-parallel stage of layers 0-2 failed ([gloo] Connection closed by peer "
            "[10.0.0.2]:29500): its group of 2 cannot go on; committed parts are kept: fix the cause, then rerun "
            "the same command with --resume"
        )
    )
