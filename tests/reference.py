"""The reference a scan is checked against: a plain per-prompt forward pass with hooks.

No batching, no padding, no pipeline: the full causal LM from ``from_pretrained``
(``AutoModelForCausalLM``: transformers' own class of the checkpoint's family) runs one prompt
at a time, what enters every block's MLP output projection is copied out (and, in a gated MLP,
the up projection's output), and the statistics,
selection, cap and band codes are recomputed here in numpy from their documented
definitions (independently of ``workers.reduce``). ``assert_scan_matches`` then compares a
scan's output directory with it. Floating-point results of differently shaped batches are
not bit-identical, so a disagreement is accepted only where the reference value lies within
``tol`` of the threshold or edge that decides it.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from neuroscan.config import Selection

BLOCKS = {"gptj": "transformer.h", "gpt_neox": "gpt_neox.layers", "gpt2": "transformer.h"}
"""Where transformers' causal-LM classes keep their blocks (``model.layers`` for the rest)."""
MLP = {
    "gptj": ("fc_out", None),
    "gpt_neox": ("dense_4h_to_h", None),
    "gpt2": ("c_proj", None),
}
"""The MLP's output projection (its input is the neuron activations) and, gated, its up projection."""


def reference_scan(model_dir: Path, texts: list[str]) -> dict:
    """prompt_id -> {"token_ids", "acts": [layers, pos, d_mlp] float32, "top_ids", "top_probs"}
    (and "ups", the same shape, for gated MLPs)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    kind = model.config.model_type
    down, up = MLP.get(kind, ("down_proj", "up_proj"))
    blocks = model.get_submodule(BLOCKS.get(kind, "model.layers"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    out = {}
    for prompt_id, text in enumerate(texts):
        ids = tokenizer(text)["input_ids"]  # as the model's tokenizer gives them: a BOS where it puts one
        acts, ups = [], []
        hooks = [
            b.mlp.get_submodule(down).register_forward_pre_hook(
                lambda m, i, acts=acts: acts.append(i[0][0].numpy().copy())
            )
            for b in blocks
        ]
        if up:
            hooks += [
                b.mlp.get_submodule(up).register_forward_hook(lambda m, i, o, ups=ups: ups.append(o[0].numpy().copy()))
                for b in blocks
            ]
        try:
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0, -1]
        finally:
            for h in hooks:
                h.remove()
        probs = logits.softmax(-1)
        top = probs.topk(5)
        out[prompt_id] = {
            "token_ids": ids,
            "acts": np.stack(acts),
            **({"ups": np.stack(ups)} if ups else {}),
            "probs": probs.numpy(),
            "top_ids": top.indices.numpy(),
        }
    return out


RED_OFFSET = 1e6
"""Added to a red-selected neuron's score: every red one ranks above every blue-only one."""


def expected_layer(acts: np.ndarray, sel: Selection) -> dict:
    """Statistics of every neuron of one (prompt, layer) from its [pos, d_mlp] activations.

    The cap's rule: red-selected neurons (max > high) first, by max - high, then the ones only
    the blue rule selected (min < low), by low - min; the score below orders them so (red
    scores are offset past every blue one)."""
    mx, mn = acts.max(0), acts.min(0)
    red, blue = mx > sel.high, mn < sel.low
    selected = red | blue
    score = np.where(red, RED_OFFSET + (mx - sel.high), np.where(blue, sel.low - mn, -np.inf))
    chosen = sorted(np.flatnonzero(selected), key=lambda j: (-score[j], j))
    if sel.max_per_layer:
        chosen = chosen[: sel.max_per_layer]
    return {"max": mx, "min": mn, "selected": selected, "score": score, "kept": set(int(j) for j in chosen)}


def band_codes(acts: np.ndarray, sel: Selection) -> np.ndarray:
    return np.select([acts > sel.red, acts > sel.high, acts < sel.low], [3, 2, 1], 0).astype(np.uint8)


def unpack_bands(blob: bytes, n_tokens: int) -> np.ndarray:
    """Band codes of a ``bands`` value; the bits past the last token must be zero."""
    raw = np.frombuffer(blob, dtype=np.uint8)
    codes = ((raw[:, None] >> np.array([0, 2, 4, 6], dtype=np.uint8)) & 3).reshape(-1)
    assert not codes[n_tokens:].any(), "bits past the prompt's last token are set"
    return codes[:n_tokens]


def read_activations(out_dir: Path) -> dict:
    """(prompt_id, layer) -> {neuron: row dict} from a scan's activations/."""
    table = ds.dataset(Path(out_dir) / "activations", format=_format(out_dir)).to_table()
    rows = defaultdict(dict)
    for row in table.to_pylist():
        rows[(row["prompt_id"], row["layer"])][row["neuron"]] = row
    return rows


def _format(out_dir: Path) -> str:
    return "arrow" if any(Path(out_dir).rglob("*.arrow")) else "parquet"


def assert_scan_matches(out_dir: Path, ref: dict, sel: Selection, tol: float = 1e-4) -> int:
    """Compare a scan's tables with the reference; returns the number of rows checked."""
    got = read_activations(out_dir)
    layers = ds.dataset(Path(out_dir) / "layers", format=_format(out_dir)).to_table().to_pylist()
    layer_rows = {(r["prompt_id"], r["layer"]): r for r in layers}
    checked = 0
    n_layers = next(iter(ref.values()))["acts"].shape[0]
    assert len(layer_rows) == len(ref) * n_layers
    for prompt_id, r in ref.items():
        for layer in range(n_layers):
            acts = r["acts"][layer]  # [pos, d_mlp]
            exp = expected_layer(acts, sel)
            rows = got.get((prompt_id, layer), {})
            _check_kept_set(set(rows), exp, sel, tol, (prompt_id, layer))
            summary = layer_rows[(prompt_id, layer)]
            assert summary["n_tokens"] == acts.shape[0]
            assert summary["n_kept"] == len(rows)
            near = _near_selection(exp, sel, tol)
            assert abs(summary["n_selected"] - int(exp["selected"].sum())) <= near
            assert abs(summary["n_above_any"] - int((exp["max"] > sel.high).sum())) <= near
            assert abs(summary["n_below_any"] - int((exp["min"] < sel.low).sum())) <= near
            ups = r["ups"][layer] if "ups" in r else None
            for neuron, row in rows.items():
                _check_row(row, acts[:, neuron], sel, tol, (prompt_id, layer, neuron))
                _check_up(row, None if ups is None else ups[:, neuron], tol, (prompt_id, layer, neuron))
                checked += 1
            _check_coverage(summary, acts[:, sorted(rows)], sel, tol, (prompt_id, layer))
    return checked


def _check_coverage(summary: dict, kept_acts: np.ndarray, sel: Selection, tol: float, where) -> None:
    """layers/ coverage columns: mean over kept neurons of the fraction of tokens in a band."""
    if kept_acts.shape[1] == 0:
        return
    for name, edge, above in (
        ("mean_coverage", sel.high, True),
        ("red_coverage", sel.red, True),
        ("blue_coverage", sel.low, False),
    ):
        strict = (kept_acts > edge + tol) if above else (kept_acts < edge - tol)
        loose = (kept_acts > edge - tol) if above else (kept_acts < edge + tol)
        assert strict.mean() - 1e-6 <= summary[name] <= loose.mean() + 1e-6, (where, name, summary[name], strict.mean())


def _near_selection(exp: dict, sel: Selection, tol: float) -> int:
    return int(((np.abs(exp["max"] - sel.high) < tol) | (np.abs(exp["min"] - sel.low) < tol)).sum())


def _check_kept_set(kept: set, exp: dict, sel: Selection, tol: float, where) -> None:
    differ = kept ^ exp["kept"]
    if not differ:
        return
    scores = exp["score"]
    boundary = min(scores[j] for j in exp["kept"]) if exp["kept"] else np.inf
    for j in differ:  # only near-ties at the cap, or neurons at a selection threshold, may differ
        at_cap = abs(scores[j] - boundary) < tol
        at_threshold = abs(exp["max"][j] - sel.high) < tol or abs(exp["min"][j] - sel.low) < tol
        assert at_cap or at_threshold, (
            f"{where}: neuron {j} kept={j in kept}, reference says {j in exp['kept']} (score {scores[j]}, boundary {boundary})"
        )


def _check_up(row: dict, ups: np.ndarray | None, tol: float, where) -> None:
    """A gated MLP's up value at the row's max and min token; null for other families."""
    if ups is None:
        assert row["up_at_max"] is None and row["up_at_min"] is None, where
        return
    assert abs(row["up_at_max"] - ups[row["max_pos"]]) < tol * max(1.0, abs(ups[row["max_pos"]])), where
    assert abs(row["up_at_min"] - ups[row["min_pos"]]) < tol * max(1.0, abs(ups[row["min_pos"]])), where


def _check_row(row: dict, acts: np.ndarray, sel: Selection, tol: float, where) -> None:
    assert abs(row["max_act"] - acts.max()) < tol, where
    assert abs(row["min_act"] - acts.min()) < tol, where
    assert abs(acts[row["max_pos"]] - acts.max()) < tol, where
    assert abs(acts[row["min_pos"]] - acts.min()) < tol, where
    assert (acts > sel.high + tol).sum() <= row["n_above"] <= (acts > sel.high - tol).sum(), where
    assert (acts < sel.low - tol).sum() <= row["n_below"] <= (acts < sel.low + tol).sum(), where
    assert len(row["bands"]) == (len(acts) + 3) // 4, where
    codes = unpack_bands(row["bands"], len(acts))
    mismatch = codes != band_codes(acts, sel)
    near_edge = np.min(np.abs(acts[:, None] - np.array([sel.low, sel.high, sel.red])), axis=1) < tol
    assert not (mismatch & ~near_edge).any(), (
        f"{where}: band codes differ at tokens {np.flatnonzero(mismatch & ~near_edge)}"
    )


def assert_same_rows(out_dir: Path, expected_dir: Path, tol: float = 1e-4) -> int:
    """Two scans of the same corpus and selection hold the same rows: the same kept neurons of
    every (prompt, layer), the same layers/ and prompts/ keys, n_kept and top tokens, the same
    neurons/ entries, and their activations, gated up values, coverages and probabilities
    within ``tol``. Not compared: positions, token counts, bands and the order of neurons/' top
    prompts, which a different order of float sums may move at a near tie or a token near a
    threshold; `assert_scan_matches` checks those of each scan against the forward pass.
    Returns the activation rows compared."""
    got, want = read_activations(out_dir), read_activations(expected_dir)
    assert got.keys() == want.keys()
    compared = 0
    for key, rows in want.items():
        assert got[key].keys() == rows.keys(), key
        for neuron, row in rows.items():
            other = got[key][neuron]
            for name in ("max_act", "min_act", "up_at_max", "up_at_min"):
                if row.get(name) is None:
                    assert other.get(name) is None, (key, neuron, name)
                else:
                    assert abs(other[name] - row[name]) <= tol * (1 + abs(row[name])), (key, neuron, name)
            compared += 1
    for name, keys in (
        ("layers", ("prompt_id", "layer")),
        ("prompts", ("prompt_id",)),
        ("neurons", ("layer", "neuron")),
    ):
        a = {tuple(r[k] for k in keys): r for r in _rows(out_dir, name)}
        b = {tuple(r[k] for k in keys): r for r in _rows(expected_dir, name)}
        assert a.keys() == b.keys(), name
        for key, row in b.items():
            for column, value in row.items():
                mine = a[key][column]
                if isinstance(value, float):
                    assert abs(mine - value) <= tol * (1 + abs(value)), (name, key, column)
                elif column in ("top_probs", "top_acts"):
                    assert np.allclose(mine, value, atol=tol, rtol=tol), (name, key, column)
                elif column in ("top_prompt_ids", "top_pos", "n_red", "n_selected", "n_above_any", "n_below_any"):
                    continue  # orders of near ties, and counts of tokens near a threshold: checked against the forward pass
                else:
                    assert mine == value, (name, key, column)
    return compared


def _rows(out_dir: Path, name: str) -> list[dict]:
    return ds.dataset(Path(out_dir) / name, format=_format(out_dir)).to_table().to_pylist()
