"""``manifest.json``: the run's identity and the list of committed parts, replaced atomically.

A file under the output directory counts only once the manifest lists it. The manifest is
written to a temporary file, fsynced, renamed over the old one and the directory fsynced,
so a crash leaves either the old manifest or the new one, never a torn one. Readers of a
scan's tables (the report, ``compare``) go through `Run`, which reads only committed files:
a killed scan's half-written part is never read.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds

from aggregator import schema
from cluster.errors import UserError

NAME = "manifest.json"


def write_manifest(out_dir: Path, manifest: dict) -> None:
    out_dir = Path(out_dir)
    tmp = out_dir / f".{NAME}.tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out_dir / NAME)
    fsync_dir(out_dir)


def read_manifest(out_dir: Path) -> dict | None:
    """The manifest in ``out_dir``, None if it has none; one that is not neuroscan's JSON stops with one line."""
    path = Path(out_dir) / NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        problem = f"not valid JSON ({getattr(err, 'msg', None) or err.reason})"
    else:
        if isinstance(manifest, dict) and "parts" in manifest:
            return manifest
        problem = 'a JSON object without "parts"' if isinstance(manifest, dict) else f"a JSON {type(manifest).__name__}, not an object"
    raise UserError(
        f"{path} is {problem}: something other than neuroscan wrote it (neuroscan replaces it whole); "
        "restore it, or scan again with --overwrite"
    )


@dataclass
class Run:
    """A scan's output directory, read through its manifest."""

    out: Path
    manifest: dict

    @property
    def fmt(self) -> str:
        return self.manifest.get("format", "parquet")

    @property
    def n_layers(self) -> int:
        return int(self.manifest["partition"][-1][1])

    @property
    def bands(self) -> dict:
        return self.manifest["bands"]

    def files(self, table: str, layer: int | None = None) -> list[str]:
        """Committed files of ``table`` (``activations`` of one ``layer`` when given)."""
        prefix = f"{table}/" if layer is None else f"{table}/layer={layer:02d}/"
        return [str(self.out / f["path"]) for part in self.manifest["parts"] for f in part["files"] if f["path"].startswith(prefix)]

    def read(self, table: str, columns: list[str] | None = None, layer: int | None = None) -> pa.Table:
        return self.dataset(table, layer).to_table(columns=columns)

    def dataset(self, table: str, layer: int | None = None) -> ds.Dataset:
        files = self.files(table, layer)
        if not files:  # e.g. a layer where no neuron was ever kept
            return ds.dataset(schema.TABLES[table].empty_table())
        return ds.dataset(files, format=self.fmt)


def open_run(out_dir: str | Path) -> Run:
    """The scan in ``out_dir``, with at least one committed part; or one line saying what is missing."""
    out = Path(out_dir)
    manifest = read_manifest(out)
    if manifest is None:
        raise UserError(f"{out} has no {NAME}: give the output directory of a neuroscan scan")
    if not manifest["parts"]:
        raise UserError(f"{out} has no committed rows yet: wait for the scan to commit a part (or rerun it with --resume)")
    return Run(out, manifest)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
