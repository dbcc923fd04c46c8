"""``neuroscan bench``: the benchmark of record, every mode on the same micro-batches in one run.

Modes (tokens are the prompts' own tokens; ratios are against ``bare`` of the same run):
  bare              the model alone: blocks + last-token logits, no hooks
  bare_hf_gelu      the same with transformers' eight-op ``gelu_new`` (before the one-kernel GELU)
  bare_hf_rotary    ``bare`` with transformers' attention: rotary embedding out of place and
                    concatenated (before `workers.rotary`)
  naive             a hook copies every MLP activation to the host and reduces it there (the notebook way)
  scan_local_eager  the stage code in this process with the eager reduction (the reference path)
  scan_local_inline the stage code called from one thread, the fused reduction on the forward
                    pass's own stream, compaction and copy at the end of each micro-batch
  scan_local        the stage code as a Ray actor runs it, without Ray: called from two threads,
                    reductions on a side stream, compaction and copy overlapping the next
                    micro-batch (on a CPU, as a CPU actor: the eager reduction, one thread)
  transformer_lens  TransformerLens caching every mlp.hook_post, then the same reduction (`bench.peers`)
  nnsight           an nnsight trace saving every MLP output projection's input, then the same reduction (both peers on
                    transformers' own GELU and attention, the model their users run)
  bare_again        ``bare`` timed again after the other in-process modes: its ratio to ``bare``
                    is this run's noise (two ratios closer than that are not told apart)
  scan              the full Ray pipeline, one stage, aggregator writing Parquet
  scan_2stage       the Ray pipeline with two stages sharing the device
  scan_2stage_direct  ``scan_2stage`` with the hidden state handed over as a tensor
                    (``--handoff direct``: CUDA IPC on one GPU, Gloo on a CPU) instead of
                    through pinned host memory and Ray's object store
With ``--tensor-parallel T`` the Ray modes run each stage as T ranks (`workers.autotp`), one
device each (``scan_2stage`` then needs 2T GPUs, and is skipped on CUDA; ``scan_2stage_direct``
always is); the in-process modes stay on one device, so ``scan`` / ``bare`` is the whole
speed-up or cost of the ranks.
The peers run when their packages are installed (the ``bench`` extra); a default run skips
the missing ones and says so in the report.
MFU is model FLOPs per second over a large matmul's FLOPs per second measured in the same run.
"""

from __future__ import annotations

import json
import platform
import random
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from transformers.activations import NewGELUActivation
from transformers.models.gptj.modeling_gptj import GPTJAttention

from bench import peers
from bench.peers import PEER_PACKAGES, PEERS
from cluster.driver import package_version, run_scan
from cluster.placement import STAGE_CONCURRENCY
from neuroscan.config import BENCH_MODES, BenchConfig, ScanConfig, Selection, resolve_dtype
from neuroscan.errors import UserError, file_out
from prompts.batching import micro_batches
from workers.autotp import check_tensor_parallel
from workers.checkpoint import load_config, load_tokenizer, resolve_model
from workers.families import context, d_mlp, d_model, family, n_layers
from workers.rotary import RotaryAttention
from workers.shard import ShardSpec, TanhGELU
from workers.stage import Stage, StageSpec
from workers.transfer import to_device

RAY_MODES = {"scan": (1, "store"), "scan_2stage": (2, "store"), "scan_2stage_direct": (2, "direct")}
"""The modes that run the Ray pipeline: (stages, hand-off)."""


def synthetic_corpus(path: Path, n: int, tokens: int, seed: int = 0) -> Path:
    """``n`` prompts of random lowercase words, about ``tokens`` tokens each with a byte tokenizer."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            text = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz    ") for _ in range(tokens - 1))
            f.write(json.dumps({"id": f"b{i}", "text": "x" + text}) + "\n")
    return path


def matmul_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Achievable FLOP/s of a square matmul on ``device`` (the MFU denominator)."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    _sync(device)
    t0, reps = time.perf_counter(), 10 if device.type == "cuda" else 3
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def flops_per_token(config, seq: float) -> float:
    """Forward FLOPs per token: 2 x block matmul parameters (grouped-query attention's smaller
    keys and values, a gated MLP's third projection), plus attention scores and values."""
    d, inner = d_model(config), d_mlp(config)
    heads = config.num_attention_heads
    kv = d * getattr(config, "num_key_value_heads", heads) // heads
    gated = family(config).up is not None
    block = 2 * d * d + 2 * d * kv + (3 if gated else 2) * d * inner
    return n_layers(config) * (2 * block + 2 * seq * d)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _inputs(batch, device, mask: bool = True):
    """(ids, attention mask or None, position ids) on ``device``, through pinned memory as the stage does."""
    b, t = batch.input_ids.shape
    pos = torch.arange(t, device=device)
    attention = (pos[None, :] < to_device(batch.n_input, device)[:, None]).long() if mask else None
    return to_device(batch.input_ids, device).long(), attention, pos[None, :].expand(b, t)


NAIVE_BATCHES = 2
"""``naive`` is timed on this many micro-batches only: at ~2 % of the bare rate the full
workload would take minutes, and a rate over two micro-batches says the same."""


def timed(step, batches, device, warm_up: bool = True, threads: int = 1) -> dict:
    """Warm up on the first micro-batch, then time them all (called from ``threads`` threads,
    as Ray calls a stage actor); peak device memory on CUDA."""
    if warm_up:
        step(batches[0])
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        copied = sum(pool.map(step, batches))
    _sync(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    tokens = int(sum(b.n_tokens.sum() for b in batches))
    return {"seconds": seconds, "tokens": tokens, "d2h_bytes": copied, "peak_device_mb": peak}


def bare_step(model, device: torch.device):
    """The ``bare`` mode's step: the blocks and the last token's logits, no hooks, run as the
    stage runs them (inputs through pinned memory; causal attention without a mask)."""

    @torch.inference_mode()
    def bare(batch):
        h = model(*_inputs(batch, device, mask=False))
        last = to_device(batch.n_tokens, device).long() - 1
        model.lm_head(h[torch.arange(len(last), device=device), last])
        return 0

    return bare


def bench_in_process(
    path: str,
    batches,
    device: torch.device,
    dtype: str,
    sel: Selection,
    modes: list[str],
    tokenizer,
    results: dict,
    saved,
) -> None:
    """The in-process modes, all on one loaded copy of the model (a stage holding every layer),
    added to ``results``; ``saved(results)`` after each."""
    n = n_layers(load_config(path))
    stage = Stage(StageSpec(path, ShardSpec(0, n, n), device.type, dtype))
    stage.setup()
    model = stage.model
    bare = bare_step(model, device)

    @torch.inference_mode()
    def naive(batch):
        ids, mask, pos = _inputs(batch, device)
        copied, stats = [], []

        def to_host(acts):  # [batch, pos, d_mlp] -> numpy, reduced on the host per prompt
            a = acts.float().cpu().numpy()
            copied.append(a.nbytes)
            for row, length in enumerate(batch.n_tokens):
                x = a[row, :length]  # [pos, d_mlp]
                stats.append(
                    (x.max(0), x.argmax(0), x.min(0), x.argmin(0), (x > sel.high).sum(0), (x < sel.low).sum(0))
                )

        handles = [model.neurons(b).register_forward_pre_hook(lambda m, i: to_host(i[0])) for b in model.blocks]
        try:
            model(ids, mask, pos)
        finally:
            for h in handles:
                h.remove()
        return sum(copied)

    def scan_local(batch):
        _, rows = stage.forward(batch)
        arrays = [*rows.rows.values(), *rows.per_prompt.values(), *(rows.predictions or {}).values()]
        return sum(a.nbytes for a in arrays)

    fused, side = stage.fused, stage.reduce_stream
    two = STAGE_CONCURRENCY if device.type == "cuda" else 1
    variants = {  # step, fused reduction, its side stream, transformers' modules put back, calling threads
        "bare": (bare, fused, side, (), 1),
        "bare_hf_gelu": (bare, fused, side, ("gelu",), 1),
        "bare_hf_rotary": (bare, fused, side, ("attention",), 1),
        "naive": (naive, fused, side, (), 1),
        "scan_local_eager": (scan_local, False, None, (), 1),
        "scan_local_inline": (scan_local, fused, None, (), 1),
        "scan_local": (scan_local, fused, side, (), two),
    }
    for mode in BENCH_MODES:
        if mode in modes and mode in variants:
            step, stage.fused, stage.reduce_stream, before, threads = variants[mode]
            run = batches[:NAIVE_BATCHES] if mode == "naive" else batches
            with transformers_modules(model, before):
                results[mode] = {
                    **timed(step, run, device, warm_up=mode != "naive", threads=threads),
                    "reduction": "fused" if stage.fused else "eager",
                    "threads": threads,
                }
            saved(results)
    stage.fused, stage.reduce_stream = fused, side
    inputs = lambda batch: _inputs(batch, device)
    for mode, step in (
        ("transformer_lens", lambda: peers.transformer_lens_step(stage, tokenizer, inputs, sel)),
        ("nnsight", lambda: peers.nnsight_step(stage, inputs, sel)),
    ):
        if mode in modes:  # on transformers' own GELU and attention, the model their users run
            with transformers_modules(model, ("gelu", "attention")), step() as run:
                results[mode] = {**timed(run, batches, device), "reduction": "eager"}
            saved(results)
    if "bare_again" in modes:
        results["bare_again"] = {
            **timed(bare, batches, device),
            "reduction": "fused" if fused else "eager",
            "threads": 1,
        }
        saved(results)


def skipped_modes(config, ranks: int = 1, device: str = "cpu") -> dict[str, str]:
    """The modes a family has nothing to measure for (``bare_hf_*``), that would time another
    computation (`bench.peers.LENS_FAMILIES`), or that ``--tensor-parallel ranks`` rules out, and why."""
    skipped = {}
    if ranks > 1:
        skipped["scan_2stage_direct"] = "--handoff direct hands the hidden state to one process, not a group of ranks"
        if device == "cuda":
            skipped["scan_2stage"] = f"its two stages share one GPU, which {ranks} ranks each cannot"
    if config.model_type != "gptj":
        skipped["bare_hf_rotary"] = "GPT-J only: no other family's attention is replaced"
    if getattr(config, "activation_function", None) != "gelu_new":
        skipped["bare_hf_gelu"] = "GPT-J and GPT-2 only: no other family's GELU is replaced"
    if config.model_type not in peers.LENS_FAMILIES:
        skipped["transformer_lens"] = (
            "its GPT-2 bridge gives other activations than transformers' model"
            if config.model_type == "gpt2"
            else "its activations for this family are not checked equal to the stage's (bench.peers.LENS_FAMILIES)"
        )
    return skipped


@contextmanager
def transformers_modules(model, which: tuple[str, ...]):
    """Put transformers' own modules back in place of neuroscan's while the context is open,
    the "before" of those optimisations: ``"gelu"``, the eight-op ``gelu_new`` instead of the
    one-kernel GELU; ``"attention"``, ``GPTJAttention`` (rotation out of place, then
    concatenated) instead of `workers.rotary.RotaryAttention`, which has the same parameters.
    Blocks without neuroscan's module of a kind keep theirs."""
    blocks = [b for b in model.blocks if isinstance(getattr(b.mlp, "act", None), TanhGELU)] if "gelu" in which else []
    rotary = [b.attn for b in model.blocks if isinstance(getattr(b, "attn", None), RotaryAttention)]
    rotary = rotary if "attention" in which else []
    saved = [block.mlp.act for block in blocks]
    for block in blocks:
        block.mlp.act = NewGELUActivation()
    for attn in rotary:
        attn.__class__ = GPTJAttention
    try:
        yield
    finally:
        for block, act in zip(blocks, saved):
            block.mlp.act = act
        for attn in rotary:
            attn.__class__ = RotaryAttention


def bench_ray(
    corpus: Path,
    model: str | None,
    device: str,
    dtype: str,
    batch_tokens: int,
    stages: int,
    sel: Selection,
    handoff: str = "store",
    ranks: int = 1,
) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = ScanConfig(
            prompts=str(corpus),
            out=str(Path(tmp) / "out"),
            model=model,
            stages=stages,
            device=device,
            dtype=dtype,
            handoff=handoff,
            tensor_parallel=ranks,
            gpus_per_stage=1.0 / stages if device == "cuda" and ranks == 1 else 1.0,
            selection=sel,
            batch_tokens=batch_tokens,
            quiet=True,
            verify=0,  # the fidelity check is no part of the scan's speed
        )
        timings = run_scan(cfg).timings
    return {
        "seconds": timings["seconds"],
        "d2h_bytes": None,
        "peak_device_mb": None,
        "aggregator_lag_s": timings["aggregator_lag_s"],
    }


def attention_implementation(path: str) -> str:
    """Which attention transformers runs for this model here ("sdpa", "eager", ...)."""
    from workers.shard import StageModel

    config = load_config(path)
    with torch.device("meta"):
        n = n_layers(config)
        return StageModel(config, ShardSpec(0, n, n)).body.config._attn_implementation


def run_bench(cfg: BenchConfig) -> dict:
    cfg.validate()
    if cfg.out:
        file_out(Path(cfg.out), "bench.json")
    if cfg.nodes and cfg.service:
        raise UserError("--nodes and --service are two benchmarks: run one, then the other")
    if cfg.tensor_parallel > 1 and (cfg.nodes or cfg.service):
        raise UserError(
            f"--tensor-parallel {cfg.tensor_parallel} shards the stages of the one-shot Ray modes: leave out "
            f"--{'nodes' if cfg.nodes else 'service'}, or --tensor-parallel"
        )
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but torch sees no CUDA device: use --device cpu or run on a GPU machine")
    if cfg.model:
        path, model_arg = resolve_model(cfg.model).path, cfg.model
    elif cfg.preset == "tiny":
        path, model_arg = resolve_model(None).path, None
    else:
        from workers.embedded import preset_config, write_checkpoint

        # On a GPU the random weights are drawn there (seconds instead of a minute for 6B).
        cache = cfg.cache_path / f"{cfg.preset}-seed0-{device.type}"
        if not (cache / "config.json").exists():
            write_checkpoint(preset_config(cfg.preset), cache, device=device.type)
        path = model_arg = str(cache)
    if cfg.service or cfg.nodes:
        from bench import nodes, service

        dtype = resolve_dtype(cfg.dtype, device.type, getattr(load_config(path), "dtype", None))
        if cfg.service:
            return {**_head(cfg, device, path, dtype), "service": service.run_service_bench(cfg, model_arg, dtype)}
        with tempfile.TemporaryDirectory() as tmp:
            corpus = synthetic_corpus(Path(tmp) / "bench.jsonl", cfg.prompts, cfg.prompt_tokens)
            return {**_head(cfg, device, path, dtype), "nodes": nodes.run_nodes_bench(cfg, model_arg, corpus)}
    sel = Selection()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = synthetic_corpus(Path(tmp) / "bench.jsonl", cfg.prompts, cfg.prompt_tokens)
        tokenizer = load_tokenizer(path)
        config = load_config(path)
        check_tensor_parallel(config, cfg.tensor_parallel)
        dtype = resolve_dtype(cfg.dtype, device.type, getattr(config, "dtype", None))
        if cfg.prompt_tokens > context(config):
            raise UserError(
                f"--prompt-tokens {cfg.prompt_tokens} is more than the model's context of {context(config)}: "
                f"use at most {context(config)}"
            )
        batches = [b for b, _ in micro_batches(str(corpus), tokenizer, context(config), cfg.batch_tokens, False)]
        tokens = int(sum(b.n_tokens.sum() for b in batches))
        modes = [m for m in BENCH_MODES if m in (cfg.modes or BENCH_MODES)]
        missing = [m for m in modes if m in PEERS and not peers.available(m)]
        if missing and cfg.modes:
            raise UserError(
                f"--modes {','.join(missing)}: not installed here: pip install 'neuroscan[bench]' (or leave them out)"
            )
        not_here = {m: why for m, why in skipped_modes(config, cfg.tensor_parallel, device.type).items() if m in modes}
        modes = [m for m in modes if m not in missing and m not in not_here]
        peak = matmul_flops(device, getattr(torch, dtype))
        per_token = flops_per_token(config, float(np.mean([b.n_tokens.mean() for b in batches])))
        head = {
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": " ".join(["neuroscan", *sys.argv[1:]]),
            "device": torch.cuda.get_device_name()
            if device.type == "cuda"
            else platform.processor() or platform.machine(),
            "versions": {
                p: package_version(p)
                for p in ("torch", "transformers", "triton", "ray", "pyarrow", "deepspeed", *PEER_PACKAGES)
            },
            "model": {
                "path": path,
                "architecture": config.model_type,
                "n_layer": n_layers(config),
                "d_model": d_model(config),
                "dtype": dtype,
                "attention": attention_implementation(path),
            },
            "workload": {
                "prompts": cfg.prompts,
                "prompt_tokens": cfg.prompt_tokens,
                "batch_tokens": cfg.batch_tokens,
                "micro_batches": len(batches),
                "tokens": tokens,
            },
            "matmul_flops": peak,
            "skipped": {**{m: "not installed (the bench extra)" for m in missing}, **not_here},
        }

        def saved(results: dict) -> None:  # a run cut short still leaves the modes it finished
            if cfg.out:
                Path(cfg.out).write_text(json.dumps(finished(head, results, per_token, complete=False), indent=1))

        results: dict = {}
        in_process = [m for m in modes if m not in RAY_MODES]
        if in_process:
            bench_in_process(path, batches, device, dtype, sel, in_process, tokenizer, results, saved)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the model is gone; the Ray modes' actors need the memory
        for mode, (stages, handoff) in RAY_MODES.items():
            if mode in modes:
                run = bench_ray(
                    corpus, model_arg, device.type, dtype, cfg.batch_tokens, stages, sel, handoff, cfg.tensor_parallel
                )
                results[mode] = {**run, "tokens": tokens}
                saved(results)
    return finished(head, results, per_token, complete=True)


def finished(head: dict, results: dict, per_token: float, complete: bool) -> dict:
    """The report: every mode's rate, ratio to ``bare``, MFU and bytes copied per token."""
    bare = results.get("bare")
    bare_rate = bare["tokens"] / bare["seconds"] if bare else None
    out = {}
    for mode, r in results.items():
        rate = r["tokens"] / r["seconds"]
        out[mode] = {
            **r,
            "tokens_per_s": rate,
            "ratio_to_bare": rate / bare_rate if bare_rate else None,
            "mfu": rate * per_token / head["matmul_flops"],
            "d2h_bytes_per_token": None if r["d2h_bytes"] is None else r["d2h_bytes"] / r["tokens"],
        }
    return {**head, "results": out, "complete": complete}


def _head(cfg: BenchConfig, device: torch.device, path: str, dtype: str) -> dict:
    """What a report says of its run: when, the command, the device, the versions, the model."""
    return {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(["neuroscan", *sys.argv[1:]]),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine(),
        "versions": {p: package_version(p) for p in ("torch", "transformers", "ray", "pyarrow", "fastapi", "uvicorn")},
        "model": {"path": path, "dtype": dtype},
        "complete": True,
    }


def table(report: dict) -> str:
    if "service" in report:
        from bench import service

        return f"{report['device']}  {report['model']['dtype']}\n" + service.table(report["service"])
    if "nodes" in report:
        from bench import nodes

        return f"{report['device']}  {report['model']['dtype']}\n" + nodes.table(report["nodes"])
    lines = [
        (
            f"{report['device']}  {report['model']['n_layer']} layers x {report['model']['d_model']}  {report['model']['dtype']}  "
            f"attention {report['model']['attention']}  "
            f"{report['workload']['tokens']} tokens in {report['workload']['micro_batches']} micro-batches"
        ),
        f"{'mode':<23}{'tokens/s':>12}{'vs bare':>9}{'MFU':>8}{'D2H B/token':>13}{'peak MB':>10}{'agg lag s':>11}",
    ]
    for mode, r in report["results"].items():
        fmt = lambda v, spec: "-" if v is None else format(v, spec)
        lines.append(
            f"{mode:<23}{r['tokens_per_s']:>12,.0f}{fmt(r['ratio_to_bare'], '.3f'):>9}{r['mfu']:>8.3f}"
            f"{fmt(r['d2h_bytes_per_token'], ',.0f'):>13}{fmt(r['peak_device_mb'], ',.0f'):>10}"
            f"{fmt(r.get('aggregator_lag_s'), '.2f'):>11}"
        )
    for mode, why in report.get("skipped", {}).items():
        lines.append(f"{mode:<23}skipped: {why}")
    noise = report["results"].get("bare_again", {}).get("ratio_to_bare")
    if noise is not None:
        lines.append(
            f"noise: bare timed twice differs by {abs(1 - noise):.1%}; ratios closer than that are not told apart"
        )
    return "\n".join(lines)
