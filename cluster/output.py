"""The output directory before a scan starts: fresh, replaced (--overwrite) or resumed (--resume).

A resumed run must produce the tables an uninterrupted run would have, so it is refused
when anything that shapes the rows differs from the run on disk: the model, its dtype, the
thresholds and bands, the corpus (path and checksum) or the micro-batch budget (batch ids
depend on it). Stages, replicas and the device may change. A run whose committed files no
longer match its manifest is refused too, unless ``--repair`` drops its damaged parts for
the resumed run to scan again (`aggregator.repair`).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from aggregator.repair import drop_damaged
from neuroscan.errors import UserError, make_dir
from neuroscan.manifest import NAME as MANIFEST_NAME
from neuroscan.manifest import Corpus, Manifest, damage_line, file_damage, read_manifest
from neuroscan.schema import OUTPUT_DIRS
from prompts.batching import PACKINGS
from prompts.readers import corpus_paths

IDENTITY = {
    "model.id": "--model",
    "model.path": "--model",
    "model.dtype": "--dtype",
    "model.fingerprint": "--model's weights",
    "selection.high": "--high",
    "selection.low": "--low",
    "selection.max_per_layer": "--max-per-layer",
    "bands.red": "--red",
    "batch_tokens": "--batch-tokens",
    "format": "--format",
    "corpus.source": "PROMPTS",
    "corpus.sha256": "PROMPTS (its contents changed)",
    "truncate": "--truncate",
    "top_k": "--top-k",
    "packing": "the micro-batch packing",
}


def corpus_fingerprint(source: str) -> Corpus:
    """The corpus's path and checksum, which ``--resume`` compares: of the file's bytes, or of a
    directory corpus's file names and bytes, in the order they are read."""
    files = corpus_paths(source)
    if not files:
        return Corpus(source=source, sha256=None)  # a built-in corpus
    path, shards = Path(source), Path(source).is_dir()
    digest = hashlib.sha256()
    for file in files:
        if shards:
            digest.update(f"{file.name}\0{file.stat().st_size}\0".encode())
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return Corpus(source=str(path.resolve()), sha256=digest.hexdigest())


@contextmanager
def claim(out: Path) -> Iterator[None]:
    """Hold ``out`` (created if missing) for one scan: an exclusive lock on the directory,
    which the kernel drops when this process ends, however it ends.

    A second scan into the same directory while the first runs (a forgotten terminal, or
    ``--resume`` / ``--overwrite`` while it runs) would interleave its parts with the first's
    or delete the files under it; it is refused instead. The lock is ``flock``: it holds
    between the processes of one machine; across machines, only where the shared file
    system honours it."""
    make_dir(out)
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(
                f"--out {out} is in use by another neuroscan scan: wait for it to end (or stop it and "
                "--resume), or choose another directory"
            ) from None
        yield
    finally:
        os.close(fd)


WRITTEN = frozenset({MANIFEST_NAME, f".{MANIFEST_NAME}.tmp", *OUTPUT_DIRS, "report", ".report.tmp", ".report.old"})
"""What a scan (and ``neuroscan report`` into the scan's directory) writes in ``--out``: all
that ``--overwrite`` deletes. Anything else there (notes, a notebook, the corpus) is kept."""


DAMAGE_FIX = (
    "restore the files from a copy, rescan the damaged parts with --resume --repair, or scan again with --overwrite"
)


def prepare_output(
    out: Path,
    overwrite: bool,
    resume: bool,
    header: Manifest,
    notice: Callable[[str], None] | None = None,
    repair: bool = False,
    skipped_batches: Mapping[int, int] | None = None,
) -> Manifest | None:
    """Make ``out`` (claimed, so it exists) ready; returns the manifest of the run to resume,
    None when the scan starts from the beginning. ``notice`` is told what ``--overwrite`` kept
    and what ``repair`` dropped. ``repair``: a resumed run's damaged parts are dropped, to be
    scanned again, instead of refused; ``skipped_batches`` maps each prompt the run skipped
    (``--on-error skip``) to its micro-batch."""
    try:
        existing, damaged = read_manifest(out), False
    except UserError:  # a damaged manifest.json: the directory is still a scan's, which --overwrite replaces
        if not overwrite:
            raise
        existing, damaged = None, True
    if resume and existing is not None:
        _check_same_run(out, existing, header)
        damage = file_damage(out, existing, hashes=True)  # every committed byte, as written
        if damage and not repair:
            raise UserError(damage_line(out, list(damage.values()), DAMAGE_FIX))
        if repair:
            line = (
                drop_damaged(out, existing, damage, skipped_batches or {})
                if damage
                else "--repair: every committed file matches the manifest: nothing to rescan"
            )
            if notice is not None:
                notice(line)
        return existing
    if any(out.iterdir()):
        if existing is None and not damaged:
            raise UserError(
                f"--out {out} is not empty and not a neuroscan output directory (no {MANIFEST_NAME}): choose another directory"
            )
        if not overwrite:
            raise UserError(
                f"--out {out} is not empty: pass --resume to continue that run, --overwrite to replace it, or choose another directory"
            )
        _keep_inputs(out, header)
        kept = remove_written(out)
        if kept and notice is not None:
            notice(f"--overwrite kept what no scan wrote in {out}: {', '.join(kept)}")
    if not os.access(out, os.W_OK):
        raise UserError(f"--out {out} is not writable: choose a writable directory")
    return None


def remove_written(out: Path) -> list[str]:
    """Delete what a scan wrote in ``out`` (`WRITTEN`); returns the names of what else is
    there, which stays. The directory itself stays: it carries the claim."""
    kept = []
    for child in sorted(out.iterdir()):
        if child.name not in WRITTEN:
            kept.append(child.name)
        elif child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    return kept


def run_skipped(out: Path) -> set[int]:
    """The prompt ids the run in ``out`` skipped (``--on-error skip``), none when ``out`` holds
    no readable manifest."""
    existing = _on_disk(out)
    return {int(s["prompt_id"]) for s in existing.skipped} if existing is not None else set()


def run_packing(out: Path) -> str:
    """How the run in ``out`` cut its corpus into micro-batches, so that a resume cuts it the
    same way (the default when ``out`` holds no readable manifest)."""
    existing = _on_disk(out)
    return existing.packing if existing is not None else PACKINGS[0]


def _on_disk(out: Path) -> Manifest | None:
    try:
        return read_manifest(out) if out.is_dir() else None
    except UserError:  # damaged: `prepare_output` says so
        return None


def _keep_inputs(out: Path, header: Manifest) -> None:
    """--overwrite deletes what a scan wrote in ``out``: refuse when the corpus or the model
    lives there."""
    corpus = header.corpus.source if header.corpus.sha256 else None
    inputs = [("the prompt corpus", corpus), ("the model", header.model.path)]
    written = [out.resolve() / name for name in WRITTEN]
    for what, path in inputs:
        if path and any(Path(path).resolve().is_relative_to(place) for place in written):
            raise UserError(
                f"--overwrite would delete {what} {path}, which is inside --out {out}: move it out first, or choose another --out"
            )


def _check_same_run(out: Path, existing: Manifest, header: Manifest) -> None:
    if existing.schema_version != header.schema_version:
        raise UserError(
            f"cannot resume {out}: it holds output schema {existing.schema_version} and this neuroscan writes "
            f"schema {header.schema_version}: finish it with the neuroscan release that started it, or --overwrite "
            "to scan again (report, compare and neuroscan.open read it as it is)"
        )
    for key, flag in IDENTITY.items():
        before, now = _get(existing, key), _get(header, key)
        if before is None and key == "model.fingerprint":  # a run written before weights had one
            continue
        if before != now and key == "model.fingerprint":
            raise UserError(
                f"cannot resume {out}: the weights at --model {header.model.path} are not the ones the run was "
                "scanned with (config.json or the safetensors files changed): put those back, or --overwrite "
                "to scan again with these"
            )
        if before != now:
            raise UserError(
                f"cannot resume {out}: {flag} differs (the run has {key}={before!r}, now {now!r}): "
                "use the run's settings, or --overwrite to start again"
            )


def _get(manifest: Manifest, dotted: str):
    value = manifest
    for name in dotted.split("."):
        value = getattr(value, name)
    return value
