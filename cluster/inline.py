"""Scans from Python: ``neuroscan.scan(prompts, out=None, **options)``.

    import neuroscan
    run = neuroscan.scan(["apple, banana, cherry,", "2, 4, 6, 8,"], high=3.0, low=-0.1)
    run.activations(layer=27, to="pandas")

``prompts`` is a list of strings, a list of dicts (``text`` and the optional ``id``,
``family``, ``variant``, ``expected`` and any other fields, kept in ``prompts/``), a pandas or
Polars DataFrame with those columns, or the path of a corpus file or directory (what
``neuroscan scan`` takes). A list or a DataFrame is written once as JSONL under the cache
directory, named by its sha256, so the same prompts are the same corpus to ``resume=True``.
The scan runs in this process exactly as ``neuroscan scan`` runs it (`cluster.driver.run_scan`),
with a local Ray unless this process already has one or ``RAY_ADDRESS`` names a cluster.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
import warnings
from pathlib import Path

from cluster.client import jsonl_bytes
from cluster.driver import run_scan
from neuroscan.config import ScanConfig, Selection, cache_dir
from neuroscan.errors import UserError
from neuroscan.manifest import verification_line
from results.run import Run, open_run

SELECTION = {f.name for f in dataclasses.fields(Selection)}
SCAN = {f.name for f in dataclasses.fields(ScanConfig)} - {"prompts", "out", "selection"}


def scan(prompts, out: str | Path | None = None, **options) -> Run:
    """Scan ``prompts`` into ``out`` (None: a new directory under the system's temporary
    directory, whose path is ``run.out``) and return the finished run. ``options`` are
    ``neuroscan scan``'s flags by their Python names: ``high``, ``low``, ``red``,
    ``max_per_layer``, ``model``, ``stages``, ``replicas``, ``device``, ``dtype``,
    ``batch_tokens``, ``top_k``, ``format``, ``resume``, ``overwrite``, ``quiet``, ``verify``...
    A run whose rows fail the fidelity check (``verify``) is returned with a warning."""
    unknown = sorted(set(options) - SELECTION - SCAN)
    if unknown:
        raise UserError(
            f"neuroscan.scan() has no option {', '.join(map(repr, unknown))}: use one of {', '.join(sorted(SELECTION | SCAN))}"
        )
    selection = Selection(**{k: v for k, v in options.items() if k in SELECTION})
    rest = {k: v for k, v in options.items() if k in SCAN}
    target = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="neuroscan-run-"))
    cfg = ScanConfig(prompts=corpus_path(prompts), out=str(target), selection=selection, **rest)
    manifest = run_scan(cfg)
    if manifest.verification is not None and not manifest.verification.passed:
        warnings.warn(verification_line(manifest), stacklevel=2)  # the tables are kept: the run is returned
    return open_run(target)


def corpus_path(prompts) -> str:
    """The corpus as a path ``neuroscan scan`` reads: a path as it is, anything else written
    as JSONL under the cache directory (once per content)."""
    if isinstance(prompts, (str, Path)):
        if not Path(prompts).exists() and str(prompts) != "seed":
            raise UserError(f"prompts {prompts} does not exist: give a corpus file or directory, a list or a DataFrame")
        return str(prompts)
    data = jsonl_bytes(prompts)
    path = cache_dir() / "corpora" / f"{hashlib.sha256(data).hexdigest()[:24]}.jsonl"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".corpus-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    return str(path)
