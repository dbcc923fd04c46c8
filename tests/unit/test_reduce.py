"""workers.reduce against numpy on random tensors with padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neuroscan.config import Selection
from tests.reference import band_codes, expected_layer, unpack_bands
from tests.triton_cpu import needs_triton
from workers.reduce import compact, pack_codes, reduce_layer


def test_pack_codes_layout():
    codes = torch.tensor([[1, 2, 3, 0, 3]], dtype=torch.uint8)  # token t -> byte t // 4, bits 2 * (t % 4)
    packed = pack_codes(codes)
    assert packed.tolist() == [[1 | 2 << 2 | 3 << 4, 3]]
    assert unpack_bands(bytes(packed[0].tolist()), 5).tolist() == [1, 2, 3, 0, 3]


@pytest.mark.parametrize("t", [1, 3, 4, 5, 17])
def test_pack_roundtrip_random(t):
    codes = torch.randint(0, 4, (6, t), dtype=torch.uint8)
    packed = pack_codes(codes)
    assert packed.shape == (6, (t + 3) // 4)
    for row in range(6):
        assert unpack_bands(bytes(packed[row].tolist()), t).tolist() == codes[row].tolist()


def test_band_codes_edges():
    sel = Selection(high=3.0, low=0.0, red=3.5)
    from workers.reduce import band_codes as device_codes

    acts = torch.tensor([-0.1, 0.0, 3.0, 3.01, 3.5, 3.51])
    assert device_codes(acts, sel).tolist() == [1, 0, 0, 2, 2, 3]


@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=needs_triton)], ids=["eager", "fused"])
@pytest.mark.parametrize("cap", [0, 5, 40])
def test_reduce_layer_matches_numpy(cap, fused):
    gen = torch.Generator().manual_seed(cap)
    b, t, n = 4, 11, 40
    act = torch.randn(b, t, n, generator=gen) * 2.0 + 0.5  # [batch, pos, d_mlp]
    lengths = [11, 7, 1, 4]
    valid = torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]
    act[~valid] = 100.0  # padding must never leak into any statistic
    sel = Selection(high=2.5, low=-1.0, red=3.5, max_per_layer=cap)
    out = reduce_layer(act, torch.tensor(lengths), sel, fused)
    for row, length in enumerate(lengths):
        a = act[row, :length].numpy()  # [pos, d_mlp]
        exp = expected_layer(a, sel)
        kept = out["kept"][row]
        neurons = out["neuron"][row][kept].tolist()
        assert neurons == sorted(exp["kept"])  # exact on CPU: same values, same rule
        assert out["n_selected"][row] == exp["selected"].sum()
        assert out["n_kept"][row] == len(neurons)
        assert out["n_above_any"][row] == (a.max(0) > sel.high).sum()
        assert out["n_below_any"][row] == (a.min(0) < sel.low).sum()
        for slot in np.flatnonzero(kept.numpy()):
            j = int(out["neuron"][row, slot])
            col = a[:, j]
            assert out["max_act"][row, slot] == col.max() and out["max_pos"][row, slot] == col.argmax()
            assert out["min_act"][row, slot] == col.min() and out["min_pos"][row, slot] == col.argmin()
            assert out["n_above"][row, slot] == (col > sel.high).sum()
            assert out["n_below"][row, slot] == (col < sel.low).sum()
            codes = unpack_bands(bytes(out["bands"][row, slot].tolist())[: (length + 3) // 4], length)
            assert codes.tolist() == band_codes(col, sel).tolist()
        if neurons:
            for name, hit in (
                ("mean_coverage", a > sel.high),
                ("red_coverage", a > sel.red),
                ("blue_coverage", a < sel.low),
            ):
                cover = np.mean([hit[:, j].sum() / length for j in neurons])
                assert out[name][row].item() == pytest.approx(cover, rel=1e-6), name


def test_cap_prefers_most_extreme_then_lower_index():
    sel = Selection(high=3.0, low=0.0, max_per_layer=2)
    # neuron: 0 grey, 1 at 4.0 (score 1.0), 2 at -1.0 (score 1.0), 3 at 5.0 (score 2.0)
    act = torch.tensor([[[1.0, 4.0, -1.0, 5.0]]])
    out = reduce_layer(act, torch.tensor([1]), sel)
    assert out["neuron"][0][out["kept"][0]].tolist() == [1, 3]  # tie 1 vs 2 goes to the lower index
    assert out["n_selected"].tolist() == [3]


def test_compact_keeps_only_kept_rows_in_layer_order():
    sel = Selection(max_per_layer=3)
    gen = torch.Generator().manual_seed(1)
    layers = [reduce_layer(torch.randn(2, 5, 8, generator=gen) * 3, torch.tensor([5, 5]), sel) for _ in range(3)]
    rows, per_prompt = compact(layers)
    total = sum(int(layer["kept"].sum()) for layer in layers)
    assert len(rows["neuron"]) == total
    assert rows["layer_offset"].tolist() == sorted(rows["layer_offset"].tolist())
    assert per_prompt["n_kept"].shape == (3, 2)
    assert per_prompt["n_kept"].sum() == total


def stable_head(score: torch.Tensor, k: int) -> list[list[int]]:
    """The kept neurons by definition: the selected among the head of a stable descending sort
    of the scores (ties to the lower index), ascending, then the sentinel n."""
    n = score.shape[1]
    head = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :k]
    rows = []
    for row in range(score.shape[0]):
        kept = sorted(i for i in head[row].tolist() if score[row, i] > float("-inf"))
        rows.append(kept + [n] * (k - len(kept)))
    return rows


@pytest.mark.parametrize("k", [1, 7, 64, 299, 300])
def test_picked_neurons_are_the_head_of_a_stable_descending_sort(k):
    """Ties (many: scores drawn from a few values, with -0.0 and 0.0) go to the lower index;
    unselected neurons (score -inf) are never kept and fill no slot."""
    from workers.reduce import is_selected, pick_neurons, rank_scores

    gen = torch.Generator().manual_seed(k)
    sel = Selection(high=3.0, low=0.0)
    # max_act - 3 and 0 - min_act give scores among -2.5, -0.0, 0.0, 0.5, 3.0 (min_act 1 keeps the
    # low side out); max_act 1 with min_act 1 is unselected.
    max_values = torch.tensor([0.5, 3.0, 3.0, 3.5, 6.0, 1.0])
    max_act = max_values[torch.randint(0, len(max_values), (6, 300), generator=gen)]
    min_act = torch.where(max_act == 3.0, torch.tensor(-0.0), torch.tensor(1.0))  # 0 - (-0.0) = 0.0 ties 3 - 3 = 0.0
    rank = rank_scores(max_act, min_act, sel, torch.float32)
    selected = (max_act > 3.0) | (min_act < 0.0)
    assert torch.equal(is_selected(rank), selected)
    score = torch.maximum(max_act - 3.0, 0.0 - min_act).masked_fill(~selected, float("-inf")) + 0.0
    neuron, n_selected = pick_neurons(rank, k)
    assert neuron.tolist() == stable_head(score, k)
    assert n_selected.tolist() == selected.sum(dim=1).tolist()
    random = torch.randn(4, 300, generator=gen) + 3.0
    neuron, _ = pick_neurons(rank_scores(random, torch.ones_like(random), sel, torch.float32), k)
    assert neuron.tolist() == stable_head(random.masked_fill(random <= 3.0, float("-inf")), k)


@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=needs_triton)], ids=["eager", "fused"])
def test_the_cap_never_drops_a_red_neuron_for_a_blue_one(fused):
    """The default thresholds on GELU activations: the blue rule (min < 0) selects nearly every
    neuron, some far below 0; the red ones just above ``high`` still all fit the cap first."""
    gen = torch.Generator().manual_seed(3)
    b, t, n, cap = 3, 9, 64, 6
    act = torch.nn.functional.gelu(torch.randn(b, t, n, generator=gen), approximate="tanh") * 0.3  # [batch, pos, d_mlp]
    act[:, :, :5] = -5.0  # far below low: the old rule's most extreme neurons
    red = torch.tensor([7, 20, 41, 63])
    act[:, 4, red] = 3.0 + torch.tensor([0.01, 0.002, 0.3, 0.05])  # barely above high
    sel = Selection(max_per_layer=cap)  # high 3, low 0
    out = reduce_layer(act, torch.full((b,), t), sel, fused)
    for row in range(b):
        kept = out["neuron"][row][out["kept"][row]].tolist()
        assert set(red.tolist()) <= set(kept) and len(kept) == cap
        assert set(kept) - set(red.tolist()) == {0, 1}  # the room left: the farthest below low, lower index first
        assert out["n_above_any"][row] == 4 and out["n_below_any"][row] > n * 0.9
