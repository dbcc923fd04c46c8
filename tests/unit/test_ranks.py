"""workers.ranks: the cap taken from tensor-parallel ranks' candidates is the whole layer's."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from neuroscan.errors import UserError
from workers.ranks import Turns, merge_candidates
from workers.reduce import pick_neurons
from workers.thresholds import UNSELECTED


def _slices_pick(rank: torch.Tensor, t: int, k: int):
    """Each of ``t`` contiguous slices picks its own candidates, as a rank would."""
    b, n = rank.shape
    width = n // t
    ranks, neurons, selected = [], [], []
    for r in range(t):
        part = rank[:, r * width : (r + 1) * width]
        local, n_sel = pick_neurons(part, min(k, width))
        ranks.append(part.gather(1, local.clamp(max=width - 1)))
        neurons.append(torch.where(local < width, local + r * width, n))
        selected.append(n_sel)
    return torch.stack(ranks), torch.stack(neurons), torch.stack(selected)


@pytest.mark.parametrize("t", [1, 2, 4])
@pytest.mark.parametrize("k", [1, 5, 64, 256])
def test_the_merged_cap_is_the_whole_layers(t, k):
    gen = torch.Generator().manual_seed(t * 1000 + k)
    b, n = 6, 256
    rank = torch.randint(-50, 50, (b, n), generator=gen, dtype=torch.int32)  # many ties at every rank
    rank[torch.rand(b, n, generator=gen) < 0.3] = UNSELECTED
    rank[0] = UNSELECTED  # a prompt where nothing is selected
    rank[1, :200] = UNSELECTED  # one where fewer than the cap are
    want, want_n = pick_neurons(rank, min(k, n))
    got, got_n = merge_candidates(*_slices_pick(rank, t, k), min(k, n), n)
    assert torch.equal(got, want) and torch.equal(got_n, want_n)


def test_turns_let_calls_through_in_order_and_wait_while_the_group_goes_on():
    turns, order = Turns(timeout_s=0.5), []

    def call(turn: int, work_s: float) -> None:
        turns.take(turn)
        order.append(turn)
        time.sleep(work_s)  # a long micro-batch: the later calls wait longer than the timeout in all
        turns.pass_on()

    threads = [threading.Thread(target=call, args=(t, 0.3)) for t in (3, 1, 2, 0)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert order == [0, 1, 2, 3]


def test_turns_give_up_when_no_turn_passes_and_say_the_broken_groups_line():
    turns = Turns(timeout_s=0.2)
    with pytest.raises(TimeoutError, match="micro-batch turn 1 waited 0 s for turn 0, which never came"):
        turns.take(1)
    assert turns.fail("rank 1 ... failed") == turns.fail("a later line") == "rank 1 ... failed"
    with pytest.raises(UserError, match=r"rank 1 \.\.\. failed"):
        turns.take(0)
