"""Every command's configuration: frozen dataclasses, one declaration per flag.

A field declared with `option` is a command-line flag: its default, help text, choices and
bounds live here, beside the field, and `cluster.cli` builds argparse from them (the flag is
the field's name with dashes). `check` is the one check of a configuration, run before
anything starts: the bounds and choices declared here, then the class's own cross-field
rules (``checks``). Fields declared without `option` are settings for callers of the
Python API only.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neuroscan.errors import UserError, one_of

DEVICES = ("cpu", "cuda")
DTYPES = ("auto", "float32", "float16", "bfloat16")
FORMATS = ("parquet", "arrow")
ON_ERROR = ("stop", "skip")
HANDOFFS = ("store", "direct")
COMPARE_SORTS = ("diff", "z", "q", "red_diff")

MODEL_PRESETS: dict[str, dict] = {
    # GPT-J's 28 blocks at a tiny width: the embedded model.
    "tiny": dict(
        model_type="gptj",
        vocab_size=257,
        n_positions=2048,
        n_embd=128,
        n_layer=28,
        n_head=4,
        rotary_dim=16,
        n_inner=512,
        bos_token_id=256,
        eos_token_id=256,
        tie_word_embeddings=False,
        dtype="float32",
    ),
    # A tiny model of each other family (6 blocks, 64 wide, the byte tokenizer): the tests'.
    "tiny-neox": dict(
        model_type="gpt_neox",
        vocab_size=257,
        hidden_size=64,
        num_hidden_layers=6,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=2048,
        rotary_pct=0.25,
        bos_token_id=256,
        eos_token_id=256,
        dtype="float32",
    ),
    "tiny-llama": dict(
        model_type="llama",
        vocab_size=257,
        hidden_size=64,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=192,
        max_position_embeddings=2048,
        bos_token_id=256,
        eos_token_id=256,
        dtype="float32",
    ),
    "tiny-qwen2": dict(
        model_type="qwen2",
        vocab_size=257,
        hidden_size=64,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=192,
        max_position_embeddings=2048,
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=3,
        tie_word_embeddings=True,
        bos_token_id=256,
        eos_token_id=256,
        dtype="float32",
    ),
    "tiny-mistral": dict(
        model_type="mistral",
        vocab_size=257,
        hidden_size=64,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=1,
        intermediate_size=192,
        max_position_embeddings=2048,
        sliding_window=16,
        bos_token_id=256,
        eos_token_id=256,
        dtype="float32",
    ),
    "tiny-gpt2": dict(
        model_type="gpt2",
        vocab_size=257,
        n_positions=2048,
        n_embd=64,
        n_layer=6,
        n_head=4,
        scale_attn_by_inverse_layer_idx=True,
        bos_token_id=256,
        eos_token_id=256,
        dtype="float32",
    ),
    # GPT-J-6B's exact shapes (EleutherAI/gpt-j-6b config.json), random fp16 weights.
    "gptj-6b": dict(
        model_type="gptj",
        vocab_size=50400,
        n_positions=2048,
        n_embd=4096,
        n_layer=28,
        n_head=16,
        rotary_dim=64,
        n_inner=None,
        bos_token_id=50256,
        eos_token_id=50256,
        tie_word_embeddings=False,
        dtype="float16",
    ),
    # Pythia-6.9B's shapes (EleutherAI/pythia-6.9b config.json), random fp16 weights.
    "pythia-6.9b": dict(
        model_type="gpt_neox",
        vocab_size=50432,
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        intermediate_size=16384,
        max_position_embeddings=2048,
        rotary_pct=0.25,
        rotary_emb_base=10000,
        use_parallel_residual=True,
        bos_token_id=0,
        eos_token_id=0,
        dtype="float16",
    ),
    # Llama-3-8B's shapes (meta-llama/Meta-Llama-3-8B config.json), random bf16 weights.
    "llama-3-8b": dict(
        model_type="llama",
        vocab_size=128256,
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        bos_token_id=128000,
        eos_token_id=128001,
        dtype="bfloat16",
    ),
    # GPT-2 XL's shapes (openai-community/gpt2-xl config.json), random fp16 weights (the
    # released ones are fp32).
    "gpt2-xl": dict(
        model_type="gpt2",
        vocab_size=50257,
        n_positions=1024,
        n_embd=1600,
        n_layer=48,
        n_head=25,
        bos_token_id=50256,
        eos_token_id=50256,
        dtype="float16",
    ),
}
"""The shapes `neuroscan make-model --preset` and `neuroscan bench --preset` write, each with
the ``model_type`` of its family (`workers.families`)."""

BENCH_MODES = (
    "bare",
    "bare_hf_gelu",
    "bare_hf_rotary",
    "naive",
    "scan_local_eager",
    "scan_local_inline",
    "scan_local",
    "transformer_lens",
    "nnsight",
    "bare_again",
    "scan",
    "scan_2stage",
    "scan_2stage_direct",
)
"""`bench.run` says what each mode measures; they run in this order."""


PIPELINE_OPTIONS = (
    "model",
    "stages",
    "replicas",
    "tensor_parallel",
    "device",
    "gpus_per_stage",
    "handoff",
    "dtype",
    "in_flight",
)
"""`ScanConfig`'s flags that `neuroscan serve` fixes for every scan it runs: its pipelines."""
SCAN_OPTIONS = (
    "high",
    "low",
    "red",
    "max_per_layer",
    "top_k",
    "batch_tokens",
    "truncate",
    "on_error",
    "format",
    "rows_per_part",
    "verify",
)
"""`ScanConfig`'s flags that each scan submitted to the service chooses for itself."""


def cache_dir() -> Path:
    """Where the embedded model and the benchmark's presets are written once:
    ``$NEUROSCAN_CACHE``, by default ``~/.cache/neuroscan``."""
    return Path(os.environ.get("NEUROSCAN_CACHE") or Path.home() / ".cache" / "neuroscan")


def resolve_dtype(dtype: str, device: str, stored: object = None) -> str:
    """``--dtype auto``: float32 on the CPU (half precision is slow there), the checkpoint's
    dtype (``stored``, as its config.json says it) on CUDA, float16 when it says none."""
    if dtype != "auto":
        return dtype
    if device == "cpu":
        return "float32"
    stored = str(stored or "float16").removeprefix("torch.")
    return stored if stored in ("float16", "bfloat16", "float32") else "float16"


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    choices: tuple = (),
    minimum: float | None = None,
    hint: str = "",
    positional: bool = False,
    group: str | None = None,
    name: str | None = None,
    what: str | None = None,
):
    """A field that is a command-line flag: ``--field-name`` with this help.

    choices: allowed values (each one, for a comma-separated list); minimum: the smallest
    allowed value; hint: what completes either error; positional: an argument, not a flag;
    group: the ``--help`` section; name: what errors call it (default: the flag); what: the
    kind of value to give when it is empty. A field without a default is a required flag;
    a bool field is a switch that is off unless given."""
    if isinstance(default, bool) and default:
        raise ValueError("a switch is off by default: name the field for what turning it on does")
    meta = {
        "help": help,
        "choices": tuple(choices),
        "minimum": minimum,
        "hint": hint,
        "positional": positional,
        "group": group,
        "name": name,
        "what": what,
    }
    return field(default=default, metadata={"option": meta})


def options(cls) -> list[tuple[dataclasses.Field, dict, type]]:
    """(field, its `option` metadata, its type) for every flag of a config class, nested ones
    (such as `ScanConfig.selection`) included."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += options(hints[f.name])
        elif "option" in f.metadata:
            out.append((f, f.metadata["option"], hints[f.name]))
    return out


def flag_name(f: dataclasses.Field) -> str:
    """The flag of an `option` field (``--batch-tokens``); a positional's name in messages."""
    meta = f.metadata["option"]
    return meta["name"] or (f.name if meta["positional"] else "--" + f.name.replace("_", "-"))


def check(cfg) -> None:
    """Stop with one line at the first value out of its declared bounds or choices, then run
    the class's own ``checks`` (rules between fields); nested configs are checked first."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            check(value)
            continue
        meta = f.metadata.get("option")
        if meta is None or value is None:
            continue
        name = flag_name(f)
        if isinstance(value, str) and not value.strip():
            raise UserError(f"{name} is empty: give {meta['what'] or 'a value'}")
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if meta["choices"]:
                one_of(name, item, meta["choices"], meta["hint"])
        if meta["minimum"] is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
            if not value >= meta["minimum"]:
                raise UserError(f"{name} {value} must be at least {meta['minimum']:g}{meta['hint']}")
    cfg.checks()


class Config:
    """What every configuration class can do: `validate` itself, by `check`."""

    def validate(self) -> None:
        check(self)

    def checks(self) -> None:
        """Rules between fields, beyond each field's declared bounds and choices."""


@dataclass(frozen=True, kw_only=True)
class Selection(Config):
    """Which (prompt, neuron) pairs are kept, and how tokens are coloured."""

    high: float = option(
        3.0, "select a neuron when some token is above this (red or orange band)", group="what is kept"
    )
    low: float = option(
        0.0,
        "... or below this (blue band); GELU is negative for every negative input, so 0 selects a lot",
        group="what is kept",
    )
    red: float = option(3.5, "band edge between orange (high < act <= red) and red (act > red)", group="what is kept")
    max_per_layer: int = option(
        500,
        "keep at most this many selected neurons per (prompt, layer): those above --high first (by max_act - high), "
        "then those only below --low (by low - min_act), ties to the lower neuron; 0 keeps all",
        minimum=0,
        hint=" (0 keeps all)",
        group="what is kept",
    )

    def checks(self) -> None:
        for name in ("high", "low", "red"):
            value = getattr(self, name)
            if not math.isfinite(value):
                raise UserError(f"--{name} {value} is not a finite number: give a real threshold")
        if self.high <= self.low:
            raise UserError(f"--high {self.high} must be greater than --low {self.low}: raise --high or lower --low")
        if self.red < self.high:
            raise UserError(f"--red {self.red} must be at least --high {self.high}: the red band sits above orange")


@dataclass(frozen=True, kw_only=True)
class ScanConfig(Config):
    """Everything a scan needs; one tree, checked by `validate` before Ray starts."""

    prompts: str = option(
        help="a .jsonl/.csv/.txt corpus (or one of those compressed: .gz, .bz2, .zst), a .parquet one, a directory of "
        "such files (a dataset's shards), or a built-in corpus name (seed)",
        positional=True,
        name="the prompt corpus",
        what="a .jsonl/.csv/.parquet/.txt file or seed",
    )
    out: str = option(
        help="output directory (manifest.json, activations/, prompts/, layers/, neurons/)",
        what="an output directory",
    )
    model: str | None = option(
        None,
        "checkpoint directory in Hugging Face layout, a Hugging Face id in the local cache, or demo "
        "(the GPT-J trained on the in-context families; default: the embedded tiny GPT-J)",
        what="a checkpoint directory, or leave --model out for the embedded tiny GPT-J",
    )
    truncate: bool = option(False, "keep the last tokens of prompts longer than the context instead of refusing them")
    quiet: bool = option(False, "no progress: neither the lines of the start (Ray, each stage loaded) nor the bar")
    selection: Selection = field(default_factory=Selection)
    top_k: int = option(20, "max-activating prompts kept per neuron in neurons/", minimum=1, group="what is kept")
    stages: int = option(
        1, "pipeline stages per replica; each holds a contiguous range of blocks", minimum=1, group="how it runs"
    )
    replicas: int = option(
        1, "independent copies of the pipeline; micro-batches are dealt round-robin", minimum=1, group="how it runs"
    )
    tensor_parallel: int = option(
        1,
        "processes each stage's blocks are sharded over by DeepSpeed AutoTP (one GPU each, on one node), each "
        "reducing its own slice of every layer's neurons; needs the deepspeed extra",
        minimum=1,
        group="how it runs",
    )
    device: str = option(
        "cpu",
        "where stages run (cuda: one GPU per stage, or per rank with --tensor-parallel)",
        choices=DEVICES,
        group="how it runs",
    )
    gpus_per_stage: float = option(
        1.0,
        "the share of a GPU each stage reserves, at most 1; 0.5 puts two stages on one GPU",
        group="how it runs",
    )
    handoff: str = option(
        "store",
        "hidden state between stages: store (pinned host copy, Ray's object store) or direct (the tensor "
        "itself: CUDA IPC on one GPU, NCCL between GPUs, Gloo on CPUs; a stage that dies then stops the run, "
        "resumable, instead of being restarted)",
        choices=HANDOFFS,
        group="how it runs",
    )
    dtype: str = option(
        "auto",
        "weights and activations (auto: float32 on CPU, the checkpoint's dtype on CUDA)",
        choices=DTYPES,
        group="how it runs",
    )
    batch_tokens: int = option(
        8192, "token budget of a micro-batch (rows x padded length)", minimum=1, group="how it runs"
    )
    in_flight: int = option(
        0,
        "micro-batches in flight per replica (0: 2 x stages + 1, so every stage has the next one queued)",
        minimum=0,
        hint=" (0: automatic)",
        group="how it runs",
    )
    on_error: str = option(
        "stop",
        "a prompt too large for device memory even alone: stop the run or skip it",
        choices=ON_ERROR,
        group="how it runs",
    )
    format: str = option(
        "parquet", "table files: Parquet (zstd) or Arrow IPC", choices=FORMATS, group="the output directory"
    )
    overwrite: bool = option(False, "replace a non-empty output directory", group="the output directory")
    resume: bool = option(
        False,
        "continue an interrupted run in --out (same model, thresholds, corpus and "
        "--batch-tokens): keep its committed parts, redo the rest",
        group="the output directory",
    )
    repair: bool = option(
        False,
        "with --resume: drop the committed parts whose files no longer match the manifest (missing, another "
        "size, other bytes) and scan their micro-batches again",
        group="the output directory",
    )
    rows_per_part: int = option(
        500_000, "activation rows buffered before a part is committed", minimum=1, group="the output directory"
    )
    verify: int = option(
        16,
        "after the scan, run this many of its prompts (drawn by a fixed seed) again, one at a time, through the "
        "plain transformers model in float32 and compare them with the rows; the result goes in manifest.json, "
        "and past the tolerance for the scan's dtype the command exits 3 (0: no check)",
        minimum=0,
        hint=" (0 turns the check off)",
        group="the output directory",
    )

    def checks(self) -> None:
        if self.overwrite and self.resume:
            raise UserError(
                "--overwrite and --resume contradict: --resume continues the run in --out, --overwrite deletes it; pass one"
            )
        if self.repair and not self.resume:
            raise UserError(
                "--repair rescans the damaged parts of the run in --out, so it goes with --resume: add --resume"
            )
        if not 0 < self.gpus_per_stage <= 1:
            # A stage runs on one GPU (GPT-J-6B's 12 GB of fp16 weights fit one); more would sit idle.
            raise UserError(
                f"--gpus-per-stage {self.gpus_per_stage:g} must be in (0, 1]: a stage runs on one GPU, "
                "so spread a model over more GPUs with --stages or --replicas"
            )
        if self.tensor_parallel > 1 and self.handoff == "direct":
            raise UserError(
                f"--handoff direct hands the hidden state to one process, but --tensor-parallel {self.tensor_parallel} "
                "stages are several: use --handoff store"
            )
        if self.tensor_parallel > 1 and self.device == "cuda" and self.gpus_per_stage < 1:
            raise UserError(
                f"--gpus-per-stage {self.gpus_per_stage:g} with --tensor-parallel {self.tensor_parallel} would put two "
                "ranks of a group on one GPU, which NCCL refuses: leave --gpus-per-stage at 1"
            )

    @property
    def window(self) -> int:
        """Micro-batches in flight per replica."""
        return self.in_flight or 2 * self.stages + 1


@dataclass(frozen=True, kw_only=True)
class BenchConfig(Config):
    """``neuroscan bench``: every mode on the same synthetic micro-batches, in one run."""

    device: str = option("cpu", "where the model runs", choices=DEVICES)
    preset: str = option(
        "tiny",
        "random weights of these shapes, each of its family (written once under --cache)",
        choices=tuple(MODEL_PRESETS),
        hint=" (or --model DIR)",
    )
    model: str | None = option(None, "a checkpoint directory instead of a preset", what="a checkpoint directory")
    dtype: str = option("auto", "auto: float32 on CPU, the checkpoint's dtype on CUDA", choices=DTYPES)
    prompts: int = option(64, "synthetic prompts, the same for every mode", minimum=1)
    prompt_tokens: int = option(256, "tokens a prompt", minimum=1)
    batch_tokens: int = option(8192, "token budget of a micro-batch", minimum=1)
    modes: tuple[str, ...] = option((), "comma-separated modes to run (default: all)", choices=BENCH_MODES)
    cache: str | None = option(
        None,
        "where presets' weights are written once (default: $NEUROSCAN_CACHE/bench, "
        "~/.cache/neuroscan/bench without it)",
        what="a directory",
    )
    out: str | None = option(None, "write the report as JSON here", what="a .json file")
    service: bool = option(
        False,
        "measure the scanning service instead (submit latency, warm against cold, many small scans "
        "against one, a small scan behind a large one; bench/service.py)",
    )
    tensor_parallel: int = option(
        1,
        "run the Ray modes' stages over this many ranks each (DeepSpeed AutoTP; one GPU each on CUDA)",
        minimum=1,
    )
    nodes: int = option(
        0,
        "measure instead the same scan on Ray clusters of 1 to this many nodes started on this machine, "
        "one 2-stage replica a node: start-up and tokens/s against one node (bench/nodes.py)",
        minimum=0,
    )

    @property
    def cache_path(self) -> Path:
        return Path(self.cache) if self.cache else cache_dir() / "bench"


@dataclass(frozen=True, kw_only=True)
class CheckConfig(Config):
    """``neuroscan check``: every file a scan's manifest lists, against its size and sha256."""

    dir: str = option(help="a scan's output directory", positional=True, what="a scan's output directory")


@dataclass(frozen=True, kw_only=True)
class ReportConfig(Config):
    """``neuroscan report``: a static site of a finished scan."""

    dir: str = option(help="a finished scan's output directory", positional=True, what="a scan's output directory")
    out: str | None = option(None, "write the site here instead of DIR/report/ (DIR is only read)", what="a directory")
    serve: bool = option(False, "also serve it on 127.0.0.1 and print the URL (Ctrl-C stops)")
    port: int = option(0, "port for --serve (0: any free port)")
    strips: int = option(
        32,
        "strips per (prompt, layer) on layer pages (0: one per kept neuron)",
        minimum=0,
        hint=" (0: every kept neuron)",
    )
    neurons_per_layer: int = option(20, "neurons per layer with their own page (the most often red)", minimum=1)
    chunk: int = 200
    """Prompts a data chunk of the site (a page fetches only the chunk of the prompt on screen)."""

    def checks(self) -> None:
        if not 0 <= self.port <= 65535:
            raise UserError(f"--port {self.port} is not a port number: use 1-65535, or 0 for any free port")


@dataclass(frozen=True, kw_only=True)
class CompareConfig(Config):
    """``neuroscan compare``: neurons whose selection differs between two groups of prompts."""

    dir: str = option(help="a scan's output directory", positional=True, what="a scan's output directory")
    by: str = option(
        help="the prompts/ column whose values are the groups: family, variant, or a column of the corpus (topic...)",
        what="a column of prompts/",
    )
    a: str | None = option(None, "group A (default: the first of exactly two groups, or the one --b is not)")
    b: str | None = option(
        None,
        "group B, or rest: every other prompt with a --by value (default: the second of exactly two groups, "
        "or the one --a is not)",
    )
    sort: str = option(
        "diff",
        "row order: |diff| (then |z|), |z| (then |diff|), q ascending (then |z|), or |red_diff| (then |diff|)",
        choices=COMPARE_SORTS,
    )
    top: int | None = option(None, "write and print only the first N rows (default: write all, print 10)", minimum=1)
    out: str = option(help="output .parquet file", what="a .parquet file")


@dataclass(frozen=True, kw_only=True)
class MakeModelConfig(Config):
    """``neuroscan make-model``: a GPT-J checkpoint in Hugging Face layout, random or the trained demo model."""

    preset: str = option(
        "tiny",
        "tiny (the embedded model's shapes); tiny-neox, tiny-llama, tiny-qwen2, tiny-mistral, tiny-gpt2 (a tiny "
        "model of each family); gptj-6b, pythia-6.9b, llama-3-8b, gpt2-xl (those models' shapes), all random; or "
        "demo (trains the demo model on the in-context families, about 25 minutes on one CPU core)",
        choices=(*MODEL_PRESETS, "demo"),
    )
    out: str = option(help="directory to write", what="a new directory")
    seed: int = option(0, "the weights' seed (0 with --preset tiny: the embedded model; with demo: the committed one)")


@dataclass(frozen=True, kw_only=True)
class ServeConfig(Config):
    """``neuroscan serve``: the service's own flags (its pipelines take `PIPELINE_OPTIONS` of `ScanConfig`)."""

    results: str = option(help="where each scan's output directory is made (DIR/NAME)", what="a directory")
    host: str = option(
        "127.0.0.1", "address to listen on; anything but loopback needs NEUROSCAN_TOKEN set", group="the service"
    )
    port: int = option(8470, "port to listen on (0: any free port)", group="the service")
    state: str | None = option(
        None,
        "where the scans' table (SQLite) and submitted corpora are kept (default: RESULTS/.neuroscan-service)",
        what="a directory",
        group="the service",
    )
    corpus_root: str | None = option(
        None,
        "a directory whose files scans may name instead of sending their corpus",
        what="a directory",
        group="the service",
    )
    max_body_mb: int = option(
        256, "the largest request body (a corpus) accepted, in MiB", minimum=1, group="the service"
    )
    max_running: int = option(
        16,
        "scans running at once (their micro-batches share the pipelines); the rest wait in the queue",
        minimum=1,
        group="the service",
    )
    aggregators: int = option(
        2,
        "aggregator processes on this node, each writing the tables of several running scans "
        "(about 0.4 GB and up to one CPU core each)",
        minimum=1,
        group="the service",
    )

    def checks(self) -> None:
        if not 0 <= self.port <= 65535:
            raise UserError(f"--port {self.port} is not a port number: use 1-65535, or 0 for any free port")


@dataclass(frozen=True, kw_only=True)
class ClientConfig(Config):
    """Where the service is, for ``submit``, ``status``, ``wait`` and ``cancel``."""

    url: str | None = option(
        None,
        "the service (default: $NEUROSCAN_URL, else http://127.0.0.1:8470); NEUROSCAN_TOKEN is sent if set",
        what="a URL",
    )


@dataclass(frozen=True, kw_only=True)
class SubmitConfig(ClientConfig):
    """``neuroscan submit``: queue a scan on the service (its options: `SCAN_OPTIONS` of `ScanConfig`)."""

    prompts: str = option(help="a .jsonl corpus to send", positional=True, what="a .jsonl file")
    name: str | None = option(
        None, "the scan's name: its output directory under the service's --results (default: its id)"
    )


@dataclass(frozen=True, kw_only=True)
class StatusConfig(ClientConfig):
    """``neuroscan status``: every scan of the service, or one."""

    id: str | None = option(None, "a scan's id (or its first characters); default: every scan", positional=True)


@dataclass(frozen=True, kw_only=True)
class WaitConfig(ClientConfig):
    """``neuroscan wait``: until a scan ends; exit 0 only when it completed."""

    id: str = option(help="a scan's id (or its first characters)", positional=True, what="a scan id")
    progress: bool = option(False, "draw a progress bar on stderr")


@dataclass(frozen=True, kw_only=True)
class CancelConfig(ClientConfig):
    """``neuroscan cancel``: stop a scan within one micro-batch; what it committed stays valid."""

    id: str = option(help="a scan's id (or its first characters)", positional=True, what="a scan id")


@dataclass(frozen=True, kw_only=True)
class ResumeConfig(ClientConfig):
    """``neuroscan resume``: queue a cancelled or failed scan again; it keeps what it committed."""

    id: str = option(help="a scan's id (or its first characters)", positional=True, what="a scan id")


@dataclass(frozen=True, kw_only=True)
class DeleteConfig(ClientConfig):
    """``neuroscan delete``: forget an ended scan and the corpus the service stored for it."""

    id: str = option(help="a scan's id (or its first characters)", positional=True, what="a scan id")
    files: bool = option(False, "also delete what the scan wrote in its output directory (its tables and report)")
