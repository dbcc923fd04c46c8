"""The fidelity check of a finished scan (``--verify N``): a few of its prompts run again,
one at a time, through the plain transformers model in float32, and compared with its rows.

The second pass shares nothing with the scan's stages: ``AutoModelForCausalLM`` loads the
whole checkpoint, no batching, no padding, no pipeline, no fused kernel; a forward pre-hook
on each block's MLP output projection (`workers.families.Family.down`) takes every neuron's
max and min over the prompt's tokens, and the selection and the cap are worked out again here
in numpy from their documented rules (`workers.reduce`). Per layer the check records how far
the kept sets agree, how many (prompt, neuron) pairs flip across a threshold, the largest
|max_act| and |min_act| differences, and ``off``: the disagreements the tolerance does not
explain.

The tolerance. A value agrees when it lies within ``atol + rtol * |v|`` of the float32 value
``v``; `TOLERANCES` gives (atol, rtol) by the scan's dtype. A float32 scan differs from the
per-prompt pass only by the order of its sums (batched matmuls, another attention kernel):
about 1e-5 here, so 1e-3 leaves a wide margin. A half-precision scan rounds every weight and
every activation of every block: float16 (11 significant bits) drifts by a few thousandths
of a typical activation, bfloat16 (8 bits) by about a percent, more in deep models; 0.05 +
2 % and 0.1 + 5 % keep those in while a layer whose weights are wrong (an error of tens of
percent) stands far outside. A pair near a threshold (within the tolerance of ``high`` or
``low``), or whose rank lies within the tolerance of the neuron across the cap from it, may
legitimately land on either side, and is not counted ``off``. A layer fails when more than
`MAX_OFF` of its pairs are off; the scan fails its check when any layer does.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import torch
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from neuroscan.errors import UserError
from neuroscan.manifest import LayerCheck, Manifest, SelectionInfo, Verification
from neuroscan.schema import TABLES
from workers.checkpoint import load_config, tensor_files, tensor_headers
from workers.families import family
from workers.footprint import free_bytes

SEED = 0
"""The prompts run again are drawn by this seed: the same run always checks the same prompts."""
TOLERANCES = {"float32": (1e-3, 1e-3), "float16": (0.05, 0.02), "bfloat16": (0.1, 0.05)}
"""(atol, rtol) by the scan's dtype; see the module's docstring."""
MAX_OFF = 0.01
"""The share of a layer's pairs that may be off before the layer fails."""


def draw(prompt_ids: list[int], n: int, seed: int = SEED) -> list[int]:
    """``n`` of ``prompt_ids`` (all of them when there are fewer), drawn by ``seed``, ascending."""
    ids = np.unique(np.asarray(prompt_ids, dtype=np.int64))
    if n >= len(ids):
        return ids.tolist()
    return np.sort(np.random.default_rng(seed).choice(ids, size=n, replace=False)).tolist()


def verify_device(scan_device: str) -> str:
    """Where the check runs: on this process's GPU when the scan ran on CUDA and one is seen, else the CPU."""
    return "cuda" if scan_device == "cuda" and torch.cuda.is_available() else "cpu"


class Float32Model:
    """The plain transformers model of a checkpoint in float32 on ``device``, loaded at its
    first use and kept (the service checks every scan with one copy)."""

    def __init__(self, model_path: str, device: str = "cpu"):
        self.path, self.device = model_path, device
        self.model = None
        self.lock = threading.Lock()  # one prompt at a time: the hooks are the model's

    def extremes(self, prompts: dict[int, list[int]]) -> dict[int, np.ndarray]:
        """Each prompt run alone: prompt_id -> [2, layers, d_mlp] float32, every neuron's max
        (index 0) and min (1) over the prompt's tokens."""
        with self.lock:
            if self.model is None:
                self._check_room()
                with _quiet_loading():
                    self.model = AutoModelForCausalLM.from_pretrained(self.path, dtype=torch.float32)
                self.model = self.model.to(self.device).eval()
            return _extremes(self.model, family(load_config(self.path)), prompts, self.device)

    def _check_room(self) -> None:
        """One line, before anything loads, when the float32 weights do not fit in what the
        device has free (`workers.footprint.free_bytes`)."""
        path = Path(self.path)
        headers = tensor_headers(path, list(tensor_files(path)))
        need = sum(math.prod(shape) for shape, _ in headers.values()) * 4
        free = free_bytes(torch.device(self.device))
        if need > free:
            raise UserError(
                f"the fidelity check needs {need / 2**30:.1f} GiB for the model in float32 on {self.device} but "
                f"{free / 2**30:.1f} GiB is free: check with --verify 0 off, or where there is room"
            )


def _extremes(model, fam, prompts: dict[int, list[int]], device: str) -> dict[int, np.ndarray]:
    blocks = model.get_submodule(fam.prefix + fam.blocks)
    layers: list[torch.Tensor] = []

    def take(module, inputs):
        act = inputs[0][0]  # [pos, d_mlp]
        layers.append(torch.stack([act.amax(dim=0), act.amin(dim=0)]))  # [2, d_mlp]

    hooks = [block.get_submodule(fam.down).register_forward_pre_hook(take) for block in blocks]
    out = {}
    try:
        with torch.inference_mode():
            for prompt_id, ids in prompts.items():
                layers.clear()
                model(torch.tensor([ids], device=device), use_cache=False)
                out[prompt_id] = torch.stack(layers, dim=1).float().cpu().numpy()  # [2, layers, d_mlp]
    finally:
        for hook in hooks:
            hook.remove()
    return out


@contextmanager
def _quiet_loading() -> Iterator[None]:
    """transformers' loading bar and notices off while the open context loads: the scan's
    stderr is its own lines."""
    bar, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


@dataclass
class Kept:
    """The selection and the cap of one (prompt, layer) worked out from float32 extremes."""

    selected: np.ndarray
    """[d_mlp] bool."""
    red: np.ndarray
    """[d_mlp] bool: selected by the red rule (max > high)."""
    past: np.ndarray
    """[d_mlp] float: how far past its threshold a neuron goes (max - high if red, else low - min)."""
    ranked: np.ndarray
    """The selected neurons, best first."""
    kept: np.ndarray
    """The first ``max_per_layer`` of them (all with 0)."""


def kept_neurons(mx: np.ndarray, mn: np.ndarray, sel: SelectionInfo) -> Kept:
    """Selected: ``max > high`` or ``min < low``. Kept: at most ``max_per_layer`` of them (0:
    all), red-selected first by ``max - high``, then blue-only by ``low - min``, ties to the
    lower neuron."""
    red, blue = mx > sel.high, mn < sel.low
    selected = red | blue
    past = np.where(red, mx - sel.high, sel.low - mn)
    idx = np.flatnonzero(selected)
    order = np.lexsort((idx, -past[idx], ~red[idx]))  # the last key sorts first
    ranked = idx[order]
    return Kept(selected, red, past, ranked, ranked[: sel.max_per_layer or len(idx)])


def compare(
    extremes: dict[int, np.ndarray],
    rows: dict[str, np.ndarray],
    n_selected: dict[tuple[int, int], int],
    sel: SelectionInfo,
    dtype: str,
) -> dict[str, LayerCheck]:
    """Per layer, the scan's rows of the prompts in ``extremes`` against the float32 pass.

    rows: the scan's activation rows of those prompts, numpy columns prompt_id, layer, neuron,
    max_act, min_act; n_selected: (prompt_id, layer) -> ``layers/``'s n_selected."""
    atol, rtol = TOLERANCES[dtype]
    n_layers = next(iter(extremes.values())).shape[1]
    key = rows["prompt_id"].astype(np.int64) * n_layers + rows["layer"]
    order = np.argsort(key, kind="stable")
    keys, starts = np.unique(key[order], return_index=True)
    where = dict(zip(keys.tolist(), np.split(order, starts[1:])))
    sums = {layer: np.zeros(6, np.int64) for layer in range(n_layers)}  # pairs, both, selected x2, flips, off
    diffs = {layer: [0.0, 0.0] for layer in range(n_layers)}
    empty = np.zeros(0, np.int64)
    for prompt_id, ext in extremes.items():
        for layer in range(n_layers):
            at = where.get(prompt_id * n_layers + layer, empty)
            scan = {name: rows[name][at] for name in ("neuron", "max_act", "min_act")}
            counts, worst = _check_one(
                ext[0, layer], ext[1, layer], scan, n_selected.get((prompt_id, layer), 0), sel, atol, rtol
            )
            sums[layer] += counts
            diffs[layer] = [float(np.maximum(a, b)) for a, b in zip(diffs[layer], worst)]  # NaN stays NaN
    checks = {}
    for layer, (pairs, both, selected, selected_fp32, flips, off) in sums.items():
        checks[str(layer)] = LayerCheck(
            pairs=int(pairs),
            kept_agreement=float(both / pairs) if pairs else 1.0,
            selected=int(selected),
            selected_fp32=int(selected_fp32),
            flips=int(flips),
            max_diff=diffs[layer][0],
            min_diff=diffs[layer][1],
            off=int(off),
        )
    return checks


def _check_one(
    mx: np.ndarray,
    mn: np.ndarray,
    scan: dict[str, np.ndarray],
    n_selected: int,
    sel: SelectionInfo,
    atol: float,
    rtol: float,
) -> tuple[np.ndarray, tuple[float, float]]:
    """One (prompt, layer): [pairs, kept by both, selected by the scan, by float32, flips, off]
    and the largest (|max_act|, |min_act|) differences."""
    ref = kept_neurons(mx, mn, sel)
    tol_max, tol_min = atol + rtol * np.abs(mx), atol + rtol * np.abs(mn)  # [d_mlp]
    near = (np.abs(mx - sel.high) <= tol_max) | (np.abs(mn - sel.low) <= tol_min)  # either side is fair
    neuron = scan["neuron"].astype(np.int64)
    d_max, d_min = np.abs(scan["max_act"] - mx[neuron]), np.abs(scan["min_act"] - mn[neuron])
    off = set(neuron[~(d_max <= tol_max[neuron]) | ~(d_min <= tol_min[neuron])].tolist())  # NaN is off

    ours, theirs = set(ref.kept.tolist()), set(neuron.tolist())
    cap = sel.max_per_layer or len(mx)
    tol_past = np.where(ref.red, tol_max, tol_min)

    def swapped(j: int, k: int | None) -> bool:  # j and k within the tolerance of each other's rank
        return (
            k is not None and ref.red[j] == ref.red[k] and abs(ref.past[j] - ref.past[k]) <= tol_past[j] + tol_past[k]
        )

    capped = n_selected > cap or len(ref.ranked) > cap
    last_in = ref.kept[-1] if capped and len(ref.kept) else None
    first_out = ref.ranked[cap] if len(ref.ranked) > cap else last_in  # float32 kept all: the scan's cap pushed one out
    for j in ours ^ theirs:  # each may have swapped places, at the cap, with the neuron on the other side of it
        if not (near[j] or swapped(j, first_out if j in ours else last_in)):
            off.add(j)

    fp32_selected = int(ref.selected.sum())
    gap = abs(n_selected - fp32_selected)
    seen = int((~ref.selected[neuron]).sum())  # kept by the scan, unselected in float32
    if n_selected <= cap:  # the scan kept every neuron it selected: one it lacks, it did not select
        seen += len(ours - theirs)
    unexplained = max(0, gap - int(near.sum()) - len(off))  # what the rows above do not already count
    counts = np.array(
        [len(ours | theirs), len(ours & theirs), n_selected, fp32_selected, max(seen, gap), len(off) + unexplained]
    )
    worst = (float(d_max.max(initial=0.0)), float(d_min.max(initial=0.0)))  # NaN stays NaN
    return counts, worst


def verify_scan(
    out: Path, manifest: Manifest, n: int, device: str = "cpu", seed: int = SEED, model: Float32Model | None = None
) -> Verification:
    """Run ``n`` of the committed prompts of the scan in ``out`` again in float32 on ``device``
    (through ``model`` when given, a model of the scan's checkpoint already loaded) and compare
    them with its tables (the files ``manifest`` lists)."""
    t0 = time.perf_counter()
    ids = draw(_read(out, manifest, "prompts", ["prompt_id"])["prompt_id"].to_pylist(), n, seed)
    chosen = pc.field("prompt_id").isin(ids)
    tokens = _read(out, manifest, "prompts", ["prompt_id", "token_ids"], chosen)
    token_ids = dict(zip(tokens["prompt_id"].to_pylist(), tokens["token_ids"].to_pylist()))
    model = model or Float32Model(manifest.model.path, device)
    extremes = model.extremes({p: token_ids[p] for p in ids})
    acts = _read(out, manifest, "activations", ["prompt_id", "layer", "neuron", "max_act", "min_act"], chosen)
    layers = _read(out, manifest, "layers", ["prompt_id", "layer", "n_selected"], chosen)
    selected = {
        (p, layer): s for p, layer, s in zip(*(layers[c].to_pylist() for c in ("prompt_id", "layer", "n_selected")))
    }
    rows = {name: acts[name].to_numpy() for name in acts.column_names}
    checks = compare(extremes, rows, selected, manifest.selection, manifest.model.dtype)
    atol, rtol = TOLERANCES[manifest.model.dtype]
    result = Verification(
        prompts=ids,
        seed=seed,
        device=model.device,
        atol=atol,
        rtol=rtol,
        max_off=MAX_OFF,
        passed=True,
        seconds=0.0,
        layers=checks,
    )
    result.passed = not result.failed()
    result.seconds = time.perf_counter() - t0
    return result


def _read(out: Path, manifest: Manifest, table: str, columns: list[str], where=None) -> pa.Table:
    """The committed files of ``table``, the rows ``where`` selects."""
    files = [str(Path(out) / f.path) for f in manifest.files(f"{table}/")]
    found = ds.dataset(files, format=manifest.format) if files else ds.dataset(TABLES[table].empty_table())
    return found.to_table(columns=columns, filter=where)
