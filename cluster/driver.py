"""The driver: check everything, place the pipeline, stream micro-batches through it.

Micro-batches are dealt round-robin to R replicas of an S-stage pipeline. Each stage call
returns two objects: the hidden state (passed by reference to the next stage, so it goes
stage to stage through the object store) and the stage's compact rows. The driver hands the
row references of all stages to the aggregator in one call, so rows go from the stages to
the aggregator directly; the driver only ever holds references. A bounded window of
micro-batches in flight per replica keeps every stage busy without flooding memory.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
from tqdm import tqdm

from aggregator.aggregator import Aggregator
from aggregator.manifest import read_manifest
from aggregator.schema import SCHEMA_VERSION
from cluster import placement
from cluster.config import ScanConfig
from cluster.errors import UserError
from cluster.memory import MemoryWatch
from cluster.output import corpus_fingerprint, prepare_output
from cluster.partition import partition_layers
from prompts.batching import micro_batches
from workers.checkpoint import load_config, load_tokenizer, resolve_model
from workers.shard import ShardSpec
from workers.split import PromptTooLarge
from workers.stage import Stage, StageSpec

PACKAGES = ("neuroscan", "torch", "transformers", "accelerate", "ray", "pyarrow", "numpy")


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


def plan(cfg: ScanConfig) -> Plan:
    """Validate the config, the model and the whole corpus; nothing is started or written."""
    cfg.validate()
    source = resolve_model(cfg.model)
    config = load_config(source.path)
    bounds = partition_layers(config.n_layer, cfg.stages)
    tokenizer = load_tokenizer(source.path)
    n_prompts = n_tokens = 0
    for batch, _ in micro_batches(cfg.prompts, tokenizer, config.n_positions, cfg.batch_tokens, cfg.truncate):
        n_prompts += len(batch.prompt_ids)
        n_tokens += int(batch.n_tokens.sum())
    return Plan(
        model_id=source.id, model_path=source.path, revision=source.revision,
        dtype=resolve_dtype(cfg.dtype, cfg.device, config), n_layers=config.n_layer,
        context=config.n_positions, bounds=bounds, tokenizer=tokenizer,
        vocab_size=max(config.vocab_size, len(tokenizer)), n_prompts=n_prompts, n_tokens=n_tokens,
    )


def resolve_dtype(dtype: str, device: str, config) -> str:
    """"auto" is float32 on the CPU (half precision is slow there) and the checkpoint's dtype on CUDA."""
    if dtype != "auto":
        return dtype
    if device == "cpu":
        return "float32"
    stored = str(getattr(config, "dtype", None) or "float16").removeprefix("torch.")
    return stored if stored in ("float16", "bfloat16", "float32") else "float16"


def token_strings(tokenizer, vocab_size: int) -> list[str]:
    """Readable text of every token id (``<id:N>`` for ids the tokenizer does not know)."""
    known = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return known + [f"<id:{i}>" for i in range(len(known), vocab_size)]


def manifest_header(cfg: ScanConfig, p: Plan) -> dict:
    sel = cfg.selection
    return {
        "schema_version": SCHEMA_VERSION,
        "model": {"id": p.model_id, "path": p.model_path, "dtype": p.dtype, "revision": p.revision},
        "selection": {"high": sel.high, "low": sel.low, "max_per_layer": sel.max_per_layer},
        "bands": {"low": sel.low, "high": sel.high, "red": sel.red},
        "stages": cfg.stages,
        "replicas": cfg.replicas,
        "partition": [list(b) for b in p.bounds],
        "device": cfg.device,
        "batch_tokens": cfg.batch_tokens,
        "format": cfg.format,
        "truncate": cfg.truncate,
        "corpus": corpus_fingerprint(cfg.prompts),
        "versions": {name: _version(name) for name in PACKAGES},
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def run_scan(cfg: ScanConfig) -> dict:
    """Run a scan end to end; returns the final manifest."""
    p = plan(cfg)
    out = Path(cfg.out)
    header = manifest_header(cfg, p)
    committed = prepare_output(out, cfg.overwrite, cfg.resume, header)
    existing = read_manifest(out)
    if existing is not None and existing["status"] == "complete":
        return existing  # resuming a finished run: nothing left to do
    n_stage_actors = cfg.stages * cfg.replicas
    started_ray = placement.start_ray(n_stage_actors + 1)
    group, actors = None, []
    try:
        group = placement.reserve(cfg.device, n_stage_actors)
        threads = max(1, (os.cpu_count() or 1) // n_stage_actors) if cfg.device == "cpu" else 0
        pipelines = []
        for r in range(cfg.replicas):
            pipe = []
            for s, (start, stop) in enumerate(p.bounds):
                spec = StageSpec(p.model_path, ShardSpec(start, stop, p.n_layers), cfg.device, p.dtype, cfg.selection, threads)
                pipe.append(placement.stage_actor(Stage, group, r * cfg.stages + s, cfg.device).remote(spec))
            pipelines.append(pipe)
        actors = [a for pipe in pipelines for a in pipe]
        aggregator = ray.remote(Aggregator).options(num_cpus=0).remote(
            str(out.resolve()), header, token_strings(p.tokenizer, p.vocab_size), cfg.format, cfg.rows_per_part
        )
        actors.append(aggregator)
        ray.get([a.setup.remote() for a in actors[:-1]] + [aggregator.__ray_ready__.remote()])
        t0 = time.perf_counter()
        watch = MemoryWatch()
        n_prompts, n_tokens = _stream(cfg, p, pipelines, aggregator, watch, committed)
        seconds = time.perf_counter() - t0
        *stages, aggregated = ray.get([a.memory.remote() for a in actors])
        timings = {
            "seconds": seconds, "prompts_per_s": n_prompts / seconds, "tokens_per_s": n_tokens / seconds,
            "memory": {"driver": watch.report(), "aggregator": aggregated, "stages": stages},
        }
        return ray.get(aggregator.finish.remote(timings))
    finally:
        for actor in actors:
            ray.kill(actor)
        if group is not None:
            placement.remove_placement_group(group)
        if started_ray:
            ray.shutdown()


def _stream(cfg: ScanConfig, p: Plan, pipelines: list[list], aggregator, watch: MemoryWatch, committed: set[int]) -> tuple[int, int]:
    """Send every micro-batch not yet committed through a pipeline, at most ``window`` in flight.

    Returns the prompts and prompt tokens scanned in this session."""
    window = cfg.window * cfg.replicas
    in_flight: deque = deque()
    bar = tqdm(total=p.n_prompts, unit="prompt", file=sys.stderr, disable=not cfg.progress, dynamic_ncols=True)
    prompts_done = tokens_done = 0
    t0 = time.perf_counter()

    def submit(batch, group, pipe) -> None:
        batch_ref = ray.put(batch)
        hidden, rows = None, []
        for stage in pipe:
            hidden, stage_rows = stage.forward.options(num_returns=2).remote(batch_ref, hidden)
            rows.append(stage_rows)
        in_flight.append((aggregator.add.remote(group, *rows), batch, group, pipe))

    def settle(entry) -> None:
        nonlocal prompts_done, tokens_done
        ref, batch, group, pipe = entry
        try:
            n_prompts, n_tokens = ray.get(ref)
        except PromptTooLarge as err:
            if cfg.on_error == "stop":
                raise
            _skip(err, batch, group, pipe)
            return
        prompts_done += n_prompts
        tokens_done += n_tokens
        watch.sample()
        bar.update(n_prompts)
        bar.set_postfix_str(f"{tokens_done / max(time.perf_counter() - t0, 1e-9):,.0f} tok/s", refresh=False)

    def _skip(err: PromptTooLarge, batch, group, pipe) -> None:
        """--on-error skip: record the prompt as skipped and rerun the rest of its micro-batch."""
        keep = np.flatnonzero(batch.prompt_ids != err.prompt_id)
        skipped = [{"prompt_id": err.prompt_id, "id": t.prompt.id, "reason": str(err)} for t in group if t.prompt.prompt_id == err.prompt_id]
        ray.get(aggregator.skip.remote(batch.batch_id, skipped, batch_done=len(keep) == 0))
        bar.update(1)
        if len(keep):
            submit(batch.take(keep, trim=True), [group[i] for i in keep], pipe)

    batches = micro_batches(cfg.prompts, p.tokenizer, p.context, cfg.batch_tokens, cfg.truncate)
    for i, (batch, group) in enumerate(batches):
        if batch.batch_id in committed:
            bar.update(len(group))
            continue
        submit(batch, group, pipelines[i % len(pipelines)])
        while len(in_flight) >= window:
            settle(in_flight.popleft())
    while in_flight:
        settle(in_flight.popleft())
    bar.close()
    return prompts_done, tokens_done


def summary_lines(manifest: dict, out: str) -> list[str]:
    """The closing report: where the tables are, throughput, per-layer means per prompt."""
    totals, timings = manifest["totals"], manifest.get("timings", {})
    lines = [
        f"wrote {out}  ({totals['prompts']} prompts, {totals['tokens']} tokens, "
        f"{totals['activation_rows']} activation rows, {timings.get('seconds', math.nan):.1f} s, "
        f"{timings.get('tokens_per_s', math.nan):,.0f} tokens/s)",
        "layer  mean selected  mean kept   (per prompt)",
    ]
    for layer, row in manifest["summary"]["layers"].items():
        lines.append(f"{int(layer):5d}  {row['mean_selected']:13.1f}  {row['mean_kept']:9.1f}")
    if manifest.get("skipped"):
        lines.append(f"skipped {len(manifest['skipped'])} prompts that do not fit in device memory (listed in manifest.json)")
    for by, groups in manifest["summary"]["accuracy"].items():
        for value, acc in groups.items():
            lines.append(f"accuracy {by}={value}: {acc['correct']}/{acc['total']} ({acc['accuracy']:.0%})")
    return lines
