"""Where a scanned micro-batch's device time goes: torch.profiler over ``bare`` and ``scan_local``.

    python -m bench.profile CHECKPOINT_DIR [--batches 2] [--prompts 32] [--prompt-tokens 256]

Prints, for each mode, the kernels by total device time and the wall time per micro-batch;
the difference between the two tables is what the scan costs. A diagnostic for bench/RESULTS.md,
not a benchmark (the profiler itself slows launches).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from bench.run import bare_step, synthetic_corpus
from cluster.placement import STAGE_CONCURRENCY
from prompts.batching import micro_batches
from workers.checkpoint import load_config, load_tokenizer
from workers.families import context, n_layers
from workers.shard import ShardSpec
from workers.stage import Stage, StageSpec


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    config = load_config(args.model)
    n = n_layers(config)
    stage = Stage(StageSpec(args.model, ShardSpec(0, n, n), "cuda", "float16"))
    stage.setup()
    model, device = stage.model, torch.device("cuda")
    with tempfile.TemporaryDirectory() as tmp:
        corpus = synthetic_corpus(Path(tmp) / "p.jsonl", args.prompts * args.batches, args.prompt_tokens)
        batches = [
            b
            for b, _ in micro_batches(
                str(corpus), load_tokenizer(args.model), context(config), args.prompts * args.prompt_tokens, False
            )
        ]

    bare = bare_step(model, device)

    side = stage.reduce_stream

    def one_thread(step):
        return lambda batches: [step(b) for b in batches]

    def scan_local(batches):  # as the Ray actor runs the stage: two calls at a time, side stream
        stage.reduce_stream = side
        with ThreadPoolExecutor(STAGE_CONCURRENCY) as pool:
            list(pool.map(stage.forward, batches))

    def scan_local_inline(batch):  # one thread, the reduction on the forward pass's own stream
        stage.reduce_stream = None
        stage.forward(batch)

    for name, run in (
        ("bare", one_thread(bare)),
        ("scan_local_inline", one_thread(scan_local_inline)),
        ("scan_local", scan_local),
    ):
        run(batches[:1])
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            run(batches)
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t0) / len(batches)
        events = prof.key_averages()
        # Kernels only: summing the table's rows would count an op and its kernels twice (runs
        # 2-6 printed that doubled figure).
        device_total = (
            sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA)
            / 1e3
            / len(batches)
        )
        print(
            f"\n== {name}: {wall * 1e3:.1f} ms wall per micro-batch, {device_total:.1f} ms of kernels per micro-batch"
        )
        print(events.table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
