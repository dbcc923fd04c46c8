"""The run configuration: frozen dataclasses, validated on the driver before any actor starts."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from cluster.errors import UserError, one_of

DEVICES = ("cpu", "cuda")
DTYPES = ("auto", "float32", "float16", "bfloat16")
FORMATS = ("parquet", "arrow")
ON_ERROR = ("stop", "skip")
HANDOFFS = ("store", "direct")


@dataclass(frozen=True)
class Selection:
    """Which (prompt, neuron) pairs are kept, and how tokens are coloured."""

    high: float = 3.0
    """A neuron is selected when some prompt token has activation > high (red or orange band)."""
    low: float = 0.0
    """... or < low (blue band). GELU is negative for every negative input, so low=0 selects a lot."""
    red: float = 3.5
    """Band edge between orange (high < act <= red) and red (act > red)."""
    max_per_layer: int = 500
    """Keep at most this many selected neurons per (prompt, layer), most extreme first; 0 keeps all.

    Extremeness is ``max(max_act - high, low - min_act)``: how far the neuron goes past
    the threshold it crossed. Ties go to the lower neuron index."""

    def validate(self) -> None:
        for name in ("high", "low", "red"):
            value = getattr(self, name)
            if not math.isfinite(value):
                raise UserError(f"--{name} {value} is not a finite number: give a real threshold")
        if self.high <= self.low:
            raise UserError(
                f"--high {self.high} must be greater than --low {self.low}: raise --high or lower --low"
            )
        if self.red < self.high:
            raise UserError(
                f"--red {self.red} must be at least --high {self.high}: the red band sits above orange"
            )
        if self.max_per_layer < 0:
            raise UserError(
                f"--max-per-layer {self.max_per_layer} is negative: give 0 (keep all) or a positive cap"
            )


@dataclass(frozen=True)
class ScanConfig:
    """Everything a scan needs; one tree, checked by `validate` before Ray starts."""

    prompts: str
    """Prompt corpus: a .jsonl/.csv/.parquet/.txt file, or the name of a built-in corpus ("seed")."""
    out: str
    """Output directory (manifest.json, activations/, prompts/, layers/)."""
    model: str | None = None
    """Local checkpoint directory in Hugging Face layout; None uses the embedded tiny GPT-J."""
    stages: int = 1
    """Pipeline stages per replica; each holds a contiguous range of blocks."""
    replicas: int = 1
    """Independent copies of the pipeline; micro-batches are dealt round-robin."""
    device: str = "cpu"
    """Where stages run: "cpu" or "cuda" (one GPU per stage)."""
    gpus_per_stage: float = 1.0
    """GPUs a stage reserves; 0.5 puts two stages on one GPU."""
    handoff: str = "store"
    """How the hidden state goes from stage to stage: "store" (pinned host copy, Ray's object
    store) or "direct" (the tensor itself through Ray Direct Transport: CUDA IPC on one GPU,
    NCCL between GPUs, Gloo on CPUs; see `workers.handoff`). With "direct" a stage that dies
    stops the run (resumable) instead of being restarted."""
    dtype: str = "auto"
    """Weights and activations dtype; "auto" is float32 on CPU and the checkpoint's dtype on CUDA."""
    selection: Selection = field(default_factory=Selection)
    """Thresholds, band edges and the per-layer cap."""
    batch_tokens: int = 8192
    """Token budget of a micro-batch (rows x padded length)."""
    format: str = "parquet"
    """Table file format: Parquet (zstd) or Arrow IPC."""
    truncate: bool = False
    """Cut prompts longer than the model's context instead of refusing them."""
    overwrite: bool = False
    """Replace a non-empty output directory."""
    resume: bool = False
    """Continue the run in ``out``: keep its committed parts, redo the rest."""
    in_flight: int = 0
    """Micro-batches in flight per replica; 0 means 2 x stages + 1, so every stage has the next
    micro-batch queued while it finishes one."""
    on_error: str = "stop"
    """A prompt that does not fit in device memory even alone: "stop" the run or "skip" it."""
    top_k: int = 20
    """Max-activating prompts kept per neuron in neurons/."""
    rows_per_part: int = 500_000
    """Activation rows buffered by the aggregator before it commits a part."""
    progress: bool = True
    """Draw a progress bar on stderr."""

    def validate(self) -> None:
        if not self.prompts.strip():
            raise UserError("the prompt corpus is empty: give a .jsonl/.csv/.parquet/.txt file or seed")
        if not self.out.strip():
            raise UserError("--out is empty: give an output directory")
        if self.model is not None and not self.model.strip():
            raise UserError("--model is empty: give a checkpoint directory, or leave --model out for the embedded tiny GPT-J")
        if self.overwrite and self.resume:
            raise UserError("--overwrite and --resume contradict: --resume continues the run in --out, --overwrite deletes it; pass one")
        self.selection.validate()
        if self.stages < 1:
            raise UserError(f"--stages {self.stages} must be at least 1")
        if self.replicas < 1:
            raise UserError(f"--replicas {self.replicas} must be at least 1")
        one_of("--device", self.device, DEVICES)
        one_of("--dtype", self.dtype, DTYPES)
        one_of("--format", self.format, FORMATS)
        if not 0 < self.gpus_per_stage <= 1:
            # A stage runs on one GPU (GPT-J-6B's 12 GB of fp16 weights fit one); more would sit idle.
            raise UserError(
                f"--gpus-per-stage {self.gpus_per_stage:g} must be in (0, 1]: a stage runs on one GPU, "
                "so spread a model over more GPUs with --stages or --replicas"
            )
        if self.batch_tokens < 1:
            raise UserError(f"--batch-tokens {self.batch_tokens} must be a positive number of tokens")
        one_of("--on-error", self.on_error, ON_ERROR)
        if self.top_k < 1:
            raise UserError(f"--top-k {self.top_k} must be at least 1")
        if self.rows_per_part < 1:
            raise UserError(f"--rows-per-part {self.rows_per_part} must be a positive number of rows")
        one_of("--handoff", self.handoff, HANDOFFS)
        if self.in_flight < 0:
            raise UserError(f"--in-flight {self.in_flight} must be 0 (automatic) or positive")

    @property
    def window(self) -> int:
        """Micro-batches in flight per replica."""
        return self.in_flight or 2 * self.stages + 1
