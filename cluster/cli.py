"""The ``neuroscan`` command line, built from the configuration classes' `option` fields.

Every command exits non-zero with one line, ``neuroscan: error: <what, the value, the fix>``,
and no traceback, when the input is wrong (`neuroscan.errors.UserError` or a bad flag).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import threading
import types
import typing
import warnings
from pathlib import Path

from neuroscan.config import (
    PIPELINE_OPTIONS,
    SCAN_OPTIONS,
    BenchConfig,
    CancelConfig,
    CheckConfig,
    CompareConfig,
    DeleteConfig,
    MakeModelConfig,
    ReportConfig,
    ResumeConfig,
    ScanConfig,
    ServeConfig,
    StatusConfig,
    SubmitConfig,
    WaitConfig,
    options,
)
from neuroscan.errors import UserError, make_dir, user_line

EXIT_USAGE = 2
EXIT_DAMAGED = 1  # `neuroscan check`: files that do not match the manifest
EXIT_UNVERIFIED = 3  # `neuroscan scan`: the rows failed the fidelity check (--verify); the tables are kept
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM
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


def _items(kind):
    """argparse ``type`` of a comma-separated list of ``kind``."""
    return lambda text: tuple(kind(v.strip()) for v in text.split(",") if v.strip())


def add_options(parser: argparse.ArgumentParser, cls, only: tuple[str, ...] | None = None) -> None:
    """One argument per `neuroscan.config.option` field of ``cls`` (those named in ``only``, if
    given): its flag, default, help, choices and section, all as declared there."""
    sections: dict[str | None, argparse._ActionsContainer] = {None: parser}
    for f, meta, kind in options(cls):
        if only is not None and f.name not in only:
            continue
        if meta["group"] not in sections:
            sections[meta["group"]] = parser.add_argument_group(meta["group"])
        section, flag = sections[meta["group"]], "--" + f.name.replace("_", "-")
        optional = typing.get_origin(kind) in (typing.Union, types.UnionType)
        base = next(a for a in typing.get_args(kind) if a is not type(None)) if optional else kind
        help_text, listed = meta["help"], typing.get_origin(kind) is tuple
        metavar = "{" + ",".join(meta["choices"]) + "}" if meta["choices"] and not listed else f.name.upper()
        if meta["choices"] and listed:
            help_text += f" ({', '.join(meta['choices'])})"
        default = f.default if f.default is not dataclasses.MISSING else None
        if base is bool:
            section.add_argument(flag, dest=f.name, action="store_true", help=help_text)
            continue
        if default not in (None, ()) and not meta["positional"]:
            shown = ",".join(default) if isinstance(default, tuple) else default
            help_text += " (default: all)" if default == meta["choices"] else f" (default {shown})"
        kind_of = _items(typing.get_args(base)[0]) if typing.get_origin(base) is tuple else base
        if meta["positional"]:
            optional_arg = {"nargs": "?", "default": default} if f.default is not dataclasses.MISSING else {}
            section.add_argument(f.name, type=kind_of, help=help_text, metavar=metavar, **optional_arg)
        else:
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            section.add_argument(
                flag,
                dest=f.name,
                type=kind_of,
                default=default,
                required=required,
                help=help_text,
                metavar=metavar,
            )


def config_from(cls, args: argparse.Namespace):
    """``cls`` from parsed arguments (its nested configs too), checked by its `validate`."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            values[f.name] = config_from(hints[f.name], args)
        elif hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
    cfg = cls(**values)
    cfg.validate()
    return cfg


def build_parser() -> argparse.ArgumentParser:
    from prompts.generate import GenerateConfig

    parser = _Parser(prog="neuroscan", description="Scan the MLP neurons of a GPT-J model over a prompt corpus.")
    parser.add_argument("--version", action="version", version=f"neuroscan {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    add_options(sub.add_parser("scan", help="scan a prompt corpus and write Arrow tables"), ScanConfig)
    prompts = sub.add_parser("prompts", help="prompt corpora").add_subparsers(
        dest="prompts_command", metavar="COMMAND", required=True, parser_class=_Parser
    )
    add_options(
        prompts.add_parser("generate", help="write in-context sequence prompts (JSONL) in the seed prompts' formats"),
        GenerateConfig,
    )
    add_options(
        sub.add_parser("compare", help="neurons whose selection differs between two groups of prompts"), CompareConfig
    )
    add_options(
        sub.add_parser("bench", help="the benchmark of record: bare forward vs naive vs neuroscan, one run"),
        BenchConfig,
    )
    add_options(
        sub.add_parser("report", help="write DIR/report/, a static site of the scan (opens from file://)"), ReportConfig
    )
    add_options(
        sub.add_parser("check", help="check every file of a scan against its manifest (size and sha256)"), CheckConfig
    )
    add_options(
        sub.add_parser(
            "make-model",
            help="write a checkpoint in Hugging Face layout (a random one of a preset's shapes, or the demo model)",
        ),
        MakeModelConfig,
    )
    serve = sub.add_parser("serve", help="load the model once and scan what is submitted to it (HTTP)")
    add_options(serve, ServeConfig)
    add_options(serve, ScanConfig, only=PIPELINE_OPTIONS)
    submit = sub.add_parser("submit", help="queue a scan on a running service")
    add_options(submit, SubmitConfig)
    add_options(submit, ScanConfig, only=SCAN_OPTIONS)
    add_options(
        sub.add_parser("status", help="the service's scans: state, position, progress, tokens/s, ETA"), StatusConfig
    )
    add_options(
        sub.add_parser(
            "wait",
            help="wait for a scan to end; exit 0 only when it completed (3: completed, but its rows failed the fidelity check)",
        ),
        WaitConfig,
    )
    add_options(sub.add_parser("cancel", help="stop a scan within one micro-batch"), CancelConfig)
    add_options(sub.add_parser("resume", help="queue a cancelled or failed scan again"), ResumeConfig)
    add_options(sub.add_parser("delete", help="forget an ended scan (--files: and its tables)"), DeleteConfig)
    return parser


def picked(args: argparse.Namespace, names: tuple[str, ...]) -> dict:
    return {name: getattr(args, name) for name in names}


def cmd_scan(args) -> int:
    """The scan. All it prints, the closing summary included, is on stderr (stdout stays
    empty, so that nothing of Ray's or neuroscan's mixes into what a pipeline reads). A scan
    whose rows fail the fidelity check (``--verify``) keeps its tables and exits 3, the
    summary's last line saying why."""
    import time

    started = time.perf_counter()
    from cluster.driver import run_scan, summary_lines

    cfg = config_from(ScanConfig, args)
    manifest = run_scan(cfg)
    print("\n".join(summary_lines(manifest, str(Path(cfg.out)), time.perf_counter() - started)), file=sys.stderr)
    check = manifest.verification
    return EXIT_UNVERIFIED if check is not None and not check.passed else 0


def cmd_make_model(args) -> int:
    from workers.embedded import preset_config, write_checkpoint

    cfg = config_from(MakeModelConfig, args)
    out = Path(cfg.out)
    make_dir(out)
    if any(out.iterdir()):
        raise UserError(f"--out {out} is not empty: choose a new directory")
    if cfg.preset == "demo":
        from prompts.generate import generate
        from workers.demo_model import Recipe, make

        for key, share in make(out, generate, Recipe(seed=cfg.seed)).items():
            print(f"held-out accuracy {key}: {share:.2f}")
    else:
        write_checkpoint(preset_config(cfg.preset), out, seed=cfg.seed)  # a failed write leaves nothing behind
    print(out)
    return 0


def cmd_prompts(args) -> int:
    from prompts.generate import GenerateConfig, generate, write_jsonl

    cfg = config_from(GenerateConfig, args)
    rows = generate(cfg.n, shots=cfg.shots, seed=cfg.seed, families=list(cfg.families), variants=list(cfg.variants))
    write_jsonl(rows, Path(cfg.out))
    print(cfg.out)
    return 0


def cmd_compare(args) -> int:
    from results.compare import compare, write_compare

    cfg = config_from(CompareConfig, args)
    table = compare(Path(cfg.dir), cfg.by, cfg.a, cfg.b, cfg.sort, cfg.top)
    write_compare(table, Path(cfg.out))
    meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    print(
        f"A = {meta['a']} ({meta['n_a']} prompts), B = {meta['b']} ({meta['n_b']} prompts); "
        f"wrote {table.num_rows:,} of {int(meta['n_tested']):,} neurons tested, by {cfg.sort}, to {cfg.out}"
    )
    print("layer  neuron  A kept  B kept    diff       z         q")
    for row in table.slice(0, cfg.top or 10).to_pylist():
        print(
            f"{row['layer']:5d}  {row['neuron']:6d}  {row['a_frac']:6.2f}  {row['b_frac']:6.2f}  {row['diff']:6.2f}  "
            f"{row['z']:6.2f}  {row['q']:8.2g}"
        )
    return 0


def cmd_bench(args) -> int:
    import json

    from bench.run import run_bench, table

    cfg = config_from(BenchConfig, args)
    report = run_bench(cfg)
    print(table(report))
    if cfg.out:
        Path(cfg.out).write_text(json.dumps(report, indent=1))
        print(f"wrote {cfg.out}")
    return 0


def cmd_check(args) -> int:
    from neuroscan.manifest import damaged_files
    from results.run import FIX, scan_manifest

    cfg = config_from(CheckConfig, args)
    out = Path(cfg.dir)
    manifest = scan_manifest(out)
    problems = damaged_files(out, manifest, hashes=True)
    for line in problems:
        print(line)
    n_files, n_parts = len(manifest.listed()), len(manifest.parts)
    listed = f"{n_files} file{'s' * (n_files != 1)} of {n_parts} part{'s' * (n_parts != 1)}"
    if problems:
        print(f"{out}: {len(problems)} of {listed} do not match the manifest: {FIX}")
        return EXIT_DAMAGED
    state = "a finished scan" if manifest.complete else "not finished: `neuroscan scan ... --resume` goes on from here"
    print(f"{out}: {listed} match the manifest (size and sha256); {state}")
    return 0


def cmd_report(args) -> int:
    import time

    from report import serve
    from report.site import build

    cfg = config_from(ReportConfig, args)
    partial: list[str] = []
    index = build(cfg, notice=partial.append)
    print(f"wrote {index.parent}/ (open {index.resolve().as_uri()}){''.join(f'; {p}' for p in partial)}", flush=True)
    if cfg.serve:
        try:
            server = serve.start(index.parent, cfg.port)
        except OSError as err:
            raise UserError(
                f"cannot serve on 127.0.0.1:{cfg.port} ({err.strerror or err}): choose another --port"
            ) from None
        print(f"serving {serve.url(server)}  (Ctrl-C stops)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            server.shutdown()
            print("stopped serving", file=sys.stderr)
    return 0


def cmd_serve(args) -> int:
    from cluster.serve import serve

    cfg = config_from(ServeConfig, args)
    template = ScanConfig(prompts="seed", out=cfg.results, **picked(args, PIPELINE_OPTIONS))
    template.validate()
    return serve(cfg, template)


def cmd_submit(args) -> int:
    from cluster.client import Client

    cfg = config_from(SubmitConfig, args)
    scan_options = picked(args, SCAN_OPTIONS)
    config_from(ScanConfig, argparse.Namespace(prompts=cfg.prompts, out=".", **scan_options))  # checked here first
    job = Client(cfg.url).submit(cfg.prompts, name=cfg.name, **scan_options)
    status = job.status()
    where = f" (position {status['position']})" if status["position"] else ""
    print(f"scan {job.id} {status['state']}{where}: {status['name']}, {status['prompts_total']} prompts")
    return 0


def cmd_status(args) -> int:
    from cluster.client import Client, status_lines

    cfg = config_from(StatusConfig, args)
    client = Client(cfg.url)
    scans = [client.job(cfg.id).status()] if cfg.id else client.scans()
    print("\n".join(status_lines(scans)))
    return 0


def cmd_wait(args) -> int:
    from cluster.client import Client

    cfg = config_from(WaitConfig, args)
    with warnings.catch_warnings():  # a failed fidelity check is said below, in neuroscan's line
        warnings.simplefilter("ignore")
        status = Client(cfg.url).job(cfg.id).wait(progress=cfg.progress)
    print(f"scan {status['id']} completed: {status['out']}")
    if status.get("error"):  # its rows failed the fidelity check: the tables are kept
        print(f"neuroscan: {status['error']}", file=sys.stderr)
        return EXIT_UNVERIFIED
    return 0


def cmd_cancel(args) -> int:
    from cluster.client import Client

    cfg = config_from(CancelConfig, args)
    status = Client(cfg.url).job(cfg.id).cancel()
    print(f"scan {status['id']} {status['state']}{' (cancelling)' if status['cancel_requested'] else ''}")
    return 0


def cmd_resume(args) -> int:
    from cluster.client import Client

    cfg = config_from(ResumeConfig, args)
    status = Client(cfg.url).job(cfg.id).resume()
    print(f"scan {status['id']} {status['state']}: it continues from its committed parts")
    return 0


def cmd_delete(args) -> int:
    from cluster.client import Client

    cfg = config_from(DeleteConfig, args)
    answer = Client(cfg.url).job(cfg.id).delete(files=cfg.files)
    if not answer["files_deleted"]:
        print(f"scan {answer['id']} deleted; its tables stay in {answer['out']}")
    elif answer["kept"]:
        print(f"scan {answer['id']} deleted with its tables; {answer['out']} keeps {', '.join(answer['kept'])}")
    else:
        print(f"scan {answer['id']} deleted with its tables ({answer['out']})")
    return 0


COMMANDS = {
    "report": cmd_report,
    "check": cmd_check,
    "bench": cmd_bench,
    "scan": cmd_scan,
    "make-model": cmd_make_model,
    "prompts": cmd_prompts,
    "compare": cmd_compare,
    "serve": cmd_serve,
    "submit": cmd_submit,
    "status": cmd_status,
    "wait": cmd_wait,
    "cancel": cmd_cancel,
    "resume": cmd_resume,
    "delete": cmd_delete,
}


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a batch scheduler ending the job): stops a command as Ctrl-C does."""


_signalled: list[int] = []
"""The SIGTERMs received: Ray turns a KeyboardInterrupt raised while the main thread waits in
``ray.get``/``ray.wait`` into a plain one of its own, losing `Terminated`; this remembers it."""


def _terminated(signum, frame) -> None:
    _signalled.append(signum)
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if on_main_thread else None
    _signalled.clear()
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except UserError as err:
        print(f"neuroscan: error: {user_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as err:
        terminated = isinstance(err, Terminated) or bool(_signalled)
        print(
            f"neuroscan: {'terminated' if terminated else 'interrupted'}: committed parts are kept; "
            "continue with the same command and --resume",
            file=sys.stderr,
        )
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
    except BrokenPipeError:  # `neuroscan ... | head`: the reader left; what was written stays written
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so Python's flush at exit finds no pipe
        return EXIT_BROKEN_PIPE
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
