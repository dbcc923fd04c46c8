"""workers.verify: the fidelity check's comparison (pure numpy) and its float32 pass."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from neuroscan.config import Selection
from neuroscan.manifest import SelectionInfo, verification_line
from tests.manifests import header, verification
from tests.reference import expected_layer, reference_scan
from workers.verify import Float32Model, compare, draw, kept_neurons

SEL = SelectionInfo(high=3.0, low=0.0, max_per_layer=4)


def test_prompts_are_drawn_by_the_seed_ascending_and_all_when_few():
    ids = list(range(100, 0, -3))
    once, again = draw(ids, 8), draw(ids, 8)
    assert once == again == sorted(once) and len(set(once)) == 8 and set(once) <= set(ids)
    assert draw(ids, 8, seed=1) != once
    assert draw([5, 2, 9], 16) == [2, 5, 9]


def test_the_cap_keeps_red_first_by_distance_then_blue_only_ties_to_the_lower_neuron():
    mx = np.array([3.5, 1.0, 4.0, 3.5, 0.5, 2.0, 0.1])
    mn = np.array([0.2, -0.5, 0.1, 0.3, -0.2, 0.1, -0.5])
    kept = kept_neurons(mx, mn, SEL)
    assert kept.selected.tolist() == [True, True, True, True, True, False, True]
    assert kept.kept.tolist() == [2, 0, 3, 1]  # red by max - high (0 before 3 on a tie), then blue by low - min
    assert kept_neurons(mx, mn, dataclasses.replace(SEL, max_per_layer=0)).kept.tolist() == [2, 0, 3, 1, 6, 4]


def layers_of(rng, n_prompts=3, n_layers=2, d_mlp=64) -> dict[int, np.ndarray]:
    """Made-up float32 extremes: prompt_id -> [2, layers, d_mlp] (max, min; every max above its min)."""
    mx = rng.uniform(0.5, 6.0, (n_prompts, n_layers, d_mlp)).astype(np.float32)
    mn = rng.uniform(-0.17, 0.5, (n_prompts, n_layers, d_mlp)).astype(np.float32)
    return {p: np.stack([mx[p], mn[p]]) for p in range(n_prompts)}


def scan_of(extremes: dict[int, np.ndarray], sel: SelectionInfo) -> tuple[dict, dict]:
    """The rows and the selected counts a faithful scan writes for ``extremes``, by the tests'
    own reference rules (`tests.reference.expected_layer`, on two tokens: the max and the min),
    not by `workers.verify`'s."""
    rule = Selection(high=sel.high, low=sel.low, max_per_layer=sel.max_per_layer)
    cols = {name: [] for name in ("prompt_id", "layer", "neuron", "max_act", "min_act")}
    selected = {}
    for p, ext in extremes.items():
        for layer in range(ext.shape[1]):
            exp = expected_layer(ext[:, layer], rule)  # [2 tokens, d_mlp]
            selected[(p, layer)] = int(exp["selected"].sum())
            for j in sorted(exp["kept"]):
                for name, value in zip(cols, (p, layer, j, ext[0, layer, j], ext[1, layer, j])):
                    cols[name].append(value)
    return {name: np.array(values) for name, values in cols.items()}, selected


def one_row(neuron: int, max_act: float, min_act: float) -> dict[str, np.ndarray]:
    """The scan's rows of prompt 0, layer 0: one kept neuron."""
    return {
        "prompt_id": np.array([0]),
        "layer": np.array([0]),
        "neuron": np.array([neuron]),
        "max_act": np.array([max_act], np.float32),
        "min_act": np.array([min_act], np.float32),
    }


def test_a_faithful_scan_agrees_everywhere():
    extremes = layers_of(np.random.default_rng(0))
    rows, selected = scan_of(extremes, SEL)
    checks = compare(extremes, rows, selected, SEL, "float32")
    assert set(checks) == {"0", "1"}
    for check in checks.values():
        assert check.kept_agreement == 1.0 and check.flips == 0 and check.off == 0
        assert check.max_diff == check.min_diff == 0.0 and check.pairs == 3 * SEL.max_per_layer
        assert check.selected == check.selected_fp32


def test_values_off_in_one_layer_fail_that_layer_only_and_half_precision_allows_more():
    extremes = layers_of(np.random.default_rng(1))
    rows, selected = scan_of(extremes, SEL)
    in_one = rows["layer"] == 1
    rows["max_act"] = np.where(in_one, rows["max_act"] + 0.04, rows["max_act"])
    checks = compare(extremes, rows, selected, SEL, "float32")
    assert checks["0"].off == 0 and checks["1"].off == checks["1"].pairs
    assert checks["1"].max_diff == pytest.approx(0.04, abs=1e-5)
    assert compare(extremes, rows, selected, SEL, "float16")["1"].off == 0  # within 0.05 + 2 %
    rows["max_act"] = np.where(in_one, rows["max_act"] * 1.5, rows["max_act"])  # weights scaled by half as much again
    assert compare(extremes, rows, selected, SEL, "bfloat16")["1"].off == checks["1"].pairs


def test_a_neuron_across_a_threshold_flips_but_is_not_off_when_it_lies_near_it():
    sel = dataclasses.replace(SEL, max_per_layer=0)  # nothing capped
    mx = np.array([[[3.0004, 1.0, 5.0]]], np.float32)  # prompt 0, layer 0: neuron 0 just above high
    mn = np.array([[[0.5, 0.5, 0.5]]], np.float32)
    extremes = {0: np.stack([mx[0], mn[0]])}
    rows = one_row(2, 5.0, 0.5)  # the scan saw neuron 0 just below high: not selected, no row
    check = compare(extremes, rows, {(0, 0): 1}, sel, "float32")["0"]
    assert (check.pairs, check.flips, check.off, check.selected, check.selected_fp32) == (2, 1, 0, 1, 2)
    assert check.kept_agreement == 0.5
    mx[0, 0, 0] = 3.5  # far above high: the scan missing it is an error
    extremes = {0: np.stack([mx[0], mn[0]])}
    assert compare(extremes, rows, {(0, 0): 1}, sel, "float32")["0"].off == 1


def test_a_near_tie_at_the_cap_may_go_either_way():
    sel = dataclasses.replace(SEL, max_per_layer=1)
    mx = np.array([4.0, 4.0005, 3.2], np.float32)
    mn = np.array([0.5, 0.5, 0.5], np.float32)
    extremes = {0: np.stack([mx, mn])[:, None, :]}
    rows = one_row(0, 4.0, 0.5)
    check = compare(extremes, rows, {(0, 0): 3}, sel, "float32")["0"]
    assert (check.pairs, check.off, check.flips) == (2, 0, 0)  # the scan kept 0, float32 keeps 1: a near tie
    mx[1] = 4.5  # a clear winner the scan left out
    extremes = {0: np.stack([mx, mn])[:, None, :]}
    assert compare(extremes, rows, {(0, 0): 3}, sel, "float32")["0"].off == 2


def test_selected_counts_further_apart_than_the_neurons_near_a_threshold_are_off():
    extremes = layers_of(np.random.default_rng(2), n_prompts=1, n_layers=1)
    rows, selected = scan_of(extremes, SEL)
    selected[(0, 0)] -= 5  # five selected neurons, none near a threshold, missing from the count
    check = compare(extremes, rows, selected, SEL, "float32")["0"]
    near = (np.abs(extremes[0][0, 0] - 3.0) <= 0.004) | (np.abs(extremes[0][1, 0]) <= 0.001)
    assert check.flips == 5 and check.off == max(0, 5 - int(near.sum()))


def test_the_float32_pass_takes_what_enters_each_mlp_output_projection(tiny_model):
    texts = ["Monday, Tuesday, Wednesday,", "x"]
    ref = reference_scan(tiny_model, texts)
    got = Float32Model(str(tiny_model)).extremes({i: ref[i]["token_ids"] for i in range(len(texts))})
    for i in range(len(texts)):
        acts = ref[i]["acts"]  # [layers, pos, d_mlp]
        assert got[i].shape == (2, *acts.shape[::2])
        np.testing.assert_allclose(got[i][0], acts.max(axis=1), atol=1e-6)
        np.testing.assert_allclose(got[i][1], acts.min(axis=1), atol=1e-6)


def test_the_line_says_passed_with_its_figures_or_the_first_failed_layer_and_what_to_do():
    passed = verification_line(
        header(verification=verification(), model=dataclasses.replace(header().model, dtype="float16"))
    )
    assert passed == (
        "fidelity check passed (3 prompts run again alone through the plain transformers model in float32 on cpu; "
        "tolerance 0.05 + 0.02 x |act| for float16): kept sets agree 99.0%, 2 (prompt, neuron) pairs flip across a "
        "threshold, largest |max_act| difference 2.5 (layer 1)"
    )
    failed = verification_line(header(verification=verification(off=40)))
    assert failed.startswith(
        "fidelity check FAILED from layer 1 (1 of 2 layers past the tolerance; 3 prompts run again"
    )
    assert "in layer 1, 40 of 100 (prompt, neuron) pairs disagree, largest |max_act| difference 2.5" in failed
    assert failed.endswith("report it with this manifest.json")
    assert verification(off=1).failed() == [] and verification(off=2).failed() == [1]
    assert verification_line(header()) is None


def test_a_check_without_room_for_the_float32_model_is_one_line_and_the_run_stays_unchecked(
    tiny_model, tmp_path, monkeypatch, capsys
):
    """What README and docs/RELIABILITY.md say: no room is found before anything loads, and a
    check that cannot run leaves the complete run as it was, said in one line."""
    import workers.verify
    from cluster import driver
    from neuroscan.config import ScanConfig
    from neuroscan.errors import UserError

    monkeypatch.setattr(workers.verify, "free_bytes", lambda device: 1 << 20)
    model = Float32Model(str(tiny_model))
    with pytest.raises(
        UserError, match=r"the fidelity check needs 0\.\d GiB for the model in float32 on cpu but 0\.0 GiB"
    ):
        model.extremes({0: [1, 2, 3]})
    assert model.model is None  # nothing loaded

    def no_room(*args, **kwargs):
        raise UserError("no room")

    monkeypatch.setattr(driver, "verify_scan", no_room)
    done = header(status="complete")
    cfg = ScanConfig(prompts="seed", out=str(tmp_path), quiet=True)
    assert driver.verified(cfg, tmp_path, done, lambda line: None) is done
    assert capsys.readouterr().err == "the fidelity check could not run: no room; the scan's tables are complete\n"
    assert not (tmp_path / "manifest.json").exists()
