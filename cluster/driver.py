"""The driver: check everything, place the pipeline, stream micro-batches through it.

Micro-batches are dealt round-robin to R replicas of an S-stage pipeline. Each stage call
returns two objects: the hidden state (passed by reference to the next stage, so it goes
stage to stage through the object store; with ``--handoff direct`` a second call hands the
device tensor over, `workers.handoff`) and the stage's compact rows. The driver hands the
row references of all stages to the aggregator in one call, so rows go from the stages to
the aggregator directly; the driver only ever holds references. A bounded window of
micro-batches in flight per replica keeps every stage busy without flooding memory.
"""

from __future__ import annotations

import importlib.metadata
import itertools
import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from tqdm import tqdm

from cluster import placement
from cluster.aggregators import Aggregators
from cluster.job import Job
from cluster.output import claim, corpus_fingerprint, prepare_output, run_packing, run_skipped
from cluster.partition import partition_layers
from cluster.pipelines import Pipelines, answers
from cluster.schedule import Scheduler
from neuroscan.config import ScanConfig, resolve_dtype
from neuroscan.corpus_columns import ColumnTypes
from neuroscan.errors import UserError, tell, user_line
from neuroscan.manifest import (
    BandEdges,
    Manifest,
    ModelInfo,
    SelectionInfo,
    blue_flood_line,
    verification_line,
    write_manifest,
)
from neuroscan.memory import MemoryWatch
from neuroscan.schema import SCHEMA_VERSION
from prompts.batching import PACKINGS, ReadAhead, chunk_batches
from prompts.readers import corpus_stamp
from workers.autotp import check_tensor_parallel
from workers.checkpoint import fingerprint, load_config, load_tokenizer, resolve_model
from workers.families import context, d_mlp, n_layers
from workers.verify import verify_device, verify_scan

PACKAGES = ("neuroscan", "torch", "transformers", "accelerate", "ray", "pyarrow", "numpy")
KEEP_TOKENS, KEEP_PROMPTS = 1 << 20, 1 << 13
"""The plan keeps the micro-batches of the corpus's first chunks for the run while they hold
at most this many tokens (padding included) and prompts, at most ~20 MB of the driver's
memory (measured with tracemalloc: ~15 bytes a token, ~600 a prompt). A corpus that fits is
read and tokenised once; in any corpus the first micro-batches go out at once, and the rest
is read again, streaming, one chunk ahead on a background thread."""


@dataclass
class Plan:
    """What the driver resolved before starting anything."""

    model_id: str
    model_path: str
    revision: str | None
    dtype: str
    n_layers: int
    context: int
    bounds: list[tuple[int, int]]
    tokenizer: object
    vocab_size: int
    n_prompts: int
    n_tokens: int
    kept: list
    """The (micro-batch, prompts) pairs of the first ``kept_chunks`` chunks (see KEEP_TOKENS)."""
    kept_chunks: int
    n_chunks: int
    n_expected: int = 0
    """Prompts with an ``expected`` answer ..."""
    n_unspaced: int = 0
    """... of which the answer starts without whitespace after a prompt that ends without it."""
    stamp: tuple | None = ()
    """The corpus's `prompts.readers.corpus_stamp` from before the plan read it."""
    packing: str = PACKINGS[0]
    """How the corpus is cut into micro-batches: a resumed run's own way (`run_packing`)."""
    fingerprint: str | None = None
    """The weights' digest (`workers.checkpoint.fingerprint`), which ``--resume`` compares."""
    neurons: int | None = None
    """MLP neurons per layer."""
    architecture: str | None = None
    """The checkpoint's ``model_type`` (`workers.families`)."""
    columns: dict[str, str] = field(default_factory=dict)
    """The corpus's extra columns and their types, from every prompt (`neuroscan.corpus_columns`)."""
    skipped_batches: dict[int, int] = field(default_factory=dict)
    """With ``--repair``: the micro-batch of each prompt the run on disk skipped (`run_skipped`)."""


def plan(cfg: ScanConfig, loaded: str | None = None) -> Plan:
    """Validate the config, the model and the whole corpus; nothing is started or written.
    ``loaded``: the fingerprint of weights already loaded (a service's, taken when its stages
    loaded them), recorded instead of that of the files on disk now."""
    cfg.validate()
    placement.check_local_capacity(cfg.stages * cfg.replicas * cfg.tensor_parallel + 1)  # the ranks and an aggregator
    source = resolve_model(cfg.model)
    config = load_config(source.path)
    check_tensor_parallel(config, cfg.tensor_parallel)
    bounds = partition_layers(n_layers(config), cfg.stages)
    tokenizer = load_tokenizer(source.path)
    stamp = corpus_stamp(cfg.prompts)  # before reading: an edit from here on is seen
    packing = run_packing(Path(cfg.out)) if cfg.resume else PACKINGS[0]
    skipped = run_skipped(Path(cfg.out)) if cfg.repair else set()
    skipped_batches: dict[int, int] = {}
    n_prompts = n_tokens = n_input = n_chunks = n_expected = n_unspaced = 0
    kept, kept_chunks, columns = [], 0, ColumnTypes()
    for pairs in chunk_batches(
        cfg.prompts, tokenizer, context(config), cfg.batch_tokens, cfg.truncate, packing=packing
    ):
        for batch, group in pairs:
            n_prompts += len(batch.prompt_ids)
            n_tokens += int(batch.n_tokens.sum())
            n_input += batch.input_ids.size
            answered = [t.prompt for t in group if t.prompt.expected is not None]
            n_expected += len(answered)
            n_unspaced += sum(not p.expected[0].isspace() and not p.text[-1].isspace() for p in answered)
            for t in group:
                columns.see(t.prompt.extra)
                if t.prompt.prompt_id in skipped:
                    skipped_batches[t.prompt.prompt_id] = batch.batch_id
        n_chunks += 1
        if kept_chunks == n_chunks - 1 and n_input <= KEEP_TOKENS and n_prompts <= KEEP_PROMPTS:
            kept += pairs
            kept_chunks = n_chunks
    return Plan(
        model_id=source.id,
        model_path=source.path,
        revision=source.revision,
        dtype=resolve_dtype(cfg.dtype, cfg.device, getattr(config, "dtype", None)),
        n_layers=n_layers(config),
        neurons=d_mlp(config),
        context=context(config),
        architecture=config.model_type,
        bounds=bounds,
        tokenizer=tokenizer,
        vocab_size=max(config.vocab_size, len(tokenizer)),
        n_prompts=n_prompts,
        n_tokens=n_tokens,
        kept=kept,
        kept_chunks=kept_chunks,
        n_chunks=n_chunks,
        n_expected=n_expected,
        n_unspaced=n_unspaced,
        stamp=stamp,
        packing=packing,
        fingerprint=loaded or fingerprint(source.path),
        columns=columns.types(),
        skipped_batches=skipped_batches,
    )


def check_unchanged(source: str, p: Plan, fix: str) -> None:
    """Stop when the corpus is no longer the one the plan read: micro-batches are cut from
    what the plan read, and the rest of a large corpus is read again during the run."""
    if corpus_stamp(source) != p.stamp:
        raise UserError(
            f"prompt corpus {source} changed while neuroscan was reading it (size or modification time): {fix}"
        )


def _unchanged(chunks: Iterator[list], source: str, p: Plan) -> Iterator[list]:
    for chunk in chunks:  # checked once the chunk is read: a write during its read is seen too
        check_unchanged(
            source,
            p,
            "leave it as it is while a scan runs; put it back and --resume (what is committed is kept), or --overwrite to scan the new one",
        )
        yield chunk


def answer_notice(p: Plan) -> str | None:
    """A corpus whose answers lack the space a next word starts with scores (almost) nothing
    correct, without any error: say so before the run, once."""
    if not p.n_unspaced:
        return None
    return (
        f"note: {p.n_unspaced} of {p.n_expected} expected answers start without a space, after a prompt that ends "
        "without one; `correct` scores each answer exactly as given, and a next word's token usually starts with "
        'the space (" mango", not "mango")'
    )


@contextmanager
def corpus_batches(cfg: ScanConfig, p: Plan) -> Iterator[Iterator]:
    """The run's (micro-batch, prompts) pairs: those the plan kept, then the rest of the corpus
    read again, a chunk ahead on a background thread (started at once, stopped on leaving)."""
    if p.kept_chunks == p.n_chunks:
        yield iter(p.kept)
        return
    rest = chunk_batches(
        cfg.prompts,
        p.tokenizer,
        p.context,
        cfg.batch_tokens,
        cfg.truncate,
        skip=p.kept_chunks,
        first_id=len(p.kept),
        packing=p.packing,
    )
    with ReadAhead(_unchanged(rest, cfg.prompts, p)) as ahead:
        yield itertools.chain(p.kept, ahead)


def token_strings(tokenizer, vocab_size: int) -> list[str]:
    """Readable text of every token id (``<id:N>`` for ids the tokenizer does not know)."""
    known = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return known + [f"<id:{i}>" for i in range(len(known), vocab_size)]


def manifest_header(cfg: ScanConfig, p: Plan) -> Manifest:
    """The new run's manifest: what identifies it, and no part yet."""
    sel = cfg.selection
    return Manifest(
        schema_version=SCHEMA_VERSION,
        model=ModelInfo(
            id=p.model_id,
            path=p.model_path,
            dtype=p.dtype,
            revision=p.revision,
            fingerprint=p.fingerprint,
            neurons=p.neurons,
            architecture=p.architecture,
        ),
        selection=SelectionInfo(high=sel.high, low=sel.low, max_per_layer=sel.max_per_layer),
        bands=BandEdges(low=sel.low, high=sel.high, red=sel.red),
        stages=cfg.stages,
        replicas=cfg.replicas,
        tensor_parallel=cfg.tensor_parallel,
        partition=[list(b) for b in p.bounds],
        device=cfg.device,
        handoff=cfg.handoff,
        batch_tokens=cfg.batch_tokens,
        top_k=cfg.top_k,
        format=cfg.format,
        truncate=cfg.truncate,
        corpus=replace(corpus_fingerprint(cfg.prompts), columns=p.columns, prompts=p.n_prompts),
        versions={name: package_version(name) for name in PACKAGES},
        started_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        packing=p.packing,
    )


def package_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def run_scan(cfg: ScanConfig) -> Manifest:
    """Run a scan end to end; returns the final manifest. Unless ``cfg.quiet``, stderr gets a
    line for each step of the start as it ends (the corpus read, Ray started, each stage
    loaded), then the progress bar."""
    t0 = time.perf_counter()
    p = plan(cfg)
    out = Path(cfg.out)
    header = manifest_header(cfg, p)  # its checksum reads the corpus once more
    check_unchanged(cfg.prompts, p, "leave it as it is while a scan runs, and start the scan again")
    with claim(out):  # no second scan into `out` while this one runs
        existing = prepare_output(
            out, cfg.overwrite, cfg.resume, header, tell, repair=cfg.repair, skipped_batches=p.skipped_batches
        )
        committed = existing.committed_batches() if existing else set()
        done = existing is not None and existing.complete
        notices = [resume_notice(out, existing, committed) if cfg.resume else None, None if done else answer_notice(p)]
        for line in filter(None, notices):
            tell(line)
        if done:
            return existing  # resuming a finished run: nothing left to do
        say = (lambda line: None) if cfg.quiet else tell
        say(
            f"{p.n_prompts:,} prompts, {p.n_tokens:,} tokens: {cfg.prompts} read and tokenised "
            f"({time.perf_counter() - t0:.1f} s)"
        )
        manifest = _scan(cfg, p, out, header, committed, say)
        if cfg.verify and manifest.complete and manifest.totals.prompts:
            manifest = verified(cfg, out, manifest, say)
        return manifest


def verified(cfg: ScanConfig, out: Path, manifest: Manifest, say: Callable[[str], None]) -> Manifest:
    """The finished run with its fidelity check (`workers.verify`) written into its manifest.
    The check runs in this process once the stages are gone: on a GPU when the scan ran on
    CUDA and this process sees one, else on the CPU. One that cannot run (no room for the
    float32 model, which is checked before it loads) is said in one line, and the run stays
    complete without a check."""
    device = verify_device(cfg.device)
    n = min(cfg.verify, manifest.totals.prompts)
    say(f"checking {n} prompts against a float32 forward pass of the model on {device} ...")
    try:
        checked = replace(manifest, verification=verify_scan(out, manifest, cfg.verify, device))
    except (UserError, OSError, RuntimeError) as err:  # torch's out-of-memory errors are RuntimeErrors
        reason = (user_line(err) or str(err) or type(err).__name__).splitlines()[0]
        tell(f"the fidelity check could not run: {reason}; the scan's tables are complete")
        return manifest
    write_manifest(out, checked)
    return checked


def resume_notice(out: Path, existing: Manifest | None, committed: set[int]) -> str:
    """What ``--resume`` found in ``out``: a user who mistyped the directory learns it here."""
    if existing is None:
        return f"nothing to resume in {out} (no manifest.json): starting the scan from the beginning"
    if existing.complete:
        return f"{out} is already complete: nothing to scan (--overwrite scans it again)"
    return f"resuming {out}: {len(committed)} micro-batches already committed, scanning the rest"


def _scan(
    cfg: ScanConfig, p: Plan, out: Path, header: Manifest, committed: set[int], say: Callable[[str], None]
) -> Manifest:
    """The run itself, on a prepared and claimed ``out``: one job on pipelines of its own."""
    with corpus_batches(cfg, p) as batches:  # reading ahead while the actors load the model
        pipelines = Pipelines.open(
            p.model_path,
            p.bounds,
            cfg.device,
            p.dtype,
            cfg.replicas,
            cfg.gpus_per_stage,
            cfg.handoff,
            say=say,
            ranks=cfg.tensor_parallel,
        )
        aggregators = None
        try:
            aggregators = Aggregators(
                1, token_strings(p.tokenizer, p.vocab_size), f"neuroscan-{pipelines.run_id}-aggregator"
            )
            sink = aggregators.open("scan", str(out.resolve()), header, cfg.rows_per_part)
            watch = MemoryWatch()
            bar = tqdm(total=p.n_prompts, unit="prompt", file=sys.stderr, disable=cfg.quiet, dynamic_ncols=True)

            def progress(job: Job) -> None:
                watch.sample()
                bar.n = job.prompts_done + job.prompts_resumed
                bar.set_postfix_str(f"{job.tokens_done / max(job.seconds, 1e-9):,.0f} tok/s", refresh=False)
                bar.update(0)

            job = Job("scan", cfg, batches, committed, sink, p.n_prompts, progress)
            try:
                notice = lambda line: tqdm.write(line, file=sys.stderr)
                Scheduler(pipelines, cfg.window * cfg.replicas, notice).run(
                    [job], lambda j: run_timings(j, pipelines, watch)
                )
            finally:
                bar.close()
            if job.error is not None:
                raise job.error
            return job.manifest
        finally:
            if aggregators is not None:
                aggregators.close()
            pipelines.close()


def run_timings(job: Job, pipelines: Pipelines, watch: MemoryWatch) -> dict:
    """What the manifest records of a finished job: its rate and every process's memory."""
    seconds = job.seconds
    timings = {
        "seconds": seconds,
        "prompts_per_s": job.prompts_done / seconds,
        "tokens_per_s": job.tokens_done / seconds,
        "memory": {
            "driver": watch.report(),
            "aggregator": answers([job.sink.memory()], 10.0)[0],
            "stages": pipelines.memory(),
        },
    }
    if pipelines.handoffs:
        timings["transports"] = pipelines.handoffs  # per replica, stage to stage: GLOO, CUDA_IPC or NCCL
    return timings


def summary_lines(manifest: Manifest, out: str, wall_s: float | None = None) -> list[str]:
    """The closing report: where the tables are, throughput, per-layer means per prompt.
    ``wall_s``: the command's whole time, from its start (the corpus read, Ray started, the
    stages loaded), beside the scan's own."""
    totals, timings = manifest.totals, manifest.timings
    wall = "" if wall_s is None else f"; {wall_s:.1f} s in all"
    lines = [
        f"wrote {out}  ({totals.prompts} prompts, {totals.tokens} tokens, "
        f"{totals.activation_rows} activation rows, scanned in {timings.get('seconds', math.nan):.1f} s at "
        f"{timings.get('tokens_per_s', math.nan):,.0f} tokens/s{wall})",
        f"layer  mean selected {'red':>6} {'blue':>6}  mean kept   (per prompt; red, blue: by each rule)",
    ]
    for layer, row in manifest.summary.layers.items():
        red_blue = f"{row.mean_red:6.1f} {row.mean_blue:6.1f}" if row.mean_blue is not None else " " * 13
        lines.append(f"{int(layer):5d}  {row.mean_selected:13.1f} {red_blue}  {row.mean_kept:9.1f}")
    flood = blue_flood_line(manifest)
    if flood:
        lines.append(flood)
    if totals.activation_rows == 0 and totals.prompts:
        sel = manifest.selection
        lines.append(
            f"no neuron went above --high {sel.high:g} or below --low {sel.low:g} on any token: "
            "the tables are empty; lower --high or raise --low to keep some"
        )
    if manifest.skipped:
        lines.append(
            f"skipped {len(manifest.skipped)} prompts that do not fit in device memory (listed in manifest.json)"
        )
    for by, groups in manifest.summary.accuracy.items():
        for value, acc in groups.items():
            lines.append(f"accuracy {by}={value}: {acc.correct}/{acc.total} ({acc.accuracy:.0%})")
    check = verification_line(manifest)
    if check:
        lines.append(check)
    return lines
