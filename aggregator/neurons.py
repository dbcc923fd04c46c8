"""``neurons/``: per (layer, neuron), how many prompts kept it, how many it fired red on, its
corpus max, and its top-k prompts by max activation (Neuroscope's max-activating examples).

The table is a function of the committed activation rows, so it is built from them when the
run finishes, one layer and one record batch at a time: memory is the top-k state of one
layer (d_mlp x k), whatever the corpus. A resumed run builds it from the same rows and gets
the same table. Ties go to the lower prompt id.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds

NEURONS = pa.schema(
    [
        ("layer", pa.int32()),
        ("neuron", pa.int32()),
        ("n_prompts", pa.int64()),  # prompts on which the neuron was kept (selected and within the cap)
        ("n_red", pa.int64()),  # ... and its max was above the red edge
        ("max_act", pa.float32()),
        ("top_prompt_ids", pa.list_(pa.int64())),
        ("top_acts", pa.list_(pa.float32())),
        ("top_pos", pa.list_(pa.int16())),
    ]
)


def merge_top_k(state: dict[str, np.ndarray], neuron: np.ndarray, act: np.ndarray, prompt_id: np.ndarray, pos: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Fold candidate rows into the per-neuron top-k (flat arrays sorted by neuron, act desc, prompt id)."""
    neuron = np.concatenate([state["neuron"], neuron])
    act = np.concatenate([state["act"], act])
    prompt_id = np.concatenate([state["prompt_id"], prompt_id])
    pos = np.concatenate([state["pos"], pos])
    order = np.lexsort((prompt_id, -act, neuron))
    neuron, act, prompt_id, pos = neuron[order], act[order], prompt_id[order], pos[order]
    starts = np.flatnonzero(np.r_[True, neuron[1:] != neuron[:-1]])
    rank = np.arange(len(neuron)) - np.repeat(starts, np.diff(np.r_[starts, len(neuron)]))
    keep = rank < k
    return {"neuron": neuron[keep], "act": act[keep], "prompt_id": prompt_id[keep], "pos": pos[keep]}


def empty_state() -> dict[str, np.ndarray]:
    return {"neuron": np.zeros(0, np.int32), "act": np.zeros(0, np.float32), "prompt_id": np.zeros(0, np.int64), "pos": np.zeros(0, np.int16)}


def layer_table(layer: int, files: list[str], fmt: str, k: int, red: float) -> pa.Table:
    state = empty_state()
    n_prompts, n_red, best = np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    for batch in ds.dataset(files, format=fmt).to_batches(columns=["neuron", "prompt_id", "max_act", "max_pos"]):
        neuron, act = batch["neuron"].to_numpy(), batch["max_act"].to_numpy()
        size = max(len(n_prompts), int(neuron.max(initial=-1)) + 1)
        n_prompts = np.bincount(neuron, minlength=size) + np.pad(n_prompts, (0, size - len(n_prompts)))
        n_red = np.bincount(neuron[act > red], minlength=size) + np.pad(n_red, (0, size - len(n_red)))
        best = np.pad(best, (0, size - len(best)), constant_values=-np.inf)
        np.maximum.at(best, neuron, act)
        state = merge_top_k(state, neuron, act, batch["prompt_id"].to_numpy(), batch["max_pos"].to_numpy(), k)
    present = np.flatnonzero(n_prompts)
    bounds = np.searchsorted(state["neuron"], present), np.searchsorted(state["neuron"], present, side="right")
    top = {name: [state[name][a:b] for a, b in zip(*bounds)] for name in ("prompt_id", "act", "pos")}
    return pa.table(
        [
            np.full(len(present), layer, np.int32), present.astype(np.int32), n_prompts[present], n_red[present],
            best[present].astype(np.float32), pa.array(top["prompt_id"], pa.list_(pa.int64())),
            pa.array(top["act"], pa.list_(pa.float32())), pa.array(top["pos"], pa.list_(pa.int16())),
        ],
        schema=NEURONS,
    )


def neurons_table(out: Path, manifest: dict, k: int) -> pa.Table:
    """The whole neurons table from the parts the manifest lists."""
    by_layer: dict[int, list[str]] = {}
    for part in manifest["parts"]:
        for f in part["files"]:
            if f["path"].startswith("activations/layer="):
                layer = int(f["path"].split("/")[1].removeprefix("layer="))
                by_layer.setdefault(layer, []).append(str(out / f["path"]))
    fmt = "arrow" if manifest.get("format") == "arrow" else "parquet"
    red = manifest["bands"]["red"]
    tables = [layer_table(layer, files, fmt, k, red) for layer, files in sorted(by_layer.items())]
    return pa.concat_tables(tables) if tables else NEURONS.empty_table()
