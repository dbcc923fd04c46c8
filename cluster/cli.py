"""The ``neuroscan`` command line.

Every command exits non-zero with one line, ``neuroscan: error: <what, the value, the fix>``,
and no traceback, when the input is wrong (`cluster.errors.UserError` or a bad flag).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cluster.errors import UserError, make_dir, one_of

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell tool killed by the closed pipe returns


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of argparse's usage block
        raise UserError(f"{message} (see `{self.prog} --help`)")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("neuroscan")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="neuroscan", description="Scan the MLP neurons of a GPT-J model over a prompt corpus.")
    parser.add_argument("--version", action="version", version=f"neuroscan {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    scan = sub.add_parser("scan", help="scan a prompt corpus and write Arrow tables")
    scan.add_argument("prompts", help="a .jsonl/.csv/.txt corpus (or one of those compressed: .gz, .bz2, .zst), a .parquet one, a directory of such files (a dataset's shards), or a built-in corpus name (seed)")
    scan.add_argument("--out", required=True, help="output directory")
    scan.add_argument("--model", help="checkpoint directory or Hugging Face id in the local cache (default: the embedded tiny GPT-J)")
    scan.add_argument("--truncate", action="store_true", help="keep the last tokens of prompts longer than the context instead of refusing them")
    scan.add_argument("--quiet", action="store_true", help="no progress bar")
    keep = scan.add_argument_group("what is kept")
    keep.add_argument("--high", type=float, default=3.0, help="select a neuron when some token is above this (default 3.0)")
    keep.add_argument("--low", type=float, default=0.0, help="... or below this (default 0.0)")
    keep.add_argument("--red", type=float, default=3.5, help="band edge between orange and red (default 3.5)")
    keep.add_argument("--max-per-layer", type=int, default=500, help="keep at most K neurons per (prompt, layer), most extreme first; 0 keeps all (default 500)")
    keep.add_argument("--top-k", type=int, default=20, help="max-activating prompts kept per neuron in neurons/ (default 20)")
    runs = scan.add_argument_group("how it runs")
    runs.add_argument("--stages", type=int, default=1, help="pipeline stages per replica (default 1)")
    runs.add_argument("--replicas", type=int, default=1, help="pipeline replicas (default 1)")
    runs.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    runs.add_argument("--gpus-per-stage", type=float, default=1.0, help="the share of a GPU each stage reserves, at most 1; 0.5 puts two stages on one GPU (default 1)")
    runs.add_argument("--handoff", default="store", help="hidden state between stages: store (pinned host copy, Ray's object store; default) "
                      "or direct (the tensor itself: CUDA IPC on one GPU, NCCL between GPUs, Gloo on CPUs)")
    runs.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16 (default auto: float32 on CPU, the checkpoint's on CUDA)")
    runs.add_argument("--batch-tokens", type=int, default=8192, help="token budget of a micro-batch (default 8192)")
    runs.add_argument("--in-flight", type=int, default=0, help="micro-batches in flight per replica (default 2 x stages + 1)")
    runs.add_argument("--on-error", default="stop", help="a prompt too large for device memory even alone: stop (default) or skip it")
    output = scan.add_argument_group("the output directory")
    output.add_argument("--format", default="parquet", help="parquet (zstd) or arrow (default parquet)")
    output.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    output.add_argument("--resume", action="store_true", help="continue an interrupted run in --out (same model, thresholds, corpus and --batch-tokens)")
    output.add_argument("--rows-per-part", type=int, default=500_000, help="activation rows buffered before a part is committed (default 500000)")

    prompts = sub.add_parser("prompts", help="prompt corpora").add_subparsers(dest="prompts_command", metavar="COMMAND", required=True, parser_class=_Parser)
    gen = prompts.add_parser("generate", help="write in-context sequence prompts (JSONL) in the seed prompts' formats")
    gen.add_argument("--n", type=int, required=True, help="number of prompts")
    gen.add_argument("--out", required=True, help="output .jsonl file")
    gen.add_argument("--shots", type=int, default=3, help="in-context examples per prompt (default 3)")
    gen.add_argument("--seed", type=int, default=0, help="the same seed (and flags) gives the same prompts (default 0)")
    gen.add_argument("--families", help="comma-separated families (default: all)")
    gen.add_argument("--variants", default="icl", help="comma-separated: icl, zero_shot, shuffled (default icl)")

    cmp = sub.add_parser("compare", help="neurons whose selection differs between two groups of prompts")
    cmp.add_argument("dir", help="a scan's output directory")
    cmp.add_argument("--by", required=True, help="family or variant")
    cmp.add_argument("--a", help="group A (default: the first of exactly two groups, or the one --b is not)")
    cmp.add_argument("--b", help="group B (default: the second of exactly two groups, or the one --a is not)")
    cmp.add_argument("--out", required=True, help="output .parquet file")

    bench = sub.add_parser("bench", help="the benchmark of record: bare forward vs naive vs neuroscan, one run")
    bench.add_argument("--device", default="cpu", help="cpu or cuda")
    bench.add_argument("--preset", default="tiny", help="tiny or gptj-6b (random weights, written once under --cache)")
    bench.add_argument("--model", help="a checkpoint directory instead of a preset")
    bench.add_argument("--dtype", default="auto", help="auto (float16 on cuda, float32 on cpu), float32, float16, bfloat16")
    bench.add_argument("--prompts", type=int, default=64, help="synthetic prompts, the same for every mode (default 64)")
    bench.add_argument("--prompt-tokens", type=int, default=256, help="tokens a prompt (default 256)")
    bench.add_argument("--batch-tokens", type=int, default=8192, help="token budget of a micro-batch (default 8192)")
    bench.add_argument("--modes", help="comma-separated subset of: " + ", ".join(BENCH_MODES) + " (default: all)")
    bench.add_argument("--cache", default=str(Path.home() / ".cache" / "neuroscan" / "bench"), help="where presets' weights are written once (default %(default)s)")
    bench.add_argument("--out", help="write the report as JSON here")

    rep = sub.add_parser("report", help="write DIR/report/, a static site of the scan (opens from file://)")
    rep.add_argument("dir", help="a finished scan's output directory")
    rep.add_argument("--out", help="write the site here instead of DIR/report/ (DIR is only read)")
    rep.add_argument("--serve", action="store_true", help="also serve it on 127.0.0.1 and print the URL (Ctrl-C stops)")
    rep.add_argument("--port", type=int, default=0, help="port for --serve (default: any free port)")
    rep.add_argument("--strips", type=int, default=32, help="strips per (prompt, layer) on layer pages (0: one per kept neuron)")
    rep.add_argument("--neurons-per-layer", type=int, default=20, help="neurons per layer with their own page (the most often red)")

    make = sub.add_parser("make-model", help="write a random GPT-J checkpoint in Hugging Face layout")
    make.add_argument("--preset", default="tiny", help="tiny (the embedded model) or gptj-6b (GPT-J-6B's shapes, fp16)")
    make.add_argument("--out", required=True, help="directory to write")
    make.add_argument("--seed", type=int, default=0, help="the weights' seed (default 0: with --preset tiny, the embedded model)")
    return parser


BENCH_MODES = ("bare", "bare_hf_gelu", "bare_hf_rotary", "naive", "scan_local_eager", "scan_local_inline", "scan_local",
               "transformer_lens", "nnsight", "bare_again", "scan", "scan_2stage", "scan_2stage_direct")
"""bench.run.MODES, named here so that `neuroscan --help` needs no torch import (a test checks they agree)."""


def cmd_scan(args) -> int:
    from cluster.config import ScanConfig, Selection
    from cluster.driver import run_scan, summary_lines

    cfg = ScanConfig(
        prompts=args.prompts, out=args.out, model=args.model, stages=args.stages, replicas=args.replicas,
        device=args.device, dtype=args.dtype, gpus_per_stage=args.gpus_per_stage, handoff=args.handoff,
        selection=Selection(high=args.high, low=args.low, red=args.red, max_per_layer=args.max_per_layer),
        batch_tokens=args.batch_tokens, format=args.format, truncate=args.truncate, overwrite=args.overwrite, resume=args.resume,
        in_flight=args.in_flight, rows_per_part=args.rows_per_part, on_error=args.on_error, top_k=args.top_k, progress=not args.quiet,
    )
    manifest = run_scan(cfg)
    print("\n".join(summary_lines(manifest, str(Path(args.out)))))
    return 0


def cmd_make_model(args) -> int:
    from workers.embedded import PRESETS, gptj_config, write_checkpoint

    one_of("--preset", args.preset, PRESETS)
    out = Path(args.out)
    make_dir(out)
    if any(out.iterdir()):
        raise UserError(f"--out {out} is not empty: choose a new directory")
    write_checkpoint(gptj_config(args.preset), out, seed=args.seed)  # a failed write leaves nothing behind
    print(out)
    return 0


def cmd_prompts(args) -> int:
    from prompts.generate import generate, write_jsonl

    split = lambda value: [v.strip() for v in value.split(",") if v.strip()] if value else None
    rows = generate(args.n, shots=args.shots, seed=args.seed, families=split(args.families), variants=split(args.variants))
    write_jsonl(rows, Path(args.out))
    print(args.out)
    return 0


def cmd_compare(args) -> int:
    from aggregator.compare import compare, write_compare

    table = compare(Path(args.dir), args.by, args.a, args.b)
    write_compare(table, Path(args.out))
    meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    print(f"A = {meta['a']} ({meta['n_a']} prompts), B = {meta['b']} ({meta['n_b']} prompts); wrote {args.out}")
    print("layer  neuron  A kept  B kept    diff       z")
    for row in table.slice(0, 10).to_pylist():
        print(f"{row['layer']:5d}  {row['neuron']:6d}  {row['a_frac']:6.2f}  {row['b_frac']:6.2f}  {row['diff']:6.2f}  {row['z']:6.2f}")
    return 0


def cmd_bench(args) -> int:
    import json

    from bench.run import run_bench, table

    report = run_bench(args)
    print(table(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")
    return 0


def cmd_report(args) -> int:
    import time

    from report import serve
    from report.site import Options, build

    if args.strips < 0:
        raise UserError(f"--strips {args.strips} must be 0 (every kept neuron) or a positive number")
    if args.neurons_per_layer < 1:
        raise UserError(f"--neurons-per-layer {args.neurons_per_layer} must be a positive number")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port} is not a port number: use 1-65535, or 0 for any free port")
    index = build(args.dir, Options(strips=args.strips, neurons_per_layer=args.neurons_per_layer), site=args.out)
    print(f"wrote {index.parent}/ (open {index.resolve().as_uri()})", flush=True)
    if args.serve:
        try:
            server = serve.start(index.parent, args.port)
        except OSError as err:
            raise UserError(f"cannot serve on 127.0.0.1:{args.port} ({err.strerror or err}): choose another --port") from None
        print(f"serving {serve.url(server)}  (Ctrl-C stops)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            server.shutdown()
            print("stopped serving", file=sys.stderr)
    return 0


COMMANDS = {"report": cmd_report, "bench": cmd_bench, "scan": cmd_scan, "make-model": cmd_make_model, "prompts": cmd_prompts, "compare": cmd_compare}


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except UserError as err:
        cause = getattr(err, "cause", None)  # raised in an actor: Ray wraps it with the remote traceback
        print(f"neuroscan: error: {cause if isinstance(cause, UserError) else err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("neuroscan: interrupted: committed parts are kept; continue with the same command and --resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `neuroscan ... | head`: the reader left; what was written stays written
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so Python's flush at exit finds no pipe
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
