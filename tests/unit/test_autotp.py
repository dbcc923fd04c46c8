"""A stage's blocks over two Gloo ranks (DeepSpeed AutoTP on CPU): each rank reads its own part
of the checkpoint, and the ranks' reduction of their own neurons gives the whole layer's rows.

Each test spawns two processes that form one group (`tests.ranks`).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("deepspeed")

from neuroscan.config import Selection
from tests.ranks import on_ranks
from tests.triton_cpu import HAS_TRITON
from workers.ranks import Slice, reduce_ranked
from workers.reduce import reduce_layer

PRESETS = ("tiny", "tiny-neox", "tiny-llama", "tiny-mistral", "tiny-qwen2")


def _rank_parts(paths: dict[str, str]) -> dict:
    """On each rank, per preset: whether the rank's own reads equal AutoTP's cut of the whole
    stage (every parameter), the rank's slice, and the largest difference of the sharded
    stage's logits from the whole stage's."""
    import deepspeed.comm.comm
    import torch.distributed as dist

    from workers.autotp import load_ranked, shard_blocks
    from workers.checkpoint import load_config
    from workers.footprint import footprint
    from workers.shard import ShardSpec, load_stage

    # AutoTP's sums through Gloo, not DeepSpeed's shared-memory kernel (which spins on a dead peer)
    out = {"shared_memory_all_reduce": getattr(deepspeed.comm.comm.cdb, "shm_comm_op", None) is not None}
    for preset, path in paths.items():
        config = load_config(path)
        n = config.num_hidden_layers if hasattr(config, "num_hidden_layers") else config.n_layer
        spec = ShardSpec(0, n, n)
        whole = load_stage(path, config, spec, "cpu", torch.float32)
        ids = torch.randint(0, 256, (2, 19), generator=torch.Generator().manual_seed(0))
        pos = torch.arange(19)[None].expand(2, 19)
        with torch.no_grad():
            expected = whole.lm_head(whole(ids, None, pos))
        shard_blocks(whole, dist.get_world_size(), torch.float32)  # AutoTP's own cut of the loaded stage
        ranked, part = load_ranked(path, config, spec, torch.device("cpu"), torch.float32)
        cut = dict(whole.named_parameters())
        own = dict(ranked.named_parameters())
        with torch.no_grad():
            got = ranked.lm_head(ranked(ids, None, pos))
        out[preset] = {
            "names": sorted(own) == sorted(cut),
            "differ": [name for name in own if not torch.equal(own[name], cut[name])],
            "slice": part,
            "logits": (got - expected).abs().max().item(),
            "bytes": sum(p.numel() * p.element_size() for p in ranked.parameters()),
            "counted": footprint(path, config, spec, torch.float32, "cpu", dist.get_world_size()).weights,
        }
    return out


def test_each_rank_reads_exactly_its_own_part_and_the_sharded_stage_computes_the_same(tmp_path):
    from workers.embedded import preset_config, write_checkpoint

    paths = {p: str(write_checkpoint(preset_config(p), tmp_path / p)) for p in PRESETS}
    ranks = on_ranks(_rank_parts, 2, paths)
    assert not ranks[0]["shared_memory_all_reduce"] and not ranks[1]["shared_memory_all_reduce"]
    for preset in PRESETS:
        a, b = ranks[0][preset], ranks[1][preset]
        for rank in (a, b):
            assert rank["names"], preset
            assert rank["differ"] == [], (preset, rank["differ"])
            assert rank["logits"] < 1e-4, (preset, rank["logits"])
        assert a["slice"].offset == 0 and b["slice"].offset == a["slice"].width, preset
        assert a["slice"].width + b["slice"].width == a["slice"].total == b["slice"].total, preset
        # the memory check counts each rank at the largest share, and not much more
        most = max(a["bytes"], b["bytes"])
        assert most <= a["counted"] <= 1.02 * most, (preset, a["counted"], a["bytes"], b["bytes"])
    # AutoTP cuts gated MLPs in multiples of 64 neurons: tiny-llama's 192 as 128 + 64
    assert (ranks[0]["tiny-llama"]["slice"].width, ranks[1]["tiny-llama"]["slice"].width) == (128, 64)


def _ranked_rows(cases: list) -> list:
    """On each rank, for each (acts, ups, n_tokens, widths, selection): reduce_ranked of the
    rank's columns."""
    import torch.distributed as dist

    rank, out = dist.get_rank(), []
    for acts, ups, n_tokens, widths, sel, fused in cases:
        start = sum(widths[:rank])
        part = Slice(start, widths[rank], sum(widths))
        mine = slice(start, start + widths[rank])
        up = None if ups is None else ups[:, :, mine]
        out.append(reduce_ranked(acts[:, :, mine], n_tokens, sel, part, fused, up))
    return out


def test_the_ranks_rows_are_the_whole_layers_rows_on_every_rank():
    """Even and uneven slices, plain and gated, capped, uncapped, a cap above the width and
    nothing selected; ties included: activations on a coarse grid make many neurons rank alike,
    and the cap must break them by the lower global index across the ranks' boundary. The
    fused kernels (under Triton's interpreter on a CPU) on the capped selections too."""
    g = torch.Generator().manual_seed(3)
    selections = [
        Selection(high=2.0, low=-2.0, max_per_layer=5),
        Selection(high=1.0, low=-3.0, max_per_layer=0),
        Selection(high=3.5, low=-3.5, max_per_layer=200),
        Selection(high=100.0, low=-100.0, max_per_layer=4),  # nothing selected
    ]
    cases = []
    for widths in ((40, 24), (32, 32), (56, 8)):
        for gated in (False, True):
            acts = (torch.randint(-8, 9, (3, 11, 64), generator=g) / 2).float()
            ups = torch.randn(3, 11, 64, generator=g) if gated else None
            n_tokens = torch.tensor([11, 7, 1])
            cases += [(acts, ups, n_tokens, widths, sel, False) for sel in selections]
            if HAS_TRITON:
                cases += [(acts, ups, n_tokens, widths, sel, True) for sel in selections[:1]]
    ranks = on_ranks(_ranked_rows, 2, cases)
    for i, (acts, ups, n_tokens, widths, sel, _) in enumerate(cases):
        expected = reduce_layer(acts, n_tokens, sel, up=ups)
        kept = expected["kept"]
        assert kept.any() or sel.high == 100.0
        for rank in ranks:
            got = rank[i]
            assert sorted(got) == sorted(expected), (widths, sel)
            for name, value in expected.items():
                if value.shape[:2] == kept.shape:  # a slot's value: only the kept slots are rows
                    assert torch.equal(got[name][kept], value[kept]), (widths, sel, name)
                else:
                    assert torch.equal(got[name], value), (widths, sel, name)
