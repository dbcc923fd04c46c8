"""``manifest.json``, typed: the run's identity and the list of committed parts.

`Manifest` is the one definition of the file's keys: the aggregator writes it, the driver,
``--resume``, the report and ``compare`` read it, all through these dataclasses (the JSON
keys are their field names). A file under the output directory counts only once the
manifest lists it. `write_manifest` writes a temporary file, fsyncs it, renames it over the
old one and fsyncs the directory, so a crash leaves either the old manifest or the new one,
never a torn one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
import typing
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from neuroscan.errors import UserError

NAME = "manifest.json"
RUNNING, COMPLETE = "running", "complete"


@dataclass(frozen=True)
class PartFile:
    """One table file, as `aggregator.writer.write_table` left it."""

    path: str
    """Relative to the output directory."""
    rows: int
    bytes: int
    sha256: str


@dataclass
class Part:
    """A committed part: the micro-batches it holds and its files (every table's)."""

    part: int
    batches: list[int]
    files: list[PartFile]


@dataclass
class ModelInfo:
    id: str
    """What ``--model`` named (the embedded model's name without it)."""
    path: str
    """The local directory actually loaded."""
    dtype: str
    revision: str | None = None
    fingerprint: str | None = None
    """A digest of the weights (`workers.checkpoint.fingerprint`); None in runs written before it."""
    neurons: int | None = None
    """MLP neurons per layer; None in runs written before it was recorded."""
    architecture: str | None = None
    """The checkpoint's ``model_type`` ("gptj", "gpt_neox", "llama"...); None in runs written
    before it was recorded (all GPT-J)."""


@dataclass
class SelectionInfo:
    high: float
    low: float
    max_per_layer: int


@dataclass
class BandEdges:
    low: float
    high: float
    red: float


@dataclass
class Corpus:
    source: str
    """The corpus's resolved path, or a built-in corpus's name."""
    sha256: str | None
    """Of the file's bytes (a directory: its files' names, sizes and bytes); None when built in."""
    columns: dict[str, str] = field(default_factory=dict)
    """Its extra columns, in ``prompts/`` after neuroscan's, and their Arrow types
    (`neuroscan.corpus_columns`); a change of them changes ``sha256``, which ``--resume`` checks."""
    prompts: int | None = None
    """How many prompts the corpus holds: the whole scan, of which ``totals.prompts`` are
    committed (a report of an unfinished scan says how far it got); None in runs written
    before it was recorded."""


@dataclass
class Totals:
    prompts: int = 0
    tokens: int = 0
    activation_rows: int = 0


@dataclass
class Counters:
    """Sums over the committed parts, from which `Summary` is computed."""

    layers: dict[str, list[int]] = field(default_factory=dict)
    """Per layer: [prompts, selected, kept, selected by the red rule, selected by the blue rule]."""
    accuracy: dict[str, dict[str, list[int]]] = field(default_factory=lambda: {"family": {}, "variant": {}})
    """Per ``family``/``variant`` value: [correct, answered]."""


@dataclass
class LayerSummary:
    mean_selected: float
    mean_kept: float
    mean_red: float | None = None
    """Neurons selected by the red rule (max > high) per prompt; None in schema 1 runs."""
    mean_blue: float | None = None
    """... by the blue rule (min < low)."""


@dataclass
class Accuracy:
    correct: int
    total: int
    accuracy: float


@dataclass
class Summary:
    layers: dict[str, LayerSummary] = field(default_factory=dict)
    accuracy: dict[str, dict[str, Accuracy]] = field(default_factory=dict)


@dataclass
class LayerCheck:
    """One layer of the fidelity check (`workers.verify`), summed over the prompts run again."""

    pairs: int
    """(prompt, neuron) pairs kept by the scan, by the float32 pass, or by both."""
    kept_agreement: float
    """The share of those kept by both (the kept sets' Jaccard index; 1.0 when neither kept any)."""
    selected: int
    selected_fp32: int
    """Selected neurons: the scan's (``layers/``) and the float32 pass's."""
    flips: int
    """Pairs selected by one and not the other, as far as the rows show them (at least the
    difference of the two selected counts, prompt by prompt)."""
    max_diff: float
    min_diff: float
    """The largest |max_act| and |min_act| difference between a scan's row and the float32 pass."""
    off: int
    """Disagreements the tolerance does not explain: rows whose max_act or min_act lies past
    it, kept-set differences of neurons near neither a threshold nor the cap's boundary, and
    selected counts further apart than the neurons near a threshold."""


@dataclass
class Verification:
    """The fidelity check of a finished scan (``--verify N``, `workers.verify`)."""

    prompts: list[int]
    """The prompt_ids run again, drawn by ``seed`` from the committed prompts."""
    seed: int
    device: str
    """Where the float32 pass ran."""
    atol: float
    rtol: float
    """A value agrees when within ``atol + rtol * |float32 value|`` (set by the scan's dtype)."""
    max_off: float
    """A layer fails when more than this share of its pairs is ``off``."""
    passed: bool
    seconds: float
    layers: dict[str, LayerCheck] = field(default_factory=dict)

    def failed(self) -> list[int]:
        """The layers past the tolerance, in order."""
        return [int(k) for k, c in self.layers.items() if c.off > self.max_off * c.pairs]


@dataclass
class Manifest:
    """The whole of ``manifest.json``. The fields down to ``packing`` are fixed when the
    run starts (the header); the rest grows as parts are committed."""

    schema_version: int
    model: ModelInfo
    selection: SelectionInfo
    bands: BandEdges
    stages: int
    replicas: int
    partition: list[list[int]]
    """Per stage: [first layer, last layer + 1]."""
    device: str
    handoff: str
    batch_tokens: int
    top_k: int
    format: str
    truncate: bool
    corpus: Corpus
    versions: dict[str, str | None]
    started_at: str
    packing: str = "longest-first"
    """How the corpus was cut into micro-batches (`prompts.batching.PACKINGS`); a manifest
    from before the key was written says nothing, and was packed longest first."""
    tensor_parallel: int = 1
    """Ranks each stage's blocks were sharded over (``--tensor-parallel``); the rows do not depend on it."""
    status: str = RUNNING
    parts: list[Part] = field(default_factory=list)
    totals: Totals = field(default_factory=Totals)
    counters: Counters = field(default_factory=Counters)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    """Prompts left out by ``--on-error skip``: prompt_id, id, reason."""
    resumed_at: list[str] = field(default_factory=list)
    summary: Summary = field(default_factory=Summary)
    neurons: PartFile | None = None
    """``neurons/``, written when the run completes."""
    empty_layers: list[PartFile] = field(default_factory=list)
    timings: dict[str, Any] = field(default_factory=dict)
    """seconds, tokens_per_s, memory per process, aggregator_lag_s, finished_at, transports."""
    verification: Verification | None = None
    """The fidelity check, written after the run completes; None when ``--verify 0`` (or in
    runs written before it existed)."""

    @property
    def n_layers(self) -> int:
        return int(self.partition[-1][1])

    @property
    def complete(self) -> bool:
        return self.status == COMPLETE

    def committed_batches(self) -> set[int]:
        return {b for part in self.parts for b in part.batches}

    def files(self, prefix: str = "") -> list[PartFile]:
        """The committed parts' files whose path starts with ``prefix``."""
        return [f for part in self.parts for f in part.files if f.path.startswith(prefix)]

    def listed(self) -> list[PartFile]:
        """Every table file the manifest lists: the parts', the empty layers', ``neurons/``."""
        return [*self.files(), *self.empty_layers, *([self.neurons] if self.neurons else [])]

    def run_metadata(self) -> dict:
        """What every table file carries in its schema metadata (`neuroscan.schema`)."""
        return {"model": asdict(self.model), "selection": asdict(self.selection), "bands": asdict(self.bands)}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        return _load(cls, data)


def write_manifest(out_dir: Path, manifest: Manifest) -> None:
    """Replace ``out_dir``'s manifest whole; on a full disk (or any write error) the one before
    stays, the temporary file is removed, and the error is one line."""
    out_dir = Path(out_dir)
    tmp = out_dir / f".{NAME}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(manifest.to_dict(), f, indent=1, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out_dir / NAME)
        fsync_dir(out_dir)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise UserError(
            f"writing {out_dir / NAME} failed ({err.strerror or err}); the manifest before it is intact: "
            "fix the disk (space, permissions), then rerun the same command with --resume"
        ) from None


def damaged_files(out_dir: Path, manifest: Manifest, hashes: bool = False) -> list[str]:
    """One line for each file the manifest lists that is not as it was written: missing,
    another size, or (with ``hashes``, reading every file) other bytes than its sha256."""
    return list(file_damage(out_dir, manifest, hashes).values())


def file_damage(out_dir: Path, manifest: Manifest, hashes: bool = False) -> dict[str, str]:
    """`damaged_files` by file: the path of each damaged file (as the manifest lists it) and
    its line, in the manifest's order."""
    out_dir = Path(out_dir)

    def problem(f: PartFile) -> str | None:
        path = out_dir / f.path
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return f"{f.path} is missing"
        if size != f.bytes:
            return f"{f.path} is {size:,} bytes, not the {f.bytes:,} written"
        if hashes and file_sha256(path) != f.sha256:
            return f"{f.path} holds other bytes than were written (its sha256 differs)"
        return None

    listed = manifest.listed()
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # hashing releases the GIL
        return {f.path: line for f, line in zip(listed, pool.map(problem, listed)) if line}


def damage_line(out_dir: Path, problems: list[str], fix: str) -> str:
    """The one line for a run whose files do not match its manifest."""
    more = f" (and {len(problems) - 1} more: `neuroscan check {out_dir}` lists them)" if len(problems) > 1 else ""
    return f"{out_dir} is damaged: {problems[0]}{more}: {fix}"


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file's bytes (what `PartFile.sha256` records)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(out_dir: Path) -> Manifest | None:
    """The manifest in ``out_dir``, None if it has none; one that is not neuroscan's stops with one line."""
    path = Path(out_dir) / NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        problem = f"not valid JSON ({getattr(err, 'msg', None) or err.reason})"
    else:
        if not isinstance(data, dict):
            problem = f"a JSON {type(data).__name__}, not an object"
        elif "parts" not in data:
            problem = 'a JSON object without "parts"'
        else:
            try:
                return Manifest.from_dict(data)
            except (TypeError, ValueError, KeyError) as err:
                problem = f"not a neuroscan manifest ({err})"
    raise UserError(
        f"{path} is {problem}: something other than neuroscan wrote it (neuroscan replaces it whole); "
        "restore it, or scan again with --overwrite"
    )


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


JSON_TYPES = {dict: dict, list: list, str: str, bool: bool, int: int, float: (int, float)}


def _load(kind, data, where: str = "manifest"):
    """``data`` (parsed JSON) as ``kind``: a dataclass, ``list[X]``, ``dict[str, X]``, ``X | None``
    or a plain type, checked all the way down (a ``TypeError`` names the key that is wrong);
    keys a dataclass does not declare are ignored, missing ones take the field's default."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return None if data is None else _load(next(a for a in args if a is not type(None)), data, where)
    if kind is Any:
        return data
    expected = JSON_TYPES[dict if dataclasses.is_dataclass(kind) else origin or kind]
    if not isinstance(data, expected) or (kind in (int, float) and isinstance(data, bool)):
        raise TypeError(f"{where} is {type(data).__name__}, not {getattr(origin or kind, '__name__', kind)}")
    if dataclasses.is_dataclass(kind):
        hints = typing.get_type_hints(kind)
        fields = [f.name for f in dataclasses.fields(kind) if f.name in data]
        return kind(**{name: _load(hints[name], data[name], f"{where}.{name}") for name in fields})
    if origin is list:
        return [_load(args[0], item, f"{where}[{i}]") for i, item in enumerate(data)]
    if origin is dict:
        return {key: _load(args[1], value, f"{where}.{key}") for key, value in data.items()}
    return data


FLOOD = 0.9
"""The fraction of a layer's neurons the blue rule selects per prompt past which it is said."""


GELU_MODELS = (None, "gptj", "gpt_neox", "gpt2")
"""``model_type``s whose MLP activation is a GELU (None: runs written before it was recorded, all GPT-J)."""


def blue_flood_line(manifest: Manifest) -> str | None:
    """When the blue rule (``min < low``) selected nearly every neuron on a typical prompt (what
    ``--low 0`` does on a GELU model: GELU is negative for every negative input), one line that
    says so and which flag changes it; else None."""
    n = manifest.model.neurons
    layers = manifest.summary.layers
    flooded = [int(k) for k, s in layers.items() if n and s.mean_blue is not None and s.mean_blue >= FLOOD * n]
    if not flooded:
        return None
    worst = max(layers[str(k)].mean_blue for k in flooded) / n
    low = manifest.selection.low
    head = f"--low {low:g} selected up to {worst:.0%} of the {n} neurons a prompt in {len(flooded)} of {len(layers)} layers"
    if manifest.model.architecture not in GELU_MODELS:  # a gated MLP: act_fn(gate) * up
        return (
            f"{head} (a gated MLP's activation, act(gate) * up, is negative wherever up is, so nearly every neuron "
            "dips below it): red-selected neurons are kept first, but the blue counts say little; give a lower --low "
            "to select only strongly negative neurons (--low -1 leaves the red rule alone)"
        )
    near = "--low -0.15 keeps those near it, " if low > -0.15 else ""
    why = (
        "GELU is negative on every negative input, so nearly every neuron dips below it"
        if low >= 0
        else "GELU's minimum is about -0.17, and nearly every neuron comes near it on some token"
    )
    return (
        f"{head} ({why}): red-selected neurons are kept first, but the blue counts say little; give a lower --low "
        f"to select only strongly negative neurons (GELU's minimum is about -0.17: {near}--low -1 leaves the red "
        "rule alone)"
    )


def verification_line(manifest: Manifest) -> str | None:
    """The fidelity check (``--verify``) in one line: passed, with its figures, or failed, with
    the first layer past the tolerance and what to do; None when the run was not checked."""
    v = manifest.verification
    if v is None or not v.layers:
        return None
    checks = v.layers.values()
    pairs = sum(c.pairs for c in checks)
    agree = sum(c.kept_agreement * c.pairs for c in checks) / pairs if pairs else 1.0
    worst = max(v.layers, key=lambda k: v.layers[k].max_diff)
    against = (
        f"{len(v.prompts)} prompts run again alone through the plain transformers model in float32 on {v.device}; "
        f"tolerance {v.atol:g} + {v.rtol:g} x |act| for {manifest.model.dtype}"
    )
    failed = v.failed()
    if not failed:
        return (
            f"fidelity check passed ({against}): kept sets agree {agree:.1%}, "
            f"{sum(c.flips for c in checks)} (prompt, neuron) pairs flip across a threshold, largest |max_act| "
            f"difference {v.layers[worst].max_diff:.3g} (layer {worst})"
        )
    first = v.layers[str(failed[0])]
    fix = (
        "report it with this manifest.json"
        if manifest.model.dtype == "float32"
        else "scan again with --dtype float32 (or bfloat16, where float16 overflows) to see whether half precision "
        "explains it, else report it with this manifest.json"
    )
    return (
        f"fidelity check FAILED from layer {failed[0]} ({len(failed)} of {len(v.layers)} layers past the tolerance; "
        f"{against}): in layer {failed[0]}, {first.off} of {first.pairs} (prompt, neuron) pairs disagree, largest "
        f"|max_act| difference {first.max_diff:.3g}; the tables are kept, but their rows are not what the model "
        f"computes: {fix}"
    )
